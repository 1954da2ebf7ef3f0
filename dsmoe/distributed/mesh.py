"""The device mesh: world = dp_shard x ep, as a 2-D DeviceMesh ("dp", "ep").

Every rank is data parallel for the dense weights (attention, norms, shared experts, router, embedding):
those are sharded by FSDP2 over all ranks (the flattened "dp_ep" mesh). The routed experts are split
E / ep per rank over "ep" and sharded by FSDP2 over "dp", the ranks that hold the same experts (torchtitan's
"dp2ep": expert parallelism borrows its ranks from data parallelism). Consecutive ranks form one EP group,
so with ep <= GPUs per node the all-to-all stays on NVLink.

Each rank reads its own slice of the global batch: the data-parallel rank and size for batch sampling are
the global rank and world size (`Runtime.data_rank`, `Runtime.data_size`).
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dsmoe.errors import UserError


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of parallelism. dp_shard = -1 means "whatever is left": world_size // ep. ep_capacity_factor: the
    expert-parallel dispatch in training, None = exact (variable splits), F = sync-free with a capacity of F times
    the balanced share (dsmoe.distributed.ep_dispatch)."""

    world_size: int
    ep: int = 1
    dp_shard: int = -1
    ep_capacity_factor: float | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise UserError(f"world size {self.world_size} is not positive: launch with torchrun --nproc-per-node N")
        if self.ep < 1:
            raise UserError(f"--ep {self.ep} must be >= 1")
        if self.world_size % self.ep:
            raise UserError(f"--ep {self.ep} does not divide the world size {self.world_size}: pick an "
                            f"expert-parallel degree among {_divisors(self.world_size)}")
        if self.dp_shard != -1 and self.dp_shard * self.ep != self.world_size:
            raise UserError(f"--dp-shard {self.dp_shard} x --ep {self.ep} = {self.dp_shard * self.ep} but the world "
                            f"size is {self.world_size}: use --dp-shard {self.world_size // self.ep} (or -1)")
        if self.ep_capacity_factor is not None and self.ep == 1:
            raise UserError("--ep-capacity-factor bounds the expert-parallel dispatch: give --ep > 1 too, or leave "
                            "it out")
        if self.ep_capacity_factor is not None and not (math.isfinite(self.ep_capacity_factor)
                                                        and self.ep_capacity_factor > 0):
            raise UserError(f"--ep-capacity-factor {self.ep_capacity_factor} must be positive (1.25: a quarter above "
                            f"the balanced share; {self.ep} or more never drops); leave it out for the exact dispatch")

    @property
    def dp(self) -> int:
        """Ranks that hold the same experts (the FSDP degree of the expert weights)."""
        return self.world_size // self.ep

    def check_experts(self, num_experts: int | None) -> None:
        """Each EP rank owns the same number of whole experts."""
        if self.ep > 1 and (num_experts is None or num_experts % self.ep):
            raise UserError(f"--ep {self.ep} must divide the number of routed experts ({num_experts}): pick an "
                            f"expert-parallel degree among {_divisors(num_experts or 1)} that also divides the "
                            f"world size {self.world_size}")


@dataclass
class ParallelMesh:
    """The meshes the parallelize functions take, built once (each holds process groups) by build_mesh."""

    dims: ParallelDims
    world: DeviceMesh  # 2-D ("dp", "ep")
    ep_mesh: DeviceMesh  # the ranks that split the experts among themselves
    dp_mesh: DeviceMesh  # FSDP mesh of the expert weights: the ranks holding the same experts
    fsdp_mesh: DeviceMesh  # FSDP mesh of the dense weights: every rank (the 2-D mesh flattened)


def build_mesh(dims: ParallelDims, device_type: str) -> ParallelMesh:
    """The 2-D mesh over an initialised default process group (ranks laid out dp-major, ep-minor)."""
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs an initialised process group: call dsmoe.distributed.init_from_env()")
    if dist.get_world_size() != dims.world_size:
        raise UserError(f"the mesh is for {dims.world_size} ranks but torchrun started {dist.get_world_size()}")
    world = init_device_mesh(device_type, (dims.dp, dims.ep), mesh_dim_names=("dp", "ep"))
    return ParallelMesh(dims, world, world["ep"], world["dp"], world["dp", "ep"]._flatten("dp_ep"))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
