"""What a training or benchmark script calls to run under torchrun (and, unchanged, in one plain process).

    rt = init_from_env(ep=args.ep, dp_shard=args.dp_shard, timeout_s=args.dist_timeout)
    model = parallelize(model, rt.mesh, ac=..., compile=...)     # mesh None in one process: AC and compile only
    ... batch = sample(seed, step, rt.data_rank, rt.data_size) ...
    counts = rt.sum(counts_LE)            # identity in one process (rt is the trainer's reducer)
    clip_grad_norm_(model.parameters(), 1.0)
    rt.shutdown()

init_from_env reads torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT). Without them
it is one process and starts no process group. NCCL on CUDA, gloo on the CPU. Every collective has a
timeout (NCCL's watchdog then ends the process with a message instead of hanging the job).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from dsmoe.distributed.flags import DEFAULT_TIMEOUT_S
from dsmoe.distributed.mesh import ParallelDims, ParallelMesh, build_mesh
from dsmoe.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    mesh: ParallelMesh | None  # None in one process
    owns_group: bool = False  # init_from_env started the process group (and shutdown ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def data_rank(self) -> int:
        """Which slice of each global batch this rank reads (every rank reads its own, EP ranks too)."""
        return self.rank

    @property
    def data_size(self) -> int:
        return self.world_size

    def reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """All-reduce a copy of t over every rank ("sum", "mean", "max"); the identity in one process.
        For per-step metrics and expert counts (aux-free bias updates need the whole step's counts)."""
        if not self.distributed:
            return t
        out = t.detach().to(self.device, copy=True)
        if op == "mean" and not out.is_floating_point():
            out = out.float()
        reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        dist.all_reduce(out, op=reduce_op)
        if op == "mean":
            out /= self.world_size
        return out.to(t.device)

    # the trainer's reducer protocol (dsmoe.train.reduce): rank, world_size, is_main, sum, mean
    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.reduce(t, "sum")

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.reduce(t, "mean")

    def barrier(self, timeout_s: float | None = None) -> None:
        """Wait for every rank. timeout_s: wait up to this long instead of the collective timeout, for work one
        rank does alone (rank 0 tokenizing a corpus): a side group over gloo, created and dropped here, carries
        the wait. If that rank fails, torchrun stops the job anyway."""
        if not self.distributed:
            return
        if timeout_s is None:
            dist.barrier()
            return
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        dist.barrier(group=group)
        dist.destroy_process_group(group)

    def shutdown(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_from_env(ep: int = 1, dp_shard: int = -1, timeout_s: float = DEFAULT_TIMEOUT_S,
                  device_type: str | None = None, ep_capacity_factor: float | None = None) -> Runtime:
    """Start (or join an already started) process group from torchrun's environment and build the mesh."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # fails early on degrees that do not fit
    dims = ParallelDims(world_size, ep=ep, dp_shard=dp_shard, ep_capacity_factor=ep_capacity_factor)
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                            "use --nproc-per-node <= the number of GPUs")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size == 1 and not dist.is_initialized() and "MASTER_ADDR" not in os.environ:
        return Runtime(0, 0, 1, device, None)
    owns_group = not dist.is_initialized()
    if owns_group:
        # NVLink multicast (NVLS) off unless the environment says otherwise: a requirement of the machines
        # this project runs on
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device_type == "cuda" else None)
    rt = Runtime(dist.get_rank(), local_rank, dist.get_world_size(), device, build_mesh(dims, device_type),
                 owns_group)
    quiet_other_ranks(rt)
    log.info("%d ranks (%s): expert parallel %d x data parallel %d, collective timeout %.0f s",
             rt.world_size, dist.get_backend(), dims.ep, dims.dp, timeout_s)
    return rt


def quiet_other_ranks(rt: Runtime) -> None:
    """Log from rank 0 only: the other ranks keep warnings and errors."""
    if not rt.is_main:
        logging.getLogger("dsmoe").setLevel(logging.WARNING)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Scale the gradients so their global L2 norm is at most max_norm; returns the norm before clipping.
    Works where torch's clip_grad_norm_ does not: gradients sharded over different meshes (experts over
    dp x ep, dense weights over every rank). Sharded (DTensor) gradients: each rank adds the squares of its
    local shard, divided by the number of ranks holding a replica of it, and the sum is all-reduced. Plain
    gradients are whole on this rank and count once. Norms and scaling run as foreach kernels on the local
    tensors (a few launches instead of several per parameter, and no DTensor dispatch per parameter)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    by_copies: dict[int, list[torch.Tensor]] = {}  # local gradient tensors by replica count; 0 = plain
    for g in grads:
        copies = 0
        if isinstance(g, DTensor):
            copies = 1
            for placement, size in zip(g.placements, g.device_mesh.shape):
                copies *= size if isinstance(placement, Replicate) else 1
            g = g.to_local()
        by_copies.setdefault(copies, []).append(g)
    device = grads[0].device
    sharded = torch.zeros((), dtype=torch.float32, device=device)
    whole = torch.zeros((), dtype=torch.float32, device=device)
    for copies, tensors in by_copies.items():
        squares = torch.stack(torch._foreach_norm(tensors, 2.0, dtype=torch.float32)).square().sum()
        if copies:
            sharded += squares / copies
        else:
            whole += squares
    if set(by_copies) != {0}:
        dist.all_reduce(sharded)
    norm = (sharded + whole).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_([t for tensors in by_copies.values() for t in tensors], scale)
    return norm
