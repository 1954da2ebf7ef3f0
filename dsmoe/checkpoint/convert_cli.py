"""`dsmoe convert SRC DST`: re-save a checkpoint in the hub layout (e.g. FP8 -> bf16, another shard size)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dsmoe.devices import DTYPES
from dsmoe.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="folder with config.json and safetensors (hub checkpoint or dsmoe run)")
    parser.add_argument("dst", type=Path, help="output folder (created; files in it are replaced)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weight dtype to write (default: the source's; FP8 sources load as bfloat16)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB or 500MB")


def run(args: argparse.Namespace) -> int:
    from dsmoe.checkpoint.hf import load_pretrained, save_pretrained
    from dsmoe.data.tokenizer import copy_tokenizer_files

    if args.dst.resolve() == args.src.resolve():
        raise UserError("dst must differ from src: pick a new output folder")
    dtype = DTYPES[args.dtype] if args.dtype else None
    model = load_pretrained(args.src, dtype=dtype)
    save_pretrained(model, args.dst, max_shard_size=args.max_shard_size, dtype=dtype)
    copy_tokenizer_files(args.src, args.dst)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst} ({n / 1e6:.1f}M parameters, {model.config.model_type})")
    return 0
