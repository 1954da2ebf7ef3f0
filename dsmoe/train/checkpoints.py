"""The trainer's checkpoints: one trainer state, two storage layouts, resumable at any world size.

The trainer state (built by the trainer, the same dict in both layouts): step, tokens seen, skipped-step
counters, elapsed time, schedule (total steps, last lr), data position (seed, next step, sequences per step),
the training config. The aux-free router biases are buffers of the model, so they travel with its weights;
the RNG states travel beside it.

- One process: dsmoe.checkpoint.native (full tensors in model/optimizer/rng.safetensors, state.json), as
  before any parallelism existed.
- Under torchrun with more than one rank: torch.distributed.checkpoint through dsmoe.distributed.checkpoint:
  every rank writes its own shards (safetensors), state.json holds the trainer state under "extra", and
  each rank's RNG states go to ranks/rank_<r>.safetensors.

Resume reads either layout at any world size: DCP reshards a sharded checkpoint (also into one process,
without a process group) and reads each rank's slices of a native checkpoint's full tensors. RNG states come
back only at the world size that wrote them; elsewhere every rank reseeds from (seed, step, rank).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsmoe.checkpoint import native
from dsmoe.errors import UserError

log = logging.getLogger(__name__)


def is_sharded(path: Path) -> bool:
    """A checkpoint written by several ranks (dsmoe.distributed.checkpoint) rather than by one process."""
    try:
        return "extra" in json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state of either layout (read before any model exists: it decides the batch layout)."""
    return native.read_state(path)


def save(checkpoints_dir: Path, step: int, model, optimizer, state: dict[str, Any], *, keep: int,
         reducer) -> Path | None:
    """Write checkpoints_dir/step_{step} (every rank calls it; one process writes the native layout), then
    keep the newest `keep` (0 = all)."""
    if reducer.world_size == 1:
        return native.save_checkpoint(checkpoints_dir, step, model, optimizer, state, keep=keep)
    from dsmoe.distributed.checkpoint import save_checkpoint

    path = checkpoints_dir / f"step_{step}"
    rng_json, rng_tensors = native.capture_rng()
    extra = {"format": native.FORMAT, "version": native.VERSION, "step": step, **state, "rng": rng_json,
             "model_config": model.config.to_hf_dict(), "world_size": reducer.world_size}
    save_checkpoint(path, model, optimizer, extra, rank_tensors=rng_tensors)
    if reducer.is_main and keep > 0:
        for old in native.list_checkpoints(checkpoints_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load(path: Path, model, optimizer, reducer) -> dict[str, Any]:
    """Load weights, optimizer and RNG states in place (every rank calls it); returns the trainer state."""
    state = read_trainer_state(path)
    if not is_sharded(path) and reducer.world_size == 1:
        return native.load_checkpoint(path, model, optimizer)  # exactly as a one-process run always did
    from dsmoe.distributed.checkpoint import (
        load_checkpoint,
        load_native_checkpoint,
        load_rank_tensors,
    )

    if is_sharded(path):
        load_checkpoint(path, model, optimizer)
        rng = load_rank_tensors(path)
    else:
        load_native_checkpoint(path, model, optimizer, state["optimizer"])
        rng = None
    if rng is not None:
        native.restore_rng(state["rng"], rng)
    else:
        seed = np.random.SeedSequence([state["data"]["seed"], state["step"], reducer.rank]).generate_state(1)[0]
        torch.manual_seed(int(seed))
        if reducer.is_main:
            log.info("%s was saved by %d rank(s), resumed on %d: dropout masks continue from a new seed",
                     path, state.get("world_size", 1), reducer.world_size)
    return state


def micro_batches_per_rank(micro_batch: int, sequences_per_step: int, world_size: int) -> int:
    """Gradient-accumulation steps per rank that keep a run's global batch on `world_size` ranks."""
    per_rank, rest = divmod(sequences_per_step, micro_batch * world_size)
    if rest or per_rank == 0:
        raise UserError(f"this run takes {sequences_per_step} sequences per step, which {world_size} ranks x "
                        f"--micro-batch {micro_batch} do not divide: resume on a number of ranks that divides "
                        f"{sequences_per_step // micro_batch}")
    return per_rank
