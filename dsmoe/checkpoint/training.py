"""Training checkpoints: everything a run needs to continue bit for bit, written and read one way by one process
and by N ranks (torch.distributed.checkpoint, DCP), and resumable at any other world size.

RUN/checkpoints/step_N/
  shard-*.safetensors          model and optimizer tensors; each rank writes its own pieces (DCP's safetensors
                               storage: every file's header records where its pieces sit in the full tensors)
  ranks/rank_<r>.safetensors   rank r's RNG states: torch generators as tensors, python and numpy in its metadata
  state.json                   format, step, world size, the optimizer's param groups and non-tensor state, the
                               caller's state (trainer counters, data position, configs) and the model config

Nothing is pickled: DCP keeps its metadata in the safetensors headers, the rest is JSON. DCP reshards on load, so
a checkpoint of N ranks loads on any number of ranks, one process without a process group included. RNG states
come back at the world size that wrote them; elsewhere each rank reseeds from (seed, step, rank).

A save fills `.step_N.tmp-PID` (PID: rank 0's) and renames it into place once every rank is done; pruning renames
`step_M` to `.step_M.deleting-PID` before deleting it. So a listing never shows a partial checkpoint, and what a
killed process leaves (hidden folders of a PID no longer alive) is cleared by the next save and by a resume.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dsmoe.atomic import atomic_write, atomic_write_text, replace_folder
from dsmoe.checkpoint.ranks import barrier, broadcast_int, distributed, one_process_is_intended, rank, world_size
from dsmoe.config import ModelConfig
from dsmoe.errors import CheckpointError
from dsmoe.json_files import read_json
from dsmoe.model.transformer import Transformer

log = logging.getLogger(__name__)
FORMAT = "dsmoe-train-checkpoint"
VERSION = 2  # 1: the retired one-process layout (model/optimizer/rng.safetensors) and its sharded sibling
STATE_FILE = "state.json"
RANKS_DIR = "ranks"  # outside the folder level DCP's reader lists
_HIDDEN = re.compile(r"\.(step_\d+)\.(tmp|old|deleting)-(\d+)")  # a save, a replaced step, a prune in progress


def save_checkpoint(checkpoints_dir: str | os.PathLike, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, state: dict[str, Any], keep: int = 0) -> Path:
    """Write checkpoints_dir/step_{step} atomically, then keep the newest `keep` (0 = all). Every rank calls it;
    `state` (JSON) is what read_state and load_checkpoint give back."""
    checkpoints_dir = Path(checkpoints_dir)
    final = checkpoints_dir / f"step_{step}"
    if rank() == 0:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        clean_stale(checkpoints_dir)
        own = checkpoints_dir / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(own, ignore_errors=True)
        own.mkdir()
    tmp = checkpoints_dir / f".{final.name}.tmp-{broadcast_int(os.getpid())}"  # rank 0's, made before it sends
    try:
        meta = {**state, "format": FORMAT, "version": VERSION, "step": step, "world_size": world_size(),
                "model_config": model.config.to_hf_dict()}
        module, keys = _module_and_keys(model)
        payload: dict[str, Any] = {"model": _model_state(module, keys)}
        if optimizer is not None:
            payload["optim"], meta["optimizer"] = _split_optimizer(get_optimizer_state_dict(module, optimizer))
        with one_process_is_intended():
            dcp.save(payload, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True),
                     no_dist=not distributed())
        _save_rng(tmp / RANKS_DIR / f"rank_{rank()}.safetensors")
        barrier()
        if rank() == 0:
            # last, and on the disk before the rename: it marks the folder complete
            atomic_write_text(tmp / STATE_FILE, json.dumps(meta, indent=1) + "\n")
            replace_folder(tmp, final)
            if keep > 0:
                for old in list_checkpoints(checkpoints_dir)[:-keep]:
                    _delete(old)
    finally:
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    seed: int = 0) -> dict[str, Any]:
    """Load into an already built (and parallelised, any world size) model and optimizer in place, restore the
    RNG states (or reseed from seed, step and rank at another world size); returns the saved state. Every rank
    calls it. Resuming also clears what interrupted saves left beside the checkpoint."""
    path = Path(path)
    state = read_state(path)
    if rank() == 0:
        clean_stale(path.parent)
    if optimizer is not None and "optimizer" not in state:
        raise CheckpointError(f"{path} holds no optimizer state: resume needs a full training checkpoint")
    _load_tensors(path, model, optimizer, state)
    rng_file = path / RANKS_DIR / f"rank_{rank()}.safetensors"
    if state["world_size"] == world_size() and rng_file.is_file():
        _restore_rng(rng_file)
    else:
        torch.manual_seed(int(np.random.SeedSequence([seed, state["step"], rank()]).generate_state(1)[0]))
        if rank() == 0:
            log.info("%s was saved by %d rank(s), resumed on %d: dropout masks continue from a new seed",
                     path, state["world_size"], world_size())
    return state


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu", moe_impl: str = "auto") -> Transformer:
    """The model of a checkpoint alone (for evaluation), fp32, in one process: DCP gathers the pieces."""
    path = Path(path)
    state = read_state(path)
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_hf_dict(state["model_config"]), moe_impl)
    model.to_empty(device=device)
    _load_tensors(path, model, None, state)
    model.init_buffers()
    return model


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """state.json of a complete checkpoint (read before any model exists: it decides the batch layout)."""
    file = Path(path) / STATE_FILE
    state = read_json(file, "pass RUN or RUN/checkpoints/step_N of a complete checkpoint, or resume from another "
                            "one", CheckpointError)
    if isinstance(state.get("extra"), dict):
        state = state["extra"]  # the retired sharded layout kept the trainer state there
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dsmoe training checkpoint; pass RUN or RUN/checkpoints/step_N")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} is a training checkpoint in the layout of an earlier dsmoe, which this one no "
                              "longer reads: resume it with the dsmoe that wrote it, or start a new run")
    return state


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (step_N with a state.json), oldest first."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.glob("step_*"):
        suffix = path.name[len("step_"):]
        if suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoints_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def clean_stale(checkpoints_dir: Path) -> None:
    """Remove the hidden folders of saves and prunes whose process is no longer alive. A save killed between its
    last write (state.json) and its rename is complete: it is renamed into place when its step is missing."""
    if not checkpoints_dir.is_dir():
        return
    for entry in sorted(checkpoints_dir.iterdir()):
        match = _HIDDEN.fullmatch(entry.name)
        if match is None or _alive(int(match[3])):
            continue
        final = checkpoints_dir / match[1]
        if match[2] == "tmp" and (entry / STATE_FILE).is_file() and not final.exists():
            try:
                os.replace(entry, final)
            except FileNotFoundError:  # another rank of the same run renamed it first
                pass
        else:
            shutil.rmtree(entry, ignore_errors=True)


# ---------------------------------------------------------------- tensors

def _module_and_keys(model) -> tuple[nn.Module, set[str] | None]:
    """The module, and the names a checkpoint holds of it: all (None), or, for a view with .model and
    state_dict() such as fine-tuning's TrainedState, the tensors it trains (the rest comes from its base)."""
    if isinstance(model, nn.Module):
        return model, None
    return model.model, set(model.state_dict())


