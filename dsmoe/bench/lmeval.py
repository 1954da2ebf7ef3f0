"""`dsmoe bench lmeval`: requests/s of lm-eval's `dsmoe` model against its `hf` model (transformers loading the
same folder, the same batch size and dtype) on the same lm-eval requests, and how far their answers differ.

Requests are built from the shared data as lm-eval's tasks would build them (no `datasets` needed):
loglikelihood = each rt_polarity review with " negative" / " positive" as continuations, loglikelihood_rolling
= the reviews themselves, generate_until = xquad_en questions until a newline. Each model runs every request
type twice over the same requests: the second pass is the number (the first, also reported, includes CUDA
graph capture and Triton's autotuning of each new shape, a one-time cost per process). Needs lm-eval (pip install
'dsmoe[eval]') and accelerate, which lm-eval's hf model imports.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from dsmoe.devices import add_device_argument
from dsmoe.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder (default: random weights of --preset)")
    parser.add_argument("--preset", default="small", help="preset for the random model")
    parser.add_argument("--data-dir", default=os.environ.get("DSMOE_SHARED_DATA", "../shared/data"),
                        help="folder with rt_polarity_test.jsonl and xquad_en_test.jsonl")
    parser.add_argument("--limit", type=int, default=64, help="documents per request type")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of both models")
    parser.add_argument("--max-gen-toks", type=int, default=32, help="tokens per generate_until request at most")
    add_device_argument(parser)
    parser.add_argument("--json", help="write the numbers to this JSON file")


def build_requests(data: Path, limit: int, max_gen_toks: int) -> dict[str, list]:
    from lm_eval.api.instance import Instance

    def rows(name):
        path = data / f"{name}_test.jsonl"
        if not path.is_file():
            raise UserError(f"no {path.name} in {data}: pass --data-dir (the shared data folder)")
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:limit]]

    reviews, questions = rows("rt_polarity"), rows("xquad_en")
    pairs = [(f"Review: {r['text']}\nSentiment:", f" {label}") for r in reviews for label in ("negative", "positive")]
    prompts = [f"Context: {q['context']}\nQuestion: {q['question']}\nAnswer:" for q in questions]
    gen = {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False}
    return {
        "loglikelihood": [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
        "loglikelihood_rolling": [Instance("loglikelihood_rolling", {}, (r["text"],), i)
                                  for i, r in enumerate(reviews)],
        "generate_until": [Instance("generate_until", {}, (p, gen), i) for i, p in enumerate(prompts)],
    }


def timed(method, requests, device) -> tuple[float, list]:
    import torch

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    answers = method(requests, disable_tqdm=True)
    sync()
    return time.perf_counter() - start, answers


def run(args: argparse.Namespace) -> int:
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise UserError(f"dsmoe bench lmeval needs lm-eval and accelerate ({e}): pip install 'dsmoe[eval]' "
                        "accelerate") from None
    import torch

    from dsmoe.bench.tasks import random_model_folder
    from dsmoe.devices import resolve_device
    from dsmoe.tasks.lm_eval_model import DsmoeLM

    device = resolve_device(args.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    requests = build_requests(Path(args.data_dir), args.limit, args.max_gen_toks)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else random_model_folder(args.preset, Path(tmp), device)
        makers = {
            "dsmoe": lambda: DsmoeLM(str(folder), device=str(device), dtype=dtype, batch_size=args.batch_size),
            "hf": lambda: HFLM(pretrained=str(folder), device=str(device), dtype=dtype, batch_size=args.batch_size),
        }
        for name, make in makers.items():
            lm = make()
            results[name] = {}
            for kind, reqs in requests.items():
                method = getattr(lm, kind)
                cold, _ = timed(method, reqs, device)  # first pass: CUDA graphs, Triton autotuning per shape
                seconds, answers = timed(method, reqs, device)
                results[name][kind] = {"seconds": seconds, "cold_seconds": cold, "answers": answers}
                print(f"{name} {kind}: {len(reqs) / seconds:.1f} requests/s ({len(reqs) / cold:.1f} on the first "
                      "pass)", flush=True)
            del lm
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rows = []
    for kind, reqs in requests.items():
        ours, hf = results["dsmoe"][kind], results["hf"][kind]
        if kind == "generate_until":
            agree = sum(a == b for a, b in zip(ours["answers"], hf["answers"])) / len(reqs)
        else:
            first = (lambda x: x[0]) if kind == "loglikelihood" else (lambda x: x)
            diffs = [abs(first(a) - first(b)) / max(abs(first(b)), 1e-9)
                     for a, b in zip(ours["answers"], hf["answers"])]
            agree = max(diffs)
        rows.append({"request": kind, "requests": len(reqs), "dsmoe_per_s": len(reqs) / ours["seconds"],
                     "hf_per_s": len(reqs) / hf["seconds"], "speedup": hf["seconds"] / ours["seconds"],
                     "first_pass_speedup": hf["cold_seconds"] / ours["cold_seconds"],
                     "agreement": agree})
    print(f"\n{'request type':<22} {'n':>5} {'dsmoe req/s':>12} {'hf req/s':>10} {'speed-up':>9} {'1st pass':>9}  "
          "agreement")
    for r in rows:
        what = "same text" if r["request"] == "generate_until" else "max rel. diff"
        print(f"{r['request']:<22} {r['requests']:>5} {r['dsmoe_per_s']:>12.1f} {r['hf_per_s']:>10.1f} "
              f"{r['speedup']:>8.1f}x {r['first_pass_speedup']:>8.1f}x  {what} {r['agreement']:.3g}")
    if args.json:
        from dsmoe.atomic import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps({"device": str(device), "dtype": dtype, "preset": args.preset,
                                                       "model": args.model, "batch_size": args.batch_size,
                                                       "rows": rows}, indent=2) + "\n")
    return 0
