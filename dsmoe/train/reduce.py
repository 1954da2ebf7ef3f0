"""The trainer's one door to other processes: every per-step reduction (loss and metric means, the expert
counts of the aux-loss-free bias update, evaluation sums) goes through a `Reducer`.

`SingleProcess` is the identity. Under torchrun the trainer gets dsmoe.distributed.runtime.Runtime instead,
which has the same members (rank, local_rank, world_size, is_main, sum, mean, barrier) plus the device and the mesh;
its `sum`/`mean` all-reduce over every rank and its rank/size pick each rank's slice of the batch. The
trainer code is the same either way.
"""

from __future__ import annotations

import torch


class SingleProcess:
    rank = 0
    local_rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self, timeout_s: float | None = None) -> None:
        pass
