"""LoRA adapters in PEFT's layout: adapter_config.json + adapter_model.safetensors with PEFT's key names, so
`peft.PeftModel.from_pretrained(transformers_model, DIR)` loads what dsmoe trained (tested with peft 0.21).

Key names (transformers' module paths under PEFT's `base_model.model.` prefix):
  dense projection   base_model.model.model.layers.{i}.self_attn.q_proj.lora_{A,B}.weight     (target_modules)
  routed experts     base_model.model.model.layers.{i}.mlp.experts.base_layer.lora_{A,B}.weight  gate_up_proj
                     base_model.model.model.layers.{i}.mlp.experts.lora_{A,B}.weight             down_proj
                     (target_parameters; PEFT wraps gate_up_proj first, so it is the inner `base_layer`)
  fully trained      base_model.model.score.weight, base_model.model.model.layers.{i}.mlp.gate.weight /
                     .e_score_correction_bias (modules_to_save: the classification head, a trained router)

What PEFT cannot represent for DeepSeek: peft 0.21 rewrites the target_modules gate_proj / up_proj / down_proj of
deepseek_v2/v3 models onto the fused routed experts (its transformers-v4 compatibility map), so LoRA on the
dense MLP layers and the shared experts loads in dsmoe (and merges with `--merge`), but not in PEFT.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from dsmoe.atomic import atomic_write, atomic_write_text
from dsmoe.checkpoint.hf import CheckpointError, load_pretrained
from dsmoe.checkpoint.ranks import barrier, expected_two_step_gathers, rank
from dsmoe.finetune.lora import LoRASpec, apply_lora, lora_factors, merge_lora
from dsmoe.json_files import read_json

PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
EXPERT_SLOT = {"gate_up_proj": "base_layer.", "down_proj": ""}


def _peft_key(param_path: str, factor: str) -> str:
    """dsmoe adapted-parameter path -> PEFT key of its lora_A / lora_B factor."""
    module, _, name = param_path.rpartition(".")
    if module.endswith("mlp.experts"):
        return f"{PREFIX}model.{module}.{EXPERT_SLOT[name]}{factor}.weight"
    return f"{PREFIX}model.{module}.{factor}.weight"


def _hub_name(name: str) -> str:
    return name if name == "score.weight" else f"model.{name}"


def save_adapter(model: torch.nn.Module, folder: str | os.PathLike, spec: LoRASpec, *, base_model: str,
                 task_type: str = "CAUSAL_LM", modules_to_save: dict[str, torch.Tensor] | None = None) -> None:
    """Write the LoRA factors of `model` (and fully trained extra tensors, dsmoe names) into `folder`. A sharded
    model (FSDP2, expert parallel): every rank calls it, the factors are gathered and rank 0 writes."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    experts: dict[str, int] = {}  # lora_B keys of stacked experts -> number of experts (their columns reorder)
    target_modules, target_parameters = set(), set()
    for path, delta in lora_factors(model):
        for factor in ("lora_A", "lora_B"):
            tensors[_peft_key(path, factor)] = getattr(delta, factor)
        experts[_peft_key(path, "lora_B")] = delta.num_experts
        module, _, name = path.rpartition(".")
        if module.endswith("mlp.experts"):
            target_parameters.add(f"mlp.experts.{name}")
        else:
            target_modules.add(module.rsplit(".", 1)[-1])
    extra = modules_to_save or {}
    for name, tensor in extra.items():
        tensors[PREFIX + _hub_name(name)] = tensor
    with torch.no_grad(), expected_two_step_gathers():  # DTensors: every rank takes part in each gather
        tensors = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach() for k, v in tensors.items()}
    tensors = {k: _to_peft_columns(v, experts[k]) if k in experts else v for k, v in tensors.items()}
    if rank() != 0:
        barrier()  # rank 0 has written the folder when the call returns
        return
    # PEFT matches modules_to_save by name suffix: "score", and "mlp.gate" for every layer's router
    modules = (n.rsplit(".", 1)[0] for n in extra)
    saved_modules = sorted({m.split(".", 2)[-1] if m.startswith("layers.") else m for m in modules})
    config = {"peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model, "r": spec.rank,
              "lora_alpha": spec.alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "init_lora_weights": True, "inference_mode": True, "use_rslora": False, "use_dora": False,
              "target_modules": sorted(target_modules), "target_parameters": sorted(target_parameters) or None,
              "modules_to_save": saved_modules or None}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(
        {k: v.contiguous().cpu().clone() for k, v in tensors.items()}, tmp, metadata={"format": "pt"}))
    atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    barrier()


def _to_peft_columns(lora_B: torch.Tensor, experts: int) -> torch.Tensor:
    """Stacked experts' lora_B [out, E * r]: dsmoe's expert-major columns (e * r + j) -> PEFT's (j * E + e)."""
    return lora_B.view(lora_B.shape[0], experts, -1).transpose(1, 2).reshape(lora_B.shape[0], -1)


def _from_peft_columns(lora_B: torch.Tensor, experts: int) -> torch.Tensor:
    return lora_B.view(lora_B.shape[0], -1, experts).transpose(1, 2).reshape(lora_B.shape[0], -1)


def read_adapter_config(folder: Path) -> dict:
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {folder}: pass a folder written by `dsmoe finetune` or PEFT")
    config = read_json(file, "restore the file", CheckpointError)
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{file}: peft_type {config.get('peft_type')!r}; dsmoe reads LoRA adapters only")
    return config


def adapter_spec(config: dict) -> LoRASpec:
    targets = tuple(config.get("target_modules") or ()) + (("experts",) if config.get("target_parameters") else ())
    return LoRASpec(int(config["r"]), float(config["lora_alpha"]), targets)


def load_adapter(model: torch.nn.Module, folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Add the adapter's LoRA factors to `model` (in place). Returns its fully trained tensors (dsmoe names,
    e.g. "score.weight", "layers.1.mlp.gate.weight"). A factor whose shape or name does not fit the model
    (an adapter of another base model) is one clear error."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    file = folder / WEIGHTS_NAME
    if not file.is_file():
        raise CheckpointError(f"no {WEIGHTS_NAME} in {folder}: the adapter is incomplete")
    spec = adapter_spec(config)
    apply_lora(model, spec)
    expected = {_peft_key(path, f): getattr(delta, f) for path, delta in lora_factors(model)
                for f in ("lora_A", "lora_B")}
    experts = {_peft_key(path, "lora_B"): delta.num_experts for path, delta in lora_factors(model)}
    extra: dict[str, torch.Tensor] = {}
    base = config.get("base_model_name_or_path") or "its base model"
    with safe_open(file, "pt") as f, torch.no_grad():
        keys = set(f.keys())
        missing = sorted(set(expected) - keys)
        if missing:
            raise CheckpointError(f"{folder} is an adapter for another model ({base}): it has no {missing[0]}; "
                                  "pass the base model it was trained on")
        for key in keys:
            tensor = f.get_tensor(key)
            if key in expected:
                if tuple(tensor.shape) != tuple(expected[key].shape):
                    raise CheckpointError(f"{folder} is an adapter for another model ({base}): {key} has shape "
                                          f"{list(tensor.shape)}, this model needs {list(expected[key].shape)}; "
                                          "pass the base model it was trained on")
                expected[key].copy_(_from_peft_columns(tensor, experts[key]) if key in experts else tensor)
            elif key.startswith(PREFIX) and ".lora_" not in key:
                name = key[len(PREFIX):]
                extra[name[len("model."):] if name.startswith("model.") else name] = tensor
            else:
                raise CheckpointError(f"{folder}: {key} matches no layer of this model: it is an adapter for "
                                      f"another model ({base}); pass the base model it was trained on")
    return extra


def load_merged(folder: Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                moe_impl: str = "auto", quantize: str | None = None) -> torch.nn.Module:
    """A language-model adapter folder as a plain model, for generation, chat, serving and evaluation: its base
    (`base_model_name_or_path`, a folder on this machine) with the factors folded into the weights, as
    `dsmoe finetune --merge` does, and the adapter's fully trained tensors (routers) in place; quantized last."""
    config = read_adapter_config(folder)
    if config.get("task_type") == "SEQ_CLS":
        raise CheckpointError(f"{folder} is a classifier adapter: it does not hold the label names a classifier "
                              "needs; fine-tune with --merge for a classifier folder dsmoe and transformers load")
    base = config.get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise CheckpointError(f"{folder}: its base model {base!r} is not a model folder on this machine; put the "
                              f"base there or set base_model_name_or_path in {CONFIG_NAME}")
    model = load_pretrained(base, dtype=dtype, device=device, moe_impl=moe_impl)
    extra = load_adapter(model, folder)
    merge_lora(model)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for name, tensor in extra.items():
            if name not in tensors or tensors[name].shape != tensor.shape:
                raise CheckpointError(f"{folder}: {name} does not fit the base model {base}: it is an adapter for "
                                      "another model; pass the base it was trained on")
            tensors[name].copy_(tensor)
    if quantize:
        from dsmoe.model.quantized import quantize_model

        quantize_model(model, quantize)
    return model
