"""`dsmoe bench NAME ...`: each benchmark is a module dsmoe.bench.NAME with add_arguments(parser) and run(args).

Only the chosen benchmark's module is imported, so one benchmark's optional dependencies (transformers,
triton, torch.distributed) never stand in another's way.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "moe": "one MoE layer forward+backward: dense-GEMM ceiling, transformers, dsmoe reference/grouped/triton",
    "train": "whole-model training step: tokens/s and MFU of dsmoe vs transformers",
    "decode": "decode tokens/s at batch 1 and 32 vs transformers generate and the bandwidth bound",
    "quantize": "--quantize fp8/int8 vs unquantized: weights memory, perplexity, identical greedy continuations",
    "prefill": "prompt tokens/s of the engine's prefill vs transformers' forward on the same weights",
    "speculative": "decode tokens/s with speculative decoding (MTP or prompt lookup) vs plain, and the drafts' "
                   "acceptance",
    "scale": "expert-parallel weak scaling and all-to-all bandwidth under torchrun",
    "tasks": "dsmoe eval --task examples/s per task kind, batched vs one example at a time",
    "lmeval": "lm-eval requests/s of the in-process dsmoe model vs lm-eval's hf model on the same requests",
    "serve": "the OpenAI server under concurrent streaming clients: output tok/s, TTFT and ITL p50/p99",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "benchmarks; `dsmoe bench NAME --help` lists a benchmark's options. " + "; ".join(
        f"{name}: {text}" for name, text in BENCHMARKS.items())
    parser.add_argument("name", choices=list(BENCHMARKS), metavar="NAME", help=", ".join(BENCHMARKS))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options")


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"dsmoe.bench.{args.name}")
    from dsmoe.cli import HelpFormatter

    sub = argparse.ArgumentParser(prog=f"dsmoe bench {args.name}", description=BENCHMARKS[args.name],
                                  formatter_class=HelpFormatter)
    module.add_arguments(sub)
    return module.run(sub.parse_args(args.options))
