"""The trainer's one door to other processes: every per-step reduction (loss and metric means, the expert
counts of the aux-loss-free bias update, evaluation sums) goes through a `Reducer`.

`SingleProcess` is the identity. A data-parallel run (torchrun) passes a reducer whose `sum`/`mean`
all-reduce over the data-parallel group and whose rank/size pick each rank's slice of the batch; the
trainer code is the same either way.
"""

from __future__ import annotations

import torch


class SingleProcess:
    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor
