"""Hugging Face checkpoints: `load_pretrained` and `save_pretrained` in the hub layout.

Reads `config.json` plus `model.safetensors` or a sharded `model.safetensors.index.json`; accepts the hub's
per-expert keys and transformers 5's fused `experts.gate_up_proj` / `experts.down_proj` (the key map:
hub_keys.py); dequantises DeepSeek-V3 FP8 (e4m3) weights with their 128x128 `weight_scale_inv` blocks. V3's MTP
layers' copies of the embedding and output head are written on save and not read back (the model shares its
own); a config.json that announces MTP layers the files do not hold (transformers saves none) loads without them.
The model is built on the meta device and each tensor is streamed from the memory-mapped files into its place,
so the weights are never held twice; a model sharded before it is filled (`build_pretrained`, then FSDP2 / expert
parallelism) reads into each rank only the slices it holds. Nothing is read with pickle. `save_pretrained` writes
per-expert keys and a hub-spelling config.json, which transformers loads.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass
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
from dsmoe.checkpoint.hub_keys import MTP_COPY, hub_to_ours, ours_to_hub
from dsmoe.checkpoint.quantized import QuantizedTargets
from dsmoe.checkpoint.ranks import barrier, expected_two_step_gathers, local_part, rank
from dsmoe.config import ConfigError, ModelConfig
from dsmoe.errors import CheckpointError, UserError
from dsmoe.kernels.quant import dequantize
from dsmoe.model.quantized import quantize_model
from dsmoe.model.classifier import SequenceClassifier, classifier_hub_fields, classifier_labels
from dsmoe.model.transformer import Transformer, cast_model

log = logging.getLogger(__name__)

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

    A folder with a LoRA adapter in place of config.json (`dsmoe finetune --lora-rank R` without --merge, or PEFT)
    loads as its base with the adapter folded in (`peft_adapter.load_merged`).
    """
    if (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
        from dsmoe.checkpoint.peft_adapter import load_merged  # it builds on this module

        return load_merged(Path(path), dtype, device, moe_impl, quantize)
    model, weights = build_pretrained(path, dtype, moe_impl, quantize)
    model.to_empty(device=device or "cpu")
    weights.fill(model)
    return model


def build_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None, moe_impl: str = "auto",
                     quantize: str | None = None) -> tuple[Transformer, HubWeights]:
    """`load_pretrained` in two halves: the model on the meta device, checked against the files, and the
    HubWeights that fill it. In between the caller may add modules and shard the model (fine-tuning under
    torchrun: a head, LoRA, then FSDP2 and expert parallelism); `model.to_empty(device=...)` and
    `HubWeights.fill(model)` then read into each rank only the slices it holds."""
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
        targets = _targets(model, quantized)
        plan = _plan_copies(path, targets, key_files, handles, config, block)
    return model, HubWeights(path, plan, {name: tuple(t.shape) for name, t in targets.items()}, block, quantize)


@dataclass
class HubWeights:
    """What fills a model built by `build_pretrained`: (hub key, file, dsmoe name, expert, part) per tensor, and
    the shapes of the tensors they fill."""

    path: Path
    plan: list[tuple[str, Path, str, int | None, str | None]]
    shapes: dict[str, tuple[int, ...]]
    block: tuple[int, int]
    quantize: str | None = None

    @torch.no_grad()
    def fill(self, model: Transformer) -> list[str]:
        """Copy the checkpoint into `model` after its `to_empty`: a plain tensor whole; of a sharded one (a DTensor:
        FSDP2 rows, expert-parallel experts) only what this rank holds, read as slices of the files (an FP8 slice
        with the scale blocks it touches). Buffers start at zero (statistics; a V2-style checkpoint carries no
        router biases: unbiased), the derived ones are recomputed. Tensors replaced since `build_pretrained` by
        others of another shape, or gone (a classifier's new head over other labels; the LM head and MTP modules
        of a classifier built from a language model), are not read. Returns the parameters the checkpoint did not
        fill: those the caller added or replaced and must initialise itself."""
        quantized = QuantizedTargets(model, self.quantize, self.block) if self.quantize else None
        targets = _targets(model, quantized)
        for buffer in model.buffers():
            buffer.zero_()
        with ExitStack() as stack:
            key_files, handles = open_checkpoint(self.path, stack)
            plan = [entry for entry in self.plan
                    if entry[2] in targets and tuple(targets[entry[2]].shape) == self.shapes[entry[2]]]
            for key, file, name, expert, part in plan:
                if quantized and name in quantized:
                    tensor, scale_inv = _read(handles, key_files, file, key, None, None)
                    quantized.take(name, tensor, scale_inv, expert, part,
                                   lambda dest, t, e, p: _destination(dest, e, p).copy_(t))
                    continue
                piece = _local_piece(targets[name], expert, part)
                if piece is None:
                    continue  # another rank's slice
                box, dest = piece
                tensor, scale_inv = _read(handles, key_files, file, key, box, self.block)
                if scale_inv is not None:
                    offset = (0, 0) if box is None else (box[-2].start % self.block[0], box[-1].start % self.block[1])
                    tensor = dequantize(tensor, scale_inv, torch.float32, self.block, offset)
                dest.copy_(tensor)
        model.init_buffers()
        filled = {name for _, _, name, _, _ in plan}
        return [name for name in dict(model.named_parameters()) if _unparametrized(name) not in filled]


