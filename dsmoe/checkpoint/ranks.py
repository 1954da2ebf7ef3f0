"""Which process this is, for the checkpoint code every rank runs: torch.distributed's rank and world size
when a process group is up (torchrun), rank 0 of 1 otherwise. Nothing here needs dsmoe.distributed."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def barrier() -> None:
    if distributed():
        dist.barrier()


def broadcast_int(value: int) -> int:
    """Rank 0's value on every rank (a tensor broadcast: no pickle, unlike broadcast_object_list)."""
    if not distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, src=0)
    return int(t.item())


@contextmanager
def one_process_is_intended() -> Iterator[None]:
    """DCP warns whenever it runs without a process group; here that is a supported case, not a fallback."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@contextmanager
def expected_two_step_gathers() -> Iterator[None]:
    """Expert weights sharded over both mesh dimensions gather in two all-gathers, and DTensor warns about it on
    every rank; for an export, one parameter at a time, that is the plan, not a problem."""
    logger = logging.getLogger("torch.distributed.tensor._redistribute")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def local_part(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(the part of `t` this process holds, where that part starts in the global tensor): a plain tensor whole,
    a DTensor's local shard (FSDP2's row chunks and the expert-parallel blocks of experts, also both at once, are
    boxes of the global tensor, so one offset places them)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t, (0,) * t.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    local = t.to_local()
    if tuple(local.shape) != tuple(shape):
        raise RuntimeError(f"a local shard of shape {tuple(local.shape)} where its placements "
                           f"{t.placements} imply {tuple(shape)}")
    return local, tuple(offset)
