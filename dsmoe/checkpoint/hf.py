"""Hugging Face checkpoints: `load_pretrained` and `save_pretrained` in the hub layout.

Reads `config.json` plus `model.safetensors` or a sharded `model.safetensors.index.json`; accepts the hub's
per-expert keys and transformers 5's fused `experts.gate_up_proj` / `experts.down_proj`; dequantises
DeepSeek-V3 FP8 (e4m3) weights with their 128x128 `weight_scale_inv` blocks. V3's MTP modules are the layers
`model.layers.{num_hidden_layers + k}.*` (dsmoe `mtp.{k}.*`); their copies of the embedding and the output head
(`embed_tokens`, `shared_head.head`) are written on save and not read back (the model shares its own); a
config.json that announces MTP layers the files do not hold (transformers saves none) loads without them. The model is built on the meta device and each tensor is streamed
from the memory-mapped files into its place, so the weights are never held twice. Nothing is read with
pickle. `save_pretrained` writes per-expert keys and a hub-spelling config.json, which transformers loads.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsmoe.atomic import atomic_write, atomic_write_text
from dsmoe.checkpoint.hub_files import (
    RESTORE,
    check_weight_dtype,
    default_dtype,
    fp8_block,
    header_entry,
    open_checkpoint,
    read_config_json,
    read_tensor,
)
from dsmoe.checkpoint.quantized import QuantizedTargets
from dsmoe.checkpoint.ranks import barrier, expected_two_step_gathers, rank
from dsmoe.config import ConfigError, ModelConfig
from dsmoe.errors import CheckpointError, UserError
from dsmoe.kernels.quant import dequantize
from dsmoe.model.quantized import quantize_model
from dsmoe.model.classifier import SequenceClassifier, classifier_hub_fields, classifier_labels
from dsmoe.model.transformer import Transformer, cast_model

log = logging.getLogger(__name__)

# One map, both directions: dsmoe name pattern -> hub name pattern. "{}" is a layer index or a module
# name; "{e}" (hub side only) is an expert index, for the stacked expert tensors.
KEY_MAP: dict[str, str] = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "score.weight": "score.weight",  # the head of a sequence classifier (dsmoe.model.classifier)
    "layers.{}.input_layernorm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.post_attention_layernorm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.self_attn.{}.weight": "model.layers.{}.self_attn.{}.weight",
    "layers.{}.mlp.{}.weight": "model.layers.{}.mlp.{}.weight",  # dense gate/up/down_proj and the router
    "layers.{}.mlp.gate.e_score_correction_bias": "model.layers.{}.mlp.gate.e_score_correction_bias",
    "layers.{}.mlp.shared_experts.{}.weight": "model.layers.{}.mlp.shared_experts.{}.weight",
    "layers.{}.mlp.experts.gate_up_proj": "model.layers.{}.mlp.experts.{e}.{gate,up}_proj.weight",
    "layers.{}.mlp.experts.down_proj": "model.layers.{}.mlp.experts.{e}.down_proj.weight",
    # MTP modules (mtp.{k} in dsmoe = layers.{num_hidden_layers + k} here; see _mtp_name)
    "layers.{}.enorm.weight": "model.layers.{}.enorm.weight",
    "layers.{}.hnorm.weight": "model.layers.{}.hnorm.weight",
    "layers.{}.eh_proj.weight": "model.layers.{}.eh_proj.weight",
    "layers.{}.shared_head.norm.weight": "model.layers.{}.shared_head.norm.weight",
}
# The MTP layers' copies of the shared embedding and output head: written on save, skipped on load.
MTP_SHARED_COPIES = {"embed_tokens.weight": "model.layers.{}.embed_tokens.weight",
                     "lm_head.weight": "model.layers.{}.shared_head.head.weight"}
_MTP_COPY = re.compile(r"model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight$")
# transformers 5 keeps the experts fused in memory; its files (and some converted checkpoints) may too.
FUSED_EXPERT_KEYS = {
    "model.layers.{}.mlp.experts.gate_up_proj": "layers.{}.mlp.experts.gate_up_proj",
    "model.layers.{}.mlp.experts.down_proj": "layers.{}.mlp.experts.down_proj",
}


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"(\{\}|\{e\}|\{gate,up\})", template)
    groups = {"{}": r"([A-Za-z0-9_]+)", "{e}": r"(?P<e>\d+)", "{gate,up}": r"(?P<part>gate|up)"}
    return re.compile("".join(groups.get(p, re.escape(p)) for p in parts) + "$")


_HUB_TO_OURS = [(_pattern(hub), ours) for ours, hub in KEY_MAP.items()] + \
               [(_pattern(hub), ours) for hub, ours in FUSED_EXPERT_KEYS.items()]


def _mtp_name(name: str, num_hidden_layers: int, to_ours: bool) -> str:
    """layers.{L + k}.X <-> mtp.{k}.X (L = num_hidden_layers); other names unchanged."""
    m = re.match(r"(layers|mtp)\.(\d+)\.(.*)", name)
    if not m:
        return name
    kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
    if to_ours and kind == "layers" and i >= num_hidden_layers:
        return f"mtp.{i - num_hidden_layers}.{rest}"
    if not to_ours and kind == "mtp":
        return f"layers.{num_hidden_layers + i}.{rest}"
    return name


def hub_to_ours(key: str, num_hidden_layers: int) -> tuple[str, int | None, str | None] | None:
    """Hub key -> (dsmoe parameter name, expert index or None, "gate"/"up"/"down" or None)."""
    for pattern, ours in _HUB_TO_OURS:
        m = pattern.match(key)
        if not m:
            continue
        groups = [g for i, g in enumerate(m.groups(), 1) if i not in _named_indices(pattern)]
        name = _mtp_name(ours.format(*groups), num_hidden_layers, to_ours=True)
        e = m.groupdict().get("e")
        part = m.groupdict().get("part") or ("down" if e is not None else None)
        return name, (int(e) if e is not None else None), part
    return None


def _named_indices(pattern: re.Pattern) -> set[int]:
    return set(pattern.groupindex.values())


def ours_to_hub(name: str, tensor: torch.Tensor, config: ModelConfig):
    """dsmoe parameter -> [(hub key, tensor)], splitting stacked experts into per-expert tensors and adding the
    MTP layers' copies of the embedding and head."""
    L = config.num_hidden_layers
    copies = [name] + (["lm_head.weight"] if name == "embed_tokens.weight" and config.tie_word_embeddings else [])
    for shared in copies:
        if shared in MTP_SHARED_COPIES:
            for k in range(config.num_nextn_predict_layers):
                yield MTP_SHARED_COPIES[shared].format(L + k), tensor
    name = _mtp_name(name, L, to_ours=False)
    layer = name.split(".")[1] if name.startswith("layers.") else None
    if name.endswith("mlp.experts.gate_up_proj"):
        F = tensor.shape[1] // 2
        for e in range(tensor.shape[0]):
            yield f"model.layers.{layer}.mlp.experts.{e}.gate_proj.weight", tensor[e, :F]
            yield f"model.layers.{layer}.mlp.experts.{e}.up_proj.weight", tensor[e, F:]
        return
    if name.endswith("mlp.experts.down_proj"):
        for e in range(tensor.shape[0]):
            yield f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight", tensor[e]
        return
    yield (name if name in ("lm_head.weight", "score.weight") else f"model.{name}"), tensor


