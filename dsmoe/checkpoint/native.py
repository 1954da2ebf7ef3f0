"""Training checkpoints: everything a run needs to continue bit for bit, with no pickle anywhere.

RUN/checkpoints/step_N/
  model.safetensors      every parameter and persistent buffer (dsmoe names; the aux-free router biases too)
  optimizer.safetensors  the optimizer state tensors, flattened to "state.<param index>.<name>"
  rng.safetensors        torch CPU (and CUDA) generator states (uint8 tensors)
  state.json             step, data position, counters, schedule, optimizer param groups, python/numpy RNG
                         states, the training and model configs

A checkpoint is written into a hidden temporary folder and renamed into place, so a crash during a save
leaves the previous checkpoints untouched and never a partial step_N. Only the last K are kept.

Runs under torchrun write the same state into a sharded checkpoint instead (dsmoe.train.checkpoints,
dsmoe.distributed.checkpoint: state.json holds it under "extra"); read_state and load_model read both.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dsmoe.config import ModelConfig
from dsmoe.errors import UserError
from dsmoe.model.transformer import Transformer

FORMAT = "dsmoe-train-checkpoint"
VERSION = 1


def save_checkpoint(checkpoints_dir: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int = 0) -> Path:
    """Write checkpoints_dir/step_{step} atomically, then drop all but the newest `keep` (0 = keep all)."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step_{step}"
    tmp = checkpoints_dir / f".step_{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(_cpu(model.state_dict()), tmp / "model.safetensors", metadata={"format": "pt"})
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, tmp / "optimizer.safetensors", metadata={"format": "pt"})
        rng_json, rng_tensors = capture_rng()
        save_file(rng_tensors, tmp / "rng.safetensors", metadata={"format": "pt"})
        meta = {"format": FORMAT, "version": VERSION, "step": step, **state, "optimizer": opt_meta, "rng": rng_json,
                "model_config": model.config.to_hf_dict()}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n")
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if keep > 0:
        for old in list_checkpoints(checkpoints_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints (step_N with a state.json), oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.glob("step_*"):
        suffix = path.name[len("step_"):]
        if suffix.isdigit() and (path / "state.json").is_file():
            found.append((int(suffix), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def read_state(path: Path) -> dict[str, Any]:
    file = path / "state.json"
    try:
        state = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{file} cannot be read ({e}); resume from another checkpoint or start a new run") from None
    if "extra" in state:  # sharded (written under torchrun)
        state = state["extra"]
    if state.get("format") != FORMAT:
        raise UserError(f"{path} is not a dsmoe training checkpoint; pass RUN or RUN/checkpoints/step_N")
    return state


def load_checkpoint(path: Path, model: Transformer, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng_states: bool = True) -> dict[str, Any]:
    """Load weights (and the optimizer and RNG states) in place; returns state.json's contents."""
    state = read_state(path)
    device = next(model.parameters()).device
    try:
        model.load_state_dict(load_file(path / "model.safetensors", device=str(device)))
    except RuntimeError as e:
        raise UserError(f"{path}/model.safetensors does not fit this model ({str(e).splitlines()[0]}); "
                        "resume with the config the run was started with") from None
    if optimizer is not None:
        optimizer.load_state_dict(_unflatten_optimizer(load_file(path / "optimizer.safetensors"), state["optimizer"]))
    if restore_rng_states:
        restore_rng(state["rng"], load_file(path / "rng.safetensors"))
    return state


def load_model(path: Path, device: torch.device | str = "cpu", moe_impl: str = "auto") -> Transformer:
    """The model of a checkpoint folder alone (for evaluation), fp32."""
    config = ModelConfig.from_hf_dict(read_state(path)["model_config"])
    with torch.device("meta"):
        model = Transformer(config, moe_impl)
    model.to_empty(device=device)
    if (path / "model.safetensors").is_file():
        model.load_state_dict(load_file(path / "model.safetensors", device=str(device)))
    else:  # sharded: DCP gathers the pieces into this one process
        from dsmoe.distributed.checkpoint import load_checkpoint

        load_checkpoint(path, model)
    model.init_buffers()
    return model


# ---------------------------------------------------------------- RNG states

def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    as_json = {"python": [version, list(internal), gauss],
               "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    return as_json, tensors


def restore_rng(as_json: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = as_json["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = as_json["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------- helpers

def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, param_state in sd["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return _cpu(tensors), {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    state = dict(sorted(state.items()))  # safetensors lists keys alphabetically ("10" before "2")
    groups = [dict(g) for g in meta["param_groups"]]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename src to dst; an existing dst (the same step saved again) is moved aside first, then removed."""
    if not dst.exists():
        os.replace(src, dst)
        return
    aside = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(dst, aside)
    os.replace(src, dst)
    shutil.rmtree(aside, ignore_errors=True)