def _model_state(module: nn.Module, keys: set[str] | None) -> dict[str, Any]:
    full = get_model_state_dict(module)
    return full if keys is None else {k: v for k, v in full.items() if k in keys}


def _load_tensors(path: Path, model, optimizer: torch.optim.Optimizer | None, state: dict) -> None:
    model, keys = _module_and_keys(model)
    model_state = _model_state(model, keys)
    payload: dict[str, Any] = {"model": model_state}
    if optimizer is not None:
        optim_state = get_optimizer_state_dict(model, optimizer)["state"]  # allocated here, filled in place below
        payload["optim"] = {fqn: {k: v for k, v in s.items() if torch.is_tensor(v)} for fqn, s in optim_state.items()}
    try:
        with one_process_is_intended():
            dcp.load(payload, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=not distributed())
    except (CheckpointException, RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} does not fit this model ({_reason(e)}): resume with the model config the "
                              "checkpoint was saved with") from None
    set_model_state_dict(model, model_state, options=StateDictOptions(strict=keys is None))
    if optimizer is not None:
        meta = state["optimizer"]
        for fqn, values in meta["scalars"].items():
            optim_state[fqn].update(values)
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                  for g in meta["param_groups"]]  # JSON has no tuples (AdamW's betas)
        set_optimizer_state_dict(model, optimizer, {"state": optim_state, "param_groups": groups})


def _split_optimizer(sd: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """DCP's optimizer state -> (its tensors, for DCP; its param groups and other values, for state.json)."""
    tensors = {fqn: {k: v for k, v in s.items() if torch.is_tensor(v)} for fqn, s in sd["state"].items()}
    scalars = {fqn: {k: v for k, v in s.items() if not torch.is_tensor(v)} for fqn, s in sd["state"].items()}
    return tensors, {"param_groups": sd["param_groups"], "scalars": {k: v for k, v in scalars.items() if v}}


def _reason(e: BaseException) -> str:
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]  # DCP wraps each rank's exception
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"


# ---------------------------------------------------------------- RNG states

def _save_rng(file: Path) -> None:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    host = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), int(pos), int(has_gauss),
                                                                  float(cached)]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # this rank's device only
        tensors["cuda"] = torch.cuda.get_rng_state()
    file.parent.mkdir(exist_ok=True)
    atomic_write(file, lambda tmp: save_file(tensors, tmp, metadata={"host_rng": json.dumps(host)}))


def _restore_rng(file: Path) -> None:
    with safe_open(file, "pt") as f:
        host = json.loads(f.metadata()["host_rng"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    version, internal, gauss = host["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = host["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


# ---------------------------------------------------------------- folders

def _delete(path: Path) -> None:
    """Out of the listed names first (one atomic rename), then deleted: a kill midway leaves a hidden folder."""
    doomed = path.with_name(f".{path.name}.deleting-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
