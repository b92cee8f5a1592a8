"""Bad inputs and silent wrongs of the Hessian functions: each a clear error or a right answer."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from torch import nn

import gradlab as gl


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (5,))
    return model, x, y


FUNCTIONS = {
    "hessian_trace": gl.hessian_trace,
    "hessian_diagonal": gl.hessian_diagonal,
    "hessian_eigenvalues": gl.hessian_eigenvalues,
    "hessian_spectrum": gl.hessian_spectrum,
    "hessian_operator": gl.hessian_operator,
}


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_model_where_a_loss_closure_belongs(name):
    model, _, _ = _model()
    with pytest.raises(
        TypeError,
        match=rf"{name}: loss_fn must be callable with no arguments, got a Sequential \(an "
        r"nn.Module\), which needs 1\. Pass a closure returning the scalar loss",
    ):
        FUNCTIONS[name](model, model)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_zero_argument_closure_with_data(name):
    model, x, y = _model()
    with pytest.raises(
        TypeError, match=rf"{name}: with data=, loss_fn must take one argument \(the batch\)"
    ):
        FUNCTIONS[name](lambda: nn.functional.cross_entropy(model(x), y), model, data=[(x, y)])


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_empty_batch_in_data(name):
    model, x, y = _model()

    def loss_fn(batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    op_or_result = None
    with pytest.raises(ValueError, match=rf"{name}: batch 1 of data is empty .*shape \(0, 3\)"):
        op_or_result = FUNCTIONS[name](loss_fn, model, data=[(x, y), (x[:0], y[:0])])
        if name == "hessian_operator":  # the operator is lazy with data=: the first product
            op_or_result @ torch.ones(op_or_result.shape[0], dtype=torch.float64)


def test_complex_vectors_apply_to_real_and_imaginary_parts():
    model, x, y = _model()
    H = gl.hessian_operator(lambda: nn.functional.cross_entropy(model(x), y), model)
    dense = H @ torch.eye(H.shape[0], dtype=torch.float64)
    v = torch.randn(H.shape[0], dtype=torch.complex128)
    expected = dense.to(v.dtype) @ v
    torch.testing.assert_close(H @ v, expected, rtol=1e-10, atol=1e-12)
    out = H.to_scipy().matvec(v.numpy())  # was H Re(v) with a ComplexWarning only
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-10, atol=1e-12)
    M = torch.randn(H.shape[0], 2, dtype=torch.complex128)
    outm = H.to_scipy().matmat(M.numpy())
    torch.testing.assert_close(
        torch.from_numpy(outm), dense.to(M.dtype) @ M, rtol=1e-10, atol=1e-12
    )


def test_by_block_refuses_only_parameterless_blocks():
    model, x, y = _model()
    with pytest.raises(
        ValueError,
        match=r"hessian_trace_by_block: blocks must hold parameters with requires_grad, got only "
        r"blocks without any: 'act' \(Tanh\)",
    ):
        gl.hessian_trace_by_block(
            lambda: nn.functional.cross_entropy(model(x), y), {"act": model[1]}
        )


def _f3(a, /, b, *args, c):
    pass


def _f6(a, b, *, c=1, d):
    pass


@pytest.mark.parametrize(
    "fn",
    [
        lambda: 0,
        lambda batch: 0,
        lambda batch=1, *rest: 0,
        lambda batch, *, scale=2.0: 0,
        lambda *, key: 0,
        _f3,
        _f6,
        functools.partial(lambda a, b: 0, 1),
        functools.wraps(lambda a: 0)(lambda *a, **k: 0),
    ],
)
def test_loss_closure_arity_read_from_code_agrees_with_inspect_signature(fn):
    # the fast path for plain functions reads the code object; inspect.signature is the reference
    from gradlab.curvature._args import _positional

    required = accepted = 0
    expected: tuple[int, int] | None = None
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            expected = (required, 1 << 30)
            break
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            accepted += 1
            required += p.default is p.empty
        elif p.kind is p.KEYWORD_ONLY and p.default is p.empty:
            break
    else:
        expected = (required, accepted)
    assert _positional(fn) == expected