# ---------------------------------------------------------------- loading

def read_config(path: Path) -> tuple[ModelConfig, dict]:
    hf = read_config_json(path)
    try:
        return ModelConfig.from_hf_dict(hf), hf
    except ConfigError as e:
        raise ConfigError(f"{path / 'config.json'}: {e}; correct the file") from None


def checkpoint_files(path: str | os.PathLike) -> dict[str, Path]:
    """Tensor key -> file, once the index and every safetensors header have been checked (a bad folder raises)."""
    with ExitStack() as stack:
        return open_checkpoint(Path(path), stack)[0]


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, moe_impl: str = "auto",
                    quantize: str | None = None) -> Transformer:
    """Load a DeepSeek (16B / V2 / V2-Lite / V3) checkpoint or a dsmoe run folder into a Transformer (a
    SequenceClassifier when config.json's architectures name a ...ForSequenceClassification).

    dtype defaults to the checkpoint's (bf16 for FP8 checkpoints); the router stays fp32 regardless.
    quantize "fp8" | "int8": weight-only low precision for inference (dsmoe.kernels.quant); a V3 FP8
    checkpoint loaded with "fp8" keeps its own codes and scales. Every key, dtype and shape is checked against
    config.json on the meta device first, so a broken folder fails with a CheckpointError before any memory is
    allocated.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder: pass the folder that holds config.json")
    config, hf = read_config(path)
    saved_dtype = default_dtype(path, hf)  # checked even when a dtype is given: a folder is broken or not
    dtype = dtype or saved_dtype
    block = fp8_block(path, hf)
    with ExitStack() as stack:
        key_files, handles = open_checkpoint(path, stack)
        L, D = config.num_hidden_layers, config.num_nextn_predict_layers
        if D and not any(re.match(rf"model\.layers\.{L}\.", key) for key in key_files):
            log.info("config.json names %d MTP layer(s) but the checkpoint holds none (transformers saves none): "
                     "loading the model without them", D)
            config = config.replace(num_nextn_predict_layers=0)
        labels = classifier_labels(hf)
        with torch.device("meta"):
            model = Transformer(config, moe_impl) if labels is None else SequenceClassifier(config, labels, moe_impl)
        cast_model(model, dtype)
        if quantize:
            quantize_model(model, quantize)  # on the meta device: no full-precision copy is ever made
        quantized = QuantizedTargets(model, quantize, block) if quantize else None  # names and shapes only
        plan = _plan_copies(path, _targets(model, quantized), key_files, handles, config)
        model.to_empty(device=device or "cpu")
        quantized = QuantizedTargets(model, quantize, block) if quantize else None
        targets = _targets(model, quantized)
        with torch.no_grad():
            for key, file, name, expert, part in plan:
                tensor, scale_inv = read_tensor(handles[file], file, key), None
                if tensor.dtype == torch.float8_e4m3fn:
                    scale_file = key_files[key + "_scale_inv"]
                    scale_inv = read_tensor(handles[scale_file], scale_file, key + "_scale_inv")
                if quantized and name in quantized:
                    quantized.take(name, tensor, scale_inv, expert, part,
                                   lambda dest, t, e, p: _destination(dest, e, p).copy_(t))
                    continue
                if scale_inv is not None:
                    tensor = dequantize(tensor, scale_inv, torch.float32, block)
                _destination(targets[name], expert, part).copy_(tensor)
            filled = {name for _, _, name, _, _ in plan}
            for name, tensor in targets.items():
                if name not in filled:
                    tensor.zero_()  # only router biases get here: V2-style checkpoints carry none, start unbiased
    model.init_buffers()
    return model


def _targets(model: Transformer, quantized: QuantizedTargets | None) -> dict[str, torch.Tensor]:
    targets = dict(model.named_parameters())
    targets.update((n, b) for n, b in model.named_buffers()
                   if (quantized is not None and n in quantized) or n.endswith("e_score_correction_bias"))
    return targets


def _plan_copies(path: Path, targets: dict[str, torch.Tensor], key_files: dict[str, Path], handles: dict,
                 config: ModelConfig) -> list[tuple[str, Path, str, int | None, str | None]]:
    """(hub key, file, dsmoe name, expert, part) for every tensor to copy, after checking on the meta model that
    the keys, dtypes and shapes are those config.json implies and that nothing is missing."""
    L = config.num_hidden_layers
    plan = []
    pieces: dict[str, int] = {}  # name -> number of pieces (experts arrive in E or 2E pieces)
    mtp_skipped = 0
    for key, file in key_files.items():
        if key.endswith("weight_scale_inv"):
            continue  # read together with its weight
        layer = re.match(r"model\.layers\.(\d+)\.", key)
        if layer and int(layer.group(1)) >= L + config.num_nextn_predict_layers:
            mtp_skipped += 1
            continue
        if _MTP_COPY.match(key):
            continue  # the MTP layer's copy of the embedding or head: the model shares its own
        mapped = hub_to_ours(key, L)
        if mapped is None or mapped[0] not in targets:
            raise CheckpointError(f"{file}: unexpected key {key}: the checkpoint does not match its config.json "
                                  "(wrong model_type or layer count?)")
        name, expert, part = mapped
        shape, dtype = header_entry(handles[file], file, key)
        check_weight_dtype(file, key, dtype)
        if dtype == "F8_E4M3" and key + "_scale_inv" not in key_files:
            raise CheckpointError(f"{file}: FP8 tensor {key} has no {key}_scale_inv; {RESTORE}")
        dest = _destination(targets[name], expert, part, file, key)
        if list(dest.shape) != list(shape):
            raise CheckpointError(f"{file}: {key} has shape {list(shape)} but config.json implies {list(dest.shape)}: "
                                  "the checkpoint and its config.json disagree")
        plan.append((key, file, name, expert, part))
        pieces[name] = pieces.get(name, 0) + 1
    if mtp_skipped:
        log.info("skipped %d tensors of multi-token-prediction layer(s) beyond num_nextn_predict_layers=%d in "
                 "config.json", mtp_skipped, config.num_nextn_predict_layers)
    missing = [n for n in targets if n not in pieces and not n.endswith("e_score_correction_bias")]
    for name in (n for n in pieces if n.endswith(("experts.gate_up_proj", "experts.down_proj"))):
        E = targets[name].shape[0]
        expected = 2 * E if name.endswith("gate_up_proj") else E
        if pieces[name] not in (1, expected):  # 1 = a fused tensor
            missing.append(f"{name} ({pieces[name]} of {expected} expert tensors)")
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} weights missing from the checkpoint, e.g. "
                              f"{', '.join(missing[:3])} (dsmoe names): the files are incomplete or belong "
                              "to another config.json")
    return plan


def _destination(target: torch.Tensor, expert: int | None, part: str | None, file: Path | None = None,
                 key: str = "") -> torch.Tensor:
    """The part of a dsmoe tensor that one hub tensor fills (a view; shapes only on the meta device)."""
    if expert is None:
        return target
    if expert >= target.shape[0]:
        raise CheckpointError(f"{file}: {key} names expert {expert} but config.json has {target.shape[0]}")
    if part == "down":
        return target[expert]
    F = target.shape[1] // 2
    return target[expert, :F] if part == "gate" else target[expert, F:]


# ---------------------------------------------------------------- saving

def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise UserError(f"max_shard_size {size!r}: use bytes or a size like '5GB' or '500MB'")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def hub_state(model: Transformer):
    """(hub key, tensor) pairs in checkpoint order; experts split per expert (views, no copies)."""
    for name, tensor in model.state_dict().items():
        if name.endswith(("expert_counts", "aux_loss")):
            continue
        yield from ours_to_hub(name, tensor, model.config)


def _keeps_dtype(name: str) -> bool:
    """The router weight and bias stay fp32 in every export, as in the model."""
    return name.endswith(("mlp.gate.weight", "e_score_correction_bias"))


def _plan_files(sizes: dict[str, int], max_shard_size: int | str) -> dict[str, list[str]]:
    """File name -> the tensors it holds, in order; a new file starts where the next tensor would pass the limit
    (a tensor larger than the limit gets a file of its own)."""
    limit = _parse_size(max_shard_size)
    groups: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    return {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups)}


def save_pretrained(model: Transformer, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None) -> None:
    """Write config.json + safetensors (sharded with an index past max_shard_size) in the hub layout.

    The model may be sharded over ranks (FSDP2, expert parallel): then every rank calls it, each parameter is
    gathered in turn and rank 0 writes. Peak extra memory: one output file plus one gathered parameter. Each
    file is written under a temporary name and renamed into place, the index and config.json last, so an
    interrupted save never leaves a partial file under a real name.
    """
    path = Path(path)
    state = model.state_dict()  # sharded parameters are DTensors: their shapes and gathers are global

    def out_dtype(name: str, t: torch.Tensor) -> torch.dtype:
        return t.dtype if dtype is None or _keeps_dtype(name) or not t.is_floating_point() else dtype

    def hub_bytes(name: str, t: torch.Tensor) -> int:  # the per-expert pieces and MTP copies included
        shaped = torch.empty(t.shape, dtype=out_dtype(name, t), device="meta")
        return sum(v.numel() * v.element_size() for _, v in ours_to_hub(name, shaped, model.config))

    files = _plan_files({n: hub_bytes(n, t) for n, t in state.items()}, max_shard_size)
    if rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for file_name, names in files.items():
        tensors: dict[str, torch.Tensor] = {}
        for name in names:
            full = state[name].detach()
            if hasattr(full, "full_tensor"):  # a DTensor: every rank takes part in the gather
                with expected_two_step_gathers():
                    full = full.full_tensor()
            if rank() != 0:
                continue
            for key, t in ours_to_hub(name, full.to(out_dtype(name, full)).cpu(), model.config):
                tensors[key] = t.contiguous().clone()  # per-expert views share storage; safetensors refuses that
        if rank() == 0:
            weight_map.update(dict.fromkeys(tensors, file_name))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            atomic_write(path / file_name, lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": "pt"}))
        del tensors
    if rank() == 0:
        weights_dtype = dtype or next(t.dtype for n, t in state.items() if not _keeps_dtype(n))
        finish_hub_save(path, model.config, weight_map, total, weights_dtype,
                        classifier_hub_fields(model) if isinstance(model, SequenceClassifier) else None)
    barrier()


def finish_hub_save(path: Path, config: ModelConfig, weight_map: dict[str, str], total_bytes: int,
                    weights_dtype: torch.dtype, config_fields: dict | None = None) -> None:
    """After the safetensors files are in place: the index (when sharded), stale shards of an earlier save
    removed, and config.json (hub spelling) written last."""
    names = set(weight_map.values())
    index = path / "model.safetensors.index.json"
    if len(names) > 1:
        atomic_write_text(index, json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map},
                                            indent=2) + "\n")
    elif index.exists():
        index.unlink()
    for stale in path.glob("model*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    hf = config.to_hf_dict()
    hf["dtype"] = str(weights_dtype).replace("torch.", "")
    hf.update(config_fields or {})  # a classifier's architectures and labels
    atomic_write_text(path / "config.json", json.dumps(hf, indent=2) + "\n")


