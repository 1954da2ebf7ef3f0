"""The files of a hub checkpoint folder, read defensively: config.json, the shard index and every safetensors
header are checked before any weight is allocated, and each way they can be broken ends in a CheckpointError
(a UserError) naming the file, what is wrong and the fix. Nothing is read with pickle: a pickle under a
.safetensors name is just a file with an invalid header.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from dsmoe.devices import DTYPES
from dsmoe.errors import CheckpointError
from dsmoe.json_files import read_json

INDEX = "model.safetensors.index.json"
# safetensors dtype -> what dsmoe loads it as; FP8 weights come with their weight_scale_inv blocks
WEIGHT_DTYPES = ("F64", "F32", "BF16", "F16", "F8_E4M3")
RESTORE = "restore it from the original checkpoint (or re-download / re-convert it)"


def read_config_json(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"no config.json in {path}: pass a folder holding a Hugging Face DeepSeek "
                              "checkpoint or a dsmoe run folder")
    return read_json(file, RESTORE, CheckpointError)


def default_dtype(path: Path, hf: dict[str, Any]) -> torch.dtype:
    """The checkpoint's weight dtype (bf16 for FP8 checkpoints, dequantised as DeepSeek's fp8_cast_bf16 does)."""
    if hf.get("quantization_config"):
        return torch.bfloat16
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    dtype = DTYPES.get(str(name).replace("torch.", ""))
    if dtype is None:
        raise CheckpointError(f"{path / 'config.json'}: dtype {name!r} is not a weight dtype dsmoe loads "
                              f"({', '.join(DTYPES)}); correct the file")
    return dtype


def fp8_block(path: Path, hf: dict[str, Any]) -> tuple[int, int]:
    block = (hf.get("quantization_config") or {}).get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{path / 'config.json'}: quantization_config.weight_block_size {block!r} is not two "
                              "positive integers (DeepSeek-V3 uses [128, 128]); correct the file")
    return block[0], block[1]


def open_checkpoint(path: Path, stack: ExitStack) -> tuple[dict[str, Path], dict[Path, Any]]:
    """-> (tensor key -> file, file -> open safetensors handle), from the index when sharded, else from the single
    model.safetensors; every key the index lists is checked to be in its file."""
    index = path / INDEX
    if index.is_file():
        weight_map = read_json(index, RESTORE, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has no weight_map of tensor names to file names; {RESTORE}")
        for name in set(weight_map.values()):
            if Path(name).name != name or not name.endswith(".safetensors"):
                raise CheckpointError(f"{index} lists {name!r}, which is not a file name of a .safetensors file "
                                      f"beside it; {RESTORE}")
            if not (path / name).is_file():
                raise CheckpointError(f"shard {name} listed in {index.name} is missing from {path}: "
                                      "download or copy the complete checkpoint")
        key_files = {key: path / name for key, name in weight_map.items()}
    else:
        single = path / "model.safetensors"
        if not single.is_file():
            found = ", ".join(sorted(p.name for p in path.glob("*.bin"))) or "none"
            raise CheckpointError(f"no model.safetensors or {INDEX} in {path} (.bin files: {found}); dsmoe reads "
                                  "safetensors only, never pickle: convert the checkpoint")
        key_files = None
    files = sorted(set(key_files.values())) if key_files else [path / "model.safetensors"]
    handles = {file: _open(file, stack) for file in files}
    if key_files is None:
        return {key: files[0] for key in handles[files[0]].keys()}, handles
    held = {file: set(handle.keys()) for file, handle in handles.items()}
    for key, file in key_files.items():
        if key not in held[file]:
            raise CheckpointError(f"{file} does not hold {key}, which {INDEX} says it does: the file is incomplete "
                                  f"or from another download; {RESTORE}")
    return key_files, handles


def _open(file: Path, stack: ExitStack):
    try:
        return stack.enter_context(safe_open(file, "pt", device="cpu"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is not a valid safetensors file ({_reason(e)}); {RESTORE}") from None


def header_entry(handle, file: Path, key: str) -> tuple[list[int], str]:
    """(shape, safetensors dtype) of a tensor from its file's header, without reading its data."""
    piece = handle.get_slice(key)
    return piece.get_shape(), piece.get_dtype()


def check_weight_dtype(file: Path, key: str, dtype: str) -> None:
    if dtype not in WEIGHT_DTYPES:
        raise CheckpointError(f"{file}: {key} has dtype {dtype}; dsmoe reads {', '.join(WEIGHT_DTYPES)} weights "
                              "(FP8 with weight_scale_inv blocks): convert the checkpoint to one of them")


def read_tensor(handle, file: Path, key: str, box: tuple[slice, ...] | None = None) -> torch.Tensor:
    """The tensor, or only the part `box` selects (one slice per dimension): safetensors then reads just those
    bytes of the memory-mapped file."""
    try:
        return handle.get_tensor(key) if box is None else handle.get_slice(key)[box]
    except (SafetensorError, OSError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: {key} cannot be read ({_reason(e)}); {RESTORE}") from None


def _reason(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
