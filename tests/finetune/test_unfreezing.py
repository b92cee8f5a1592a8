"""GradualUnfreezing: stages unfreeze on schedule into a running optimizer, and torch's LR
schedulers drive the new groups exactly as if they had been there from the start."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as lrs

from gradlab.finetune import GradualUnfreezing, freeze, trainable_parameters
from tests.finetune._nets import TinyResNet, images, state

SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], object]] = {
    "step": lambda o: lrs.StepLR(o, step_size=2, gamma=0.5),
    "multistep": lambda o: lrs.MultiStepLR(o, milestones=[1, 4], gamma=0.3),
    "exponential": lambda o: lrs.ExponentialLR(o, gamma=0.8),
    "cosine": lambda o: lrs.CosineAnnealingLR(o, T_max=8, eta_min=0.0),
    "lambda": lambda o: lrs.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    "multiplicative": lambda o: lrs.MultiplicativeLR(o, lambda e: 0.9),
    "linear": lambda o: lrs.LinearLR(o, start_factor=0.25, total_iters=4),
    "onecycle": lambda o: lrs.OneCycleLR(o, max_lr=o.param_groups[0]["lr"], total_steps=10),
    "cyclic": lambda o: lrs.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3),
    "warm-restarts": lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=3),
    "polynomial": lambda o: lrs.PolynomialLR(o, total_iters=5, power=2.0),
    "constant": lambda o: lrs.ConstantLR(o, factor=0.5, total_iters=3),
    "chained": lambda o: lrs.ChainedScheduler(
        [lrs.ExponentialLR(o, gamma=0.9), lrs.StepLR(o, step_size=2, gamma=0.5)]
    ),
    "sequential": lambda o: lrs.SequentialLR(
        o,
        [lrs.LinearLR(o, start_factor=0.5, total_iters=2), lrs.ExponentialLR(o, gamma=0.9)],
        milestones=[2],
    ),
}

HEAD_LR, STAGE_LRS = 0.1, (0.05, 0.02)
JOIN = (2, 3)


def _reference(name: str, join_lrs: tuple[float, ...]) -> list[list[float]]:
    """The lrs of an optimizer that holds every group from the start (the independent answer)."""
    ps = [nn.Parameter(torch.zeros(1)) for _ in range(3)]
    groups = [{"params": [p], "lr": lr} for p, lr in zip(ps, (HEAD_LR, *join_lrs))]
    opt = torch.optim.SGD(groups, lr=HEAD_LR, momentum=0.9)
    if name == "onecycle":
        sched = lrs.OneCycleLR(opt, max_lr=[HEAD_LR, *join_lrs], total_steps=10)
    elif name == "cyclic":
        ratios = [lr / HEAD_LR for lr in (HEAD_LR, *join_lrs)]
        sched = lrs.CyclicLR(
            opt,
            base_lr=[0.01 * r for r in ratios],
            max_lr=[0.1 * r for r in ratios],
            step_size_up=3,
        )
    else:
        sched = SCHEDULERS[name](opt)
    history = []
    for _ in range(6):
        opt.step()
        sched.step()  # type: ignore[attr-defined]
        history.append([g["lr"] for g in opt.param_groups])
    return history


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_new_groups_follow_the_scheduler_like_groups_present_from_the_start(name: str) -> None:
    model = TinyResNet()
    freeze(model, "conv1", "bn1", "layer1", "layer2")
    opt = torch.optim.SGD(model.fc.parameters(), lr=HEAD_LR, momentum=0.9)
    sched = SCHEDULERS[name](opt)
    unfreezer = GradualUnfreezing(
        model, opt, ["layer2", ["layer1", "conv1", "bn1"]], milestones=JOIN, lr=STAGE_LRS,
        scheduler=sched,
    )  # fmt: skip
    expected = _reference(name, STAGE_LRS)
    for epoch in range(6):
        opt.zero_grad()
        model(images()).square().mean().backward()
        opt.step()
        sched.step()  # type: ignore[attr-defined]
        unfreezer.step()
        got = [g["lr"] for g in opt.param_groups]
        joined = sum(m <= epoch + 1 for m in JOIN)
        assert len(got) == 1 + joined
        assert got == pytest.approx(expected[epoch][: len(got)], rel=1e-9, abs=1e-12), epoch


@pytest.mark.parametrize("min_lr", [1e-3, [1e-3]], ids=["float", "list"])
def test_reduce_on_plateau_extends_min_lrs_and_reduces_new_groups(min_lr: object) -> None:
    model = TinyResNet()
    opt = torch.optim.Adam(model.fc.parameters(), lr=0.1)
    # with a list, torch itself raises on added groups (Lightning #8720)
    sched = lrs.ReduceLROnPlateau(opt, factor=0.5, patience=0, min_lr=min_lr)
    unfreezer = GradualUnfreezing(
        model, opt, ["layer2", "layer1"], lr=0.04, scheduler=sched, milestones=[1, 1]
    )
    sched.step(1.0)
    unfreezer.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.04, 0.04])
    for _ in range(8):  # no improvement: every group halves down to min_lr
        opt.zero_grad()
        model(images()).square().mean().backward()
        opt.step()
        sched.step(1.0)
    assert sched.min_lrs == [1e-3] * 3
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-3, 1e-3])


def test_stages_stay_frozen_until_their_milestone_then_train() -> None:
    model = TinyResNet()
    opt = torch.optim.SGD(model.fc.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    unfreezer = GradualUnfreezing(
        model, opt, ["layer2", ["layer1", "conv1", "bn1"]], milestones=[2, 4]
    )
    assert [id(p) for p in trainable_parameters(model)] == [id(p) for p in model.fc.parameters()]
    snapshots = []
    for _ in range(5):
        before = state(model)
        model.train()
        opt.zero_grad(set_to_none=False)
        model(images()).square().mean().backward()
        opt.step()
        after = state(model)
        snapshots.append(
            {k: not torch.equal(after[k], before[k]) for k in ("layer2.0.conv1.weight",
             "layer2.0.bn1.running_mean", "layer1.0.conv1.weight")}
        )  # fmt: skip
        unfreezer.step()
    assert [s["layer2.0.conv1.weight"] for s in snapshots] == [False, False, True, True, True]
    assert [s["layer2.0.bn1.running_mean"] for s in snapshots] == [False, False, True, True, True]
    assert [s["layer1.0.conv1.weight"] for s in snapshots] == [False, False, False, False, True]
    assert unfreezer.unfrozen == [True, True]


def test_default_lr_is_the_first_groups_base_with_layer_decay() -> None:
    model = TinyResNet()
    opt = torch.optim.SGD(model.fc.parameters(), lr=0.2)
    sched = lrs.StepLR(opt, step_size=1, gamma=0.5)
    unfreezer = GradualUnfreezing(
        model, opt, ["layer2", "layer1"], layer_decay=0.5, scheduler=sched, milestones=[1, 1]
    )
    opt.step()
    sched.step()
    assert unfreezer.step() == (0, 1)
    # base lrs 0.2 * 0.5 and 0.2 * 0.25, joining at the current factor 0.5 of the schedule
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.05, 0.025])
    assert sched.base_lrs == pytest.approx([0.2, 0.1, 0.05])


def test_optimizer_built_from_named_parameters() -> None:
    model = TinyResNet()
    opt = torch.optim.SGD(model.fc.named_parameters(), lr=0.1)
    if "param_names" not in opt.param_groups[0]:
        pytest.skip("this torch has no named param groups")
    unfreezer = GradualUnfreezing(model, opt, ["layer2"], milestones=[1])
    unfreezer.step()
    assert opt.param_groups[1]["param_names"][0] == "layer2.0.conv1.weight"
    assert len(opt.param_groups[1]["param_names"]) == len(opt.param_groups[1]["params"])


def test_bad_input() -> None:
    model = TinyResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer already holds parameters of stage 0"):
        GradualUnfreezing(model, opt, ["layer2"])
    assert all(p.requires_grad for p in model.parameters())  # refused before freezing anything
    opt = torch.optim.SGD(model.fc.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="stages 0 and 1 share parameters"):
        GradualUnfreezing(model, opt, ["layer2", "layer2.0"])
    with pytest.raises(ValueError, match=r"milestones must be 2 non-decreasing ints >= 1"):
        GradualUnfreezing(model, opt, ["layer2", "layer1"], milestones=[3, 1])
    with pytest.raises(ValueError, match="either one lr per stage or layer_decay"):
        GradualUnfreezing(model, opt, ["layer2", "layer1"], lr=[0.1, 0.1], layer_decay=0.5)
    with pytest.raises(ValueError, match="GradualUnfreezing: target 'layer3'"):
        GradualUnfreezing(model, opt, ["layer3"])
    with pytest.raises(ValueError, match="different lr_lambda per param group"):
        two = torch.optim.SGD([{"params": [model.fc.weight]}, {"params": [model.fc.bias]}], lr=0.1)
        GradualUnfreezing(
            model, two, ["layer1"], scheduler=lrs.LambdaLR(two, [lambda e: 1.0, lambda e: 0.5])
        )
    with pytest.raises(TypeError, match=r"scheduler must be a torch\.optim\.lr_scheduler"):
        GradualUnfreezing(model, opt, ["layer1"], scheduler=object())
    with pytest.raises(TypeError, match="stages must be a sequence of stages"):
        GradualUnfreezing(model, opt, "layer1")  # type: ignore[arg-type]
    assert all(p.requires_grad for p in model.parameters())


def _run_unfreezing(
    epochs: range, parts: tuple | None = None, checkpoint: dict | None = None
) -> tuple:
    """Train TinyResNet with GradualUnfreezing, momentum SGD and a cosine schedule.

    Builds fresh objects, restores ``checkpoint`` (a torch.load'ed dict) if given, trains the
    ``epochs`` and returns (model, optimizer, scheduler, unfreezer).
    """
    torch.manual_seed(0)
    model = TinyResNet()
    opt = torch.optim.SGD(model.fc.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sched = lrs.CosineAnnealingLR(opt, T_max=8)
    unfreezer = GradualUnfreezing(
        model, opt, ["layer2", ["layer1", "conv1", "bn1"]], milestones=[2, 4], scheduler=sched,
        layer_decay=0.5,
    )  # fmt: skip
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        unfreezer.load_state_dict(checkpoint["unfreezer"])  # first: adds the param groups
        opt.load_state_dict(checkpoint["opt"])
        sched.load_state_dict(checkpoint["sched"])
    for epoch in epochs:
        model.train()
        for batch in range(2):
            opt.zero_grad()
            x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(10 * epoch + batch))
            model(x).square().mean().backward()
            opt.step()
        sched.step()
        unfreezer.step()
    return model, opt, sched, unfreezer


@pytest.mark.parametrize("cut", [1, 2, 3, 5])
def test_resumed_unfreezing_is_bit_identical_to_an_uninterrupted_run(cut: int) -> None:
    full = _run_unfreezing(range(6))
    model, opt, sched, unfreezer = _run_unfreezing(range(cut))
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "unfreezer": unfreezer.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    resumed = _run_unfreezing(range(cut, 6), checkpoint=torch.load(buffer, weights_only=True))
    a, b = state(full[0]), state(resumed[0])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [g["lr"] for g in full[1].param_groups] == [g["lr"] for g in resumed[1].param_groups]
    assert len(resumed[1].param_groups) == 3 and resumed[3].count == 6
    assert resumed[3].unfrozen == [True, True]
    momentum = [resumed[1].state[p]["momentum_buffer"] for p in resumed[0].conv1.parameters()]
    assert momentum and all(
        torch.equal(m, full[1].state[p]["momentum_buffer"])
        for m, p in zip(momentum, full[0].conv1.parameters())
    )


def test_unfreezing_state_dict_survives_pickle_and_is_not_modified() -> None:
    *_, unfreezer = _run_unfreezing(range(3))
    state_dict = unfreezer.state_dict()
    assert state_dict == {"count": 3, "unfrozen": [True, False], "milestones": [2, 4],
                          "reference_lr": 0.1}  # fmt: skip
    assert pickle.loads(pickle.dumps(state_dict)) == copy.deepcopy(state_dict) == state_dict
    *_, fresh = _run_unfreezing(range(0))
    fresh.load_state_dict(state_dict)
    assert fresh.state_dict() == state_dict and state_dict["unfrozen"] == [True, False]


def test_unfreezing_load_state_dict_errors() -> None:
    *_, unfreezer = _run_unfreezing(range(3))
    good = unfreezer.state_dict()
    with pytest.raises(TypeError, match=r"GradualUnfreezing\.load_state_dict: state_dict must be"):
        unfreezer.load_state_dict([3])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="state_dict lacks 'unfrozen', 'milestones'"):
        unfreezer.load_state_dict({"count": 1, "reference_lr": 0.1})
    with pytest.raises(ValueError, match=r"has 2 stages with milestones \[2, 4\], the saved one"):
        unfreezer.load_state_dict({**good, "milestones": [1, 4]})
    with pytest.raises(ValueError, match="stage 0 is already unfrozen here but frozen"):
        unfreezer.load_state_dict({**good, "unfrozen": [False, False]})
