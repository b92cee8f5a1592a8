"""GradientMonitor's diagnostics against Cockpit's own values, where the definitions agree.

Optional: runs only where ``cockpit-for-pytorch`` and ``backpack-for-pytorch`` are installed
(``pip install --no-deps cockpit-for-pytorch backpack-for-pytorch``, then einops, unfoldNd,
json-tricks, pandas, seaborn). Cockpit's NormTest, InnerTest and OrthoTest are the largest
theta / nu for which each test passes, as ``norm_test``, ``inner_product_test`` and
``orthogonality_test``; its MeanGSNR is ``gsnr`` (eps 1e-5). Float64 models on the same batch,
Cockpit on its own BackPACK-extended copy.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from gradlab.hooks import GradientMonitor

_PAIRS = {
    "norm_test": "NormTest",
    "inner_product_test": "InnerTest",
    "orthogonality_test": "OrthoTest",
    "gsnr": "MeanGSNR",
}


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "mlp": nn.Sequential(nn.Linear(5, 7), nn.Sigmoid(), nn.Linear(7, 3)).double(),
        "cnn": nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, stride=2),
            nn.Sigmoid(),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, 3),
        ).double(),
    }


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_agrees_with_cockpit(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cockpit imports pkg_resources
        cockpit = pytest.importorskip("cockpit")
        backpack = pytest.importorskip("backpack")
        from cockpit import quantities

    model = _models()[name]
    theirs = backpack.extend(copy.deepcopy(model))
    g = torch.Generator().manual_seed(1)
    shape = (8, 5) if name == "mlp" else (8, 2, 8, 8)
    x = torch.randn(*shape, dtype=torch.float64, generator=g)
    y = torch.randn(8, 3, dtype=torch.float64, generator=g)

    # Cockpit: MSELoss with mean reduction over the batch and the 3 outputs
    loss_fn = backpack.extend(nn.MSELoss(reduction="mean"))
    quants = [getattr(quantities, q)(track_schedule=lambda step: True) for q in _PAIRS.values()]
    cp = cockpit.Cockpit(theirs.parameters(), quantities=quants)
    out = theirs(x)
    losses = nn.functional.mse_loss(out, y, reduction="none").mean(1)
    loss = loss_fn(out, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cp(0, info={"batch_size": 8, "individual_losses": losses, "loss": loss}):
            loss.backward(create_graph=cp.create_graph(0))
    want = cp.get_output()[0]

    with GradientMonitor(model, diagnostics=tuple(_PAIRS), loss_reduction="mean") as monitor:
        nn.functional.mse_loss(model(x), y).backward()
    got = monitor.history[0].diagnostics
    for ours, their in _PAIRS.items():
        assert got[ours] == pytest.approx(float(want[their]), rel=1e-8), ours
