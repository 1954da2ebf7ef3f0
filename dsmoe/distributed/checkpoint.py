"""Training checkpoints with torch.distributed.checkpoint (DCP), and export to the hub layout.

`save_checkpoint` writes the model (and optimizer) state sharded: every rank writes its own pieces, so
nothing is gathered. Storage is DCP's safetensors format (each file's header records where its pieces sit
in the full tensors) plus one JSON file: nothing is pickled, so loading runs no pickle either. A checkpoint
saved on N ranks loads on any other number (DCP reshards on load), also in one process without a process
group. The save is atomic: pieces go to `<path>.partial/`, which is renamed once every rank has finished.
Tensors that belong to one rank only (its RNG states) go to `ranks/rank_<r>.safetensors`; they are given back
only to the same rank at the same world size. `load_native_checkpoint` reads a one-process training checkpoint
(dsmoe.checkpoint.native, full tensors) into a sharded model the same way, each rank reading its own slices.

`export_hub` writes config.json + safetensors in the Hugging Face layout (the foundation's key map) from a
sharded model: one parameter at a time is gathered and one output file at a time is held, never the model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import (
    HuggingFaceStorageReader,
    HuggingFaceStorageWriter,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from dsmoe.atomic import atomic_write
from dsmoe.checkpoint.hf import (
    CheckpointError,
    _parse_size,
    finish_hub_save,
    ours_to_hub,
)

STATE_FILE = "state.json"  # optimizer hyper-parameters (param_groups) and the caller's extra state
RANKS_DIR = "ranks"  # one safetensors file per rank (outside the folder DCP's reader lists)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


@contextmanager
def _one_process_is_intended():
    """DCP warns whenever it runs without a process group; here that is a supported case, not a fallback."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    extra: dict | None = None, rank_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Save model (+ optimizer) state, a JSON-serialisable `extra` (step, data position, ...) and this rank's
    own `rank_tensors` (see load_rank_tensors). Every rank calls it."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    state: dict = {"model": get_model_state_dict(model)}
    meta: dict = {"extra": extra or {}, "world_size": _world_size()}
    if optimizer is not None:
        optim = get_optimizer_state_dict(model, optimizer)
        state["optim"] = optim["state"]
        meta["param_groups"] = optim["param_groups"]
    with _one_process_is_intended():
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(partial), save_distributed=True),
                 no_dist=not _distributed())
    if rank_tensors:
        (partial / RANKS_DIR).mkdir(exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in rank_tensors.items()},
                  partial / RANKS_DIR / f"rank_{_rank()}.safetensors")
    _barrier()
    if _rank() == 0:
        (partial / STATE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        previous = path.with_name(path.name + ".previous")
        if path.exists():  # keep the old checkpoint until the new one has its name
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(path, previous)
        os.replace(partial, path)
        shutil.rmtree(previous, ignore_errors=True)
    _barrier()


def load_checkpoint(path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load into an already built (and parallelised, any world size) model and optimizer, in place; returns
    the `extra` given to save_checkpoint. Every rank calls it."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a complete dsmoe distributed checkpoint (no {STATE_FILE}): "
                              "pass a checkpoints/step_N folder written by training")
    meta = json.loads(state_file.read_text())
    if optimizer is not None and "param_groups" not in meta:
        raise CheckpointError(f"{path} holds no optimizer state: resume needs a full training checkpoint")
    model_state = get_model_state_dict(model)
    state: dict = {"model": model_state}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)["state"]  # allocated, filled in place
    _read_into(path, state)
    _apply(model, optimizer, model_state, state.get("optim"), meta.get("param_groups"))
    return meta["extra"]


