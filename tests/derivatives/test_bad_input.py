"""Bad input to every public derivatives function: a table of (call, error type, message), each
message in the one template ``"{fn}: {name} must be ..., got {value!r}. {fix}"``."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import gradlab as gl

X = torch.randn(3)
LINEAR = torch.nn.Linear(3, 2)
FM = gl.functional(LINEAR)


def _y():
    x = torch.randn(3, requires_grad=True)
    return x, (x**2).sum()


CASES = [
    # (id, call, error type, function name, argument name, text the message must contain)
    (
        "jacobian-numpy",
        lambda: gl.jacobian(lambda z: z.detach().numpy(), X),
        ValueError,
        "jacobian",
        "f",
        "torch operations",
    ),
    (
        "jacobian-numpy-loop",
        lambda: gl.jacobian(lambda z: z.detach().numpy(), X, strategy="loop"),
        ValueError,
        "jacobian",
        "f",
        "array(",
    ),
    (
        "jacobian-list-of-floats",
        lambda: gl.jacobian(lambda z: (2 * z).tolist(), X),
        ValueError,
        "jacobian",
        "f",
        # Which of f's two faults is seen first depends on the strategy: a plain call returns
        # the list (not a tensor); a forward-mode or vmapped call fails at .tolist() (torch 2.7's
        # choice for this case). Either message names the fix.
        ("tensor or a tuple/list/dict of tensors", "reads their data (.numpy(), .tolist()"),
    ),
    (
        "jacobian-float",
        lambda: gl.jacobian(lambda z: 3.0, X),
        ValueError,
        "jacobian",
        "f",
        "got 3.0",
    ),
    (
        "jacobian-none",
        lambda: gl.jacobian(lambda z: None, X),
        ValueError,
        "jacobian",
        "f",
        "got None",
    ),
    (
        "jacobian-strategy",
        lambda: gl.jacobian(torch.sin, X, strategy="revers"),
        ValueError,
        "jacobian",
        "strategy",
        "Did you mean 'reverse'?",
    ),
    (
        "jacobian-chunk",
        lambda: gl.jacobian(torch.sin, X, chunk_size=0),
        ValueError,
        "jacobian",
        "chunk_size",
        "got 0",
    ),
    (
        "jacobian-int-input",
        lambda: gl.jacobian(torch.sin, torch.arange(3)),
        TypeError,
        "jacobian",
        "x",
        "floating-point",
    ),
    (
        "hessian-numpy",
        lambda: gl.hessian(lambda z: z.detach().numpy().sum(), X),
        ValueError,
        "hessian",
        "f",
        "torch operations",
    ),
    (
        "hessian-vector",
        lambda: gl.hessian(torch.sin, X),
        ValueError,
        "hessian",
        "f",
        "scalar (0-dim)",
    ),
    (
        "hessian-argnums",
        lambda: gl.hessian(lambda a, b: a.sum(), X, X, argnums=3),
        ValueError,
        "hessian",
        "argnums",
        "got 3",
    ),
    ("hvp-not-callable", lambda: gl.hvp("f", X, X), TypeError, "hvp", "f", "got 'f'"),
    (
        "hvp-v-shape",
        lambda: gl.hvp(lambda z: z.sum(), X, torch.ones(2)),
        ValueError,
        "hvp",
        "v (leaf 0)",
        "of shape (3,)",
    ),
    (
        "vjp-v-dtype",
        lambda: gl.vjp(torch.sin, X, torch.ones(3, dtype=torch.float64)),
        TypeError,
        "vjp",
        "v (leaf 0)",
        "of dtype torch.float32",
    ),
    (
        "derivative-order",
        lambda: gl.derivative(torch.sin, X, order=0),
        ValueError,
        "derivative",
        "order",
        "got 0",
    ),
    (
        "derivative-x",
        lambda: gl.derivative(torch.sin, [1.0]),
        TypeError,
        "derivative",
        "x",
        "got [1.0]",
    ),
    (
        "derivative-reduces",
        lambda: gl.derivative(lambda z: z.sum(), X, strategy="reverse"),
        ValueError,
        "derivative",
        "f",
        "elementwise",
    ),
    (
        "functional-param-shape",
        lambda: FM({"weight": torch.randn(3, 3)}, torch.randn(4, 3)),
        ValueError,
        "functional",
        "params['weight']",
        "of shape (2, 3)",
    ),
    (
        "functional-param-type",
        lambda: FM({"weight": np.ones((2, 3))}, torch.randn(4, 3)),
        TypeError,
        "functional",
        "params['weight']",
        "of shape (2, 3)",
    ),
    (
        "functional-param-name",
        lambda: FM({"wieght": torch.randn(2, 3)}, torch.randn(4, 3)),
        ValueError,
        "functional",
        "params",
        "wieght",
    ),
    (
        "functional-params-list",
        lambda: FM([torch.randn(2, 3)], torch.randn(4, 3)),
        TypeError,
        "functional",
        "params",
        "dict of tensors",
    ),
    (
        "functional-batchnorm",
        lambda: gl.functional(LINEAR, batchnorm="batch"),
        ValueError,
        "functional",
        "batchnorm",
        "Did you mean 'batch-stats'?",
    ),
    (
        "functional-module",
        lambda: gl.functional(lambda z: z),
        TypeError,
        "functional",
        "module",
        "torch.nn.Module",
    ),
    (
        "grad-unused",
        lambda: gl.grad(_y()[1], _y()[0], unused="zero"),
        ValueError,
        "grad",
        "unused",
        "Did you mean 'zeros'?",
    ),
    ("grad-inputs", lambda: gl.grad(_y()[1], 1.0), TypeError, "grad", "inputs", "got 1.0"),
    (
        "backward-no-grad-input",
        lambda: gl.backward(_y()[1], torch.ones(3)),
        ValueError,
        "backward",
        "inputs[0]",
        "requires grad",
    ),
    (
        "set_autotune",
        lambda: gl.set_autotune("yes"),
        TypeError,
        "set_autotune",
        "enabled",
        "got 'yes'",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "fn", "name", "text"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_reads_the_template(call, error, fn, name, text):
    with pytest.raises(error) as info:
        call()
    msg = str(info.value)
    template = rf"^{re.escape(fn)}: {re.escape(name)} must be .+, got .+\."
    assert re.match(template, msg, re.DOTALL), msg
    texts = (text,) if isinstance(text, str) else text
    assert any(t in msg for t in texts), msg
