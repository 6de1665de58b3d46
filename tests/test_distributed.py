"""Distributed training on 2 gloo CPU ranks: apply, then wrap (DDP or FSDP2) keeps every rank's
LCAAM parameters identical; wrapping first, then applying, is refused."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import tiny_vit
from torch import nn

import lcaam_patch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wrap(model: nn.Module, wrapper: str) -> nn.Module:
    if wrapper == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    return fully_shard(model)


def _full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full tensor (FSDP2 keeps DTensor shards)."""
    full = {}
    for name, parameter in model.named_parameters():
        value = parameter.detach()
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        full[name] = value.clone()
    return full


def _worker(rank: int, world: int, port: int, wrapper: str, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = lcaam_patch.apply(tiny_vit())
        wrapped = _wrap(model, wrapper)
        try:
            lcaam_patch.apply(_wrap(tiny_vit(), wrapper))
            refused = ""
        except lcaam_patch.WrappedModelError as error:
            refused = str(error)
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
        torch.manual_seed(1 + rank)  # each rank sees other data
        for _ in range(3):
            x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
            optimizer.zero_grad()
            nn.functional.cross_entropy(wrapped(x), y).backward()
            optimizer.step()
        results[rank] = (_full_parameters(model), refused)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_apply_then_wrap_keeps_lcaam_parameters_identical_across_ranks(wrapper):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), wrapper, results), nprocs=2, join=True)
    (params0, refused0), (params1, refused1) = results[0], results[1]
    assert "apply(model, ...) on the bare model first" in refused0 and refused1
    lcaam = [name for name in params0 if ".lcaam." in name]
    assert lcaam and params0.keys() == params1.keys()
    for name in params0:
        assert torch.equal(params0[name], params1[name]), name
    initial = dict(lcaam_patch.apply(tiny_vit()).named_parameters())
    assert any(not torch.equal(initial[name], params0[name]) for name in lcaam), "LCAAM did not train"