def load_native_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                           optimizer_meta: dict | None = None) -> None:
    """A one-process training checkpoint (dsmoe.checkpoint.native: full tensors in model.safetensors and
    optimizer.safetensors, the optimizer state keyed by parameter index) into a sharded model and optimizer
    built the same way: DCP's reader gives every rank its own slices of the full tensors, so no rank holds the
    whole model. optimizer_meta: the native state.json's "optimizer" entry. Every rank calls it."""
    model_state = get_model_state_dict(model)
    flat = dict(model_state)
    optim_state, param_groups = None, None
    if optimizer is not None:
        optim_state = get_optimizer_state_dict(model, optimizer)["state"]
        name_of = {id(p): n for n, p in model.named_parameters()}
        order = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]  # the native indices
        for index, name in enumerate(order):
            flat.update({f"state.{index}.{key}": t for key, t in optim_state[name].items() if torch.is_tensor(t)})
        for key, value in optimizer_meta["scalars"].items():
            index, name = key.split(".", 1)
            optim_state[order[int(index)]][name] = value
        param_groups = [{**g, "params": [order[i] for i in g["params"]]} for g in optimizer_meta["param_groups"]]
    _read_into(path, flat)
    _apply(model, optimizer, model_state, optim_state, param_groups)


def _read_into(path: Path, state: dict) -> None:
    """Fill the tensors of `state` in place from the safetensors files of `path` (each rank its own slices)."""
    try:
        with _one_process_is_intended():
            dcp.load(state, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=not _distributed())
    except (CheckpointException, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path} does not fit this model ({_reason(e)}): resume with the model config "
                              "the checkpoint was saved with") from None


def _apply(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict, optim_state: dict | None,
           param_groups: list | None) -> None:
    set_model_state_dict(model, model_state)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, {"state": optim_state, "param_groups": param_groups})


def load_rank_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """This rank's `rank_tensors` of save_checkpoint, or None where the checkpoint was written at another world
    size (or without them)."""
    path = Path(path)
    meta = json.loads((path / STATE_FILE).read_text())
    file = path / RANKS_DIR / f"rank_{_rank()}.safetensors"
    if meta.get("world_size") != _world_size() or not file.is_file():
        return None
    return load_file(file)


def _reason(e: BaseException) -> str:
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]  # DCP wraps each rank's exception
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


@contextmanager
def _expected_two_step_gathers():
    """Expert weights sharded over both mesh dimensions gather in two all-gathers, and DTensor warns about it on
    every rank; for an export, one parameter at a time, that is the plan, not a problem."""
    logger = logging.getLogger("torch.distributed.tensor._redistribute")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_hub(model: nn.Module, path: str | os.PathLike, max_shard_size: int | str = "5GB",
               dtype: torch.dtype | None = None) -> None:
    """config.json + model*.safetensors (+ index) in the hub layout, from a model sharded or not. Every rank
    calls it (each parameter is gathered collectively); rank 0 writes. Peak extra memory on rank 0: one
    output file plus one gathered parameter."""
    path = Path(path)
    limit = _parse_size(max_shard_size)
    state = get_model_state_dict(model)
    names = list(state)
    # Plan the files from the global shapes first, so each file is written once under its final name.
    files: list[list[str]] = [[]]
    size = 0
    for name in names:
        t = state[name]
        nbytes = t.numel() * (t.element_size() if dtype is None or _keeps_dtype(name) else dtype.itemsize)
        if files[-1] and size + nbytes > limit:
            files.append([])
            size = 0
        files[-1].append(name)
        size += nbytes
    file_names = ["model.safetensors"] if len(files) == 1 else \
        [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    if _rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for file_name, group in zip(file_names, files):
        tensors: dict[str, torch.Tensor] = {}
        for name in group:
            with _expected_two_step_gathers():
                full = _full(state[name].detach())
            if _rank() != 0:
                continue
            if dtype is not None and not _keeps_dtype(name) and full.is_floating_point():
                full = full.to(dtype)
            for key, t in ours_to_hub(name, full.cpu(), model.config):
                tensors[key] = t.contiguous().clone()  # per-expert views share storage; safetensors refuses that
        if _rank() == 0:
            weight_map.update(dict.fromkeys(tensors, file_name))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            atomic_write(path / file_name, lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": "pt"}))
        del tensors
    if _rank() == 0:
        weights_dtype = dtype or next(t.dtype for n, t in state.items() if not _keeps_dtype(n))
        finish_hub_save(path, model.config, weight_map, total, weights_dtype)
    _barrier()


def _keeps_dtype(name: str) -> bool:
    """The router weight and bias stay fp32 in every export, as in the model."""
    return name.endswith(("mlp.gate.weight", "e_score_correction_bias"))
