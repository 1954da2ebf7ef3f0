"""`dsmoe bench NAME ...`: each benchmark is a module dsmoe.bench.NAME with add_arguments(parser) and run(args)."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "moe": "one MoE layer forward+backward: dense-GEMM ceiling, transformers, dsmoe reference/grouped/triton",
    "train": "whole-model training step: tokens/s and MFU of dsmoe vs transformers",
    "decode": "decode tokens/s at batch 1 and 32 vs transformers generate and the bandwidth bound",
    "scale": "expert-parallel weak scaling and all-to-all bandwidth under torchrun",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="NAME", required=True)
    for name, help_text in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(_module=f"dsmoe.bench.{name}")
        # each module declares its own flags and keeps heavy imports (transformers, triton) inside run()
        try:
            importlib.import_module(f"dsmoe.bench.{name}").add_arguments(p)
        except ModuleNotFoundError:
            pass


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(args._module).run(args)
