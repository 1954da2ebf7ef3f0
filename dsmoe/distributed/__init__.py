"""Parallelism applied from outside the model: DeviceMesh, expert parallelism, FSDP2, activation
checkpointing, compile, and the torchrun runtime (checkpoints, one process or N: dsmoe.checkpoint).

The model (dsmoe.model) never imports torch.distributed; import these only where a script runs
parallel. Heavy torch.distributed modules load on first use of a name below.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ParallelDims": "mesh", "ParallelMesh": "mesh", "build_mesh": "mesh",
    "ExpertParallelExperts": "expert_parallel", "apply_ep": "expert_parallel",
    "apply_ac": "parallelize", "apply_compile": "parallelize", "apply_fsdp": "parallelize",
    "parallelize": "parallelize",
    "Runtime": "runtime", "init_from_env": "runtime", "add_arguments": "flags",
    "clip_grad_norm_": "runtime",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dsmoe.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dsmoe.distributed.{_EXPORTS[name]}"), name)
