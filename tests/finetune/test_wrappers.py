"""Warnings for wrapped models: DistributedDataParallel (a real single-process gloo group),
torch.compile (the wrapper, nothing compiled) and reentrant gradient checkpointing."""

from __future__ import annotations

import functools
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradlab.finetune import freeze, frozen, param_groups, trainable_parameters, unfreeze
from tests._distributed import end_process_group


def test_ddp_wrapped_model_warns_and_is_unwrapped() -> None:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with tempfile.TemporaryDirectory() as tmp:  # the group's FileStore deletes its file itself
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        ddp = None
        try:
            net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
            ddp = nn.parallel.DistributedDataParallel(net)
            ddp(torch.randn(3, 4)).sum().backward()
            with pytest.warns(
                UserWarning, match="freeze: model is wrapped in DistributedDataParal"
            ):
                freeze(ddp, "0")  # names are the inner network's ("0", not "module.0")
            assert not net[0].weight.requires_grad and net[1].weight.requires_grad
            # what the warning is about: the next backward fails
            with pytest.raises(RuntimeError, match="finished reduction in the prior iteration"):
                for _ in range(2):
                    ddp(torch.randn(3, 4)).sum().backward()
            with pytest.warns(UserWarning, match="unfreeze: model is wrapped in Distributed"):
                unfreeze(ddp)
            assert len(trainable_parameters(ddp)) == 4
        finally:
            ddp = None  # the wrapper goes before the group (see tests/_distributed.py)
            end_process_group()


def test_compiled_model_warns_and_is_unwrapped() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    compiled = torch.compile(net)  # builds the wrapper only; nothing is compiled until a call
    with pytest.warns(UserWarning, match="frozen: model is compiled with torch.compile"):
        with frozen(compiled, "1"):
            assert not net[1].training and not net[1].weight.requires_grad
    assert net[1].training
    assert len(param_groups(compiled, 0.1)[0]["params"]) == 6


def test_no_warning_when_nothing_changes() -> None:
    net = nn.Sequential(nn.Linear(4, 4))
    compiled = torch.compile(net)
    freeze(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        freeze(compiled, batchnorm="train")  # already frozen: nothing changes, no warning


class Checkpointed(nn.Module):
    """Hugging Face style: gradient_checkpointing flag plus _gradient_checkpointing_func."""

    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.block = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)
        self.gradient_checkpointing = True
        self._gradient_checkpointing_func = functools.partial(
            checkpoint, use_reentrant=use_reentrant
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = self._gradient_checkpointing_func(self.block, h)
        return self.head(h)


def test_reentrant_checkpointing_warns_and_the_problem_is_real() -> None:
    model = Checkpointed(use_reentrant=True)
    with pytest.warns(UserWarning, match="freeze: model uses gradient checkpointing with use_re"):
        freeze(model, "embed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own "None of the inputs have requires_grad"
        model(torch.randn(2, 4)).sum().backward()
    assert model.block.weight.grad is None  # the trainable block silently got nothing
    fixed = Checkpointed(use_reentrant=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        freeze(fixed, "embed")
    fixed(torch.randn(2, 4)).sum().backward()
    assert fixed.block.weight.grad is not None