def _read(handles: dict, key_files: dict[str, Path], file: Path, key: str, box: tuple[slice, ...] | None,
          block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(a checkpoint tensor or its part `box`, the FP8 weight_scale_inv blocks that part touches or None)."""
    tensor = read_tensor(handles[file], file, key, box)
    if tensor.dtype != torch.float8_e4m3fn:
        return tensor, None
    scale_key = key + "_scale_inv"
    scale_box = None
    if box is not None:
        (rows, cols), (b0, b1) = box[-2:], block
        scale_box = (*box[:-2], slice(rows.start // b0, -(-rows.stop // b0)),
                     slice(cols.start // b1, -(-cols.stop // b1)))
    return tensor, read_tensor(handles[key_files[scale_key]], key_files[scale_key], scale_key, scale_box)


def _targets(model: Transformer, quantized: QuantizedTargets | None) -> dict[str, torch.Tensor]:
    """dsmoe name -> the tensor a checkpoint fills: parameters (a LoRA-adapted weight under its own name, not
    its parametrization's), router biases and quantized codes."""
    targets = {_unparametrized(n): p for n, p in model.named_parameters()}
    targets.update((n, b) for n, b in model.named_buffers()
                   if (quantized is not None and n in quantized) or n.endswith("e_score_correction_bias"))
    return targets


def _unparametrized(name: str) -> str:
    """x.parametrizations.weight.original -> x.weight (torch.nn.utils.parametrize keeps the weight there)."""
    return name.replace(".parametrizations.", ".").removesuffix(".original") if ".parametrizations." in name else name


def _check_scale_inv(key: str, shape: list[int], key_files: dict[str, Path], handles: dict,
                     block: tuple[int, int]) -> None:
    """An FP8 weight's scale_inv must exist and hold one scale per block: a cut scale would broadcast silently."""
    scale_key = key + "_scale_inv"
    if scale_key not in key_files:
        raise CheckpointError(f"{key_files[key]}: FP8 tensor {key} has no {scale_key}; {RESTORE}")
    scale_shape, _ = header_entry(handles[key_files[scale_key]], key_files[scale_key], scale_key)
    blocks = [*shape[:-2], *(-(-n // b) for n, b in zip(shape[-2:], block))]
    if list(scale_shape) != blocks:
        raise CheckpointError(f"{key_files[scale_key]}: {scale_key} has shape {list(scale_shape)}, but {key} "
                              f"{list(shape)} in blocks of {list(block)} needs {blocks}; {RESTORE}")


def _plan_copies(path: Path, targets: dict[str, torch.Tensor], key_files: dict[str, Path], handles: dict,
                 config: ModelConfig, block: tuple[int, int]) -> list[tuple[str, Path, str, int | None, str | None]]:
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
        if MTP_COPY.match(key):
            continue  # the MTP layer's copy of the embedding or head: the model shares its own
        mapped = hub_to_ours(key, L)
        if mapped is None or mapped[0] not in targets:
            raise CheckpointError(f"{file}: unexpected key {key}: the checkpoint does not match its config.json "
                                  "(wrong model_type or layer count?)")
        name, expert, part = mapped
        shape, dtype = header_entry(handles[file], file, key)
        check_weight_dtype(file, key, dtype)
        if dtype == "F8_E4M3":
            _check_scale_inv(key, shape, key_files, handles, block)
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


def _hub_box(shape: torch.Size, expert: int | None, part: str | None) -> list[slice]:
    """Where one hub tensor lies in the dsmoe tensor of `shape`, a slice per dimension (an expert's hub tensor
    is one index of the stacked experts' dimension 0, its gate / up half the first / second half of dim 1)."""
    if expert is None:
        return [slice(0, n) for n in shape]
    F = shape[1] // 2
    rows = {"down": slice(0, shape[1]), "gate": slice(0, F), "up": slice(F, 2 * F)}[part]
    return [slice(expert, expert + 1), rows, slice(0, shape[2])]


def _destination(target: torch.Tensor, expert: int | None, part: str | None, file: Path | None = None,
                 key: str = "") -> torch.Tensor:
    """The part of a dsmoe tensor that one hub tensor fills (a view; shapes only on the meta device)."""
    if expert is not None and expert >= target.shape[0]:
        raise CheckpointError(f"{file}: {key} names expert {expert} but config.json has {target.shape[0]}")
    view = target[tuple(_hub_box(target.shape, expert, part))]
    return view if expert is None else view[0]


def _local_piece(target: torch.Tensor, expert: int | None, part: str | None
                 ) -> tuple[tuple[slice, ...] | None, torch.Tensor] | None:
    """(the slices of one hub tensor that this process holds of `target`, None for all of it; the view of its
    local tensor they fill), or None when it holds none of it. A plain tensor holds all (the _destination)."""
    local, offset = local_part(target)
    spans = _hub_box(target.shape, expert, part)
    box, dest = [], []
    for dim, (span, start, size) in enumerate(zip(spans, offset, local.shape)):
        lo, hi = max(span.start, start), min(span.stop, start + size)
        if lo >= hi:
            return None
        dest.append(slice(lo - start, hi - start))
        if expert is None or dim > 0:  # the expert index is no dimension of its hub tensor
            box.append(slice(lo - span.start, hi - span.start))
    whole = all(s.stop - s.start == span.stop - span.start for s, span in zip(box, spans[expert is not None:]))
    view = local[tuple(dest)]
    return (None if whole else tuple(box)), (view if expert is None else view[0])


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


