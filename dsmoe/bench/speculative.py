"""`dsmoe bench speculative RUN --prompts FILE`: decode tokens/s of a model with an MTP module, plain vs
self-speculative (--speculative mtp), and how often each draft position is kept.

Prompts are the first --prompt-len tokens of documents of a text or JSONL file (real text: a trained model's
drafts are kept far more often on text than on random ids), tokenized with the run folder's tokenizer. For each
batch size the engine decodes --new-tokens greedy tokens per sequence (the timing loop of `dsmoe bench decode`,
CUDA graphs after a warm-up run), once plainly and once per --num-speculative-tokens value; the table gives
tokens/s, the speed-up over plain decoding and the acceptance rate of every draft position.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="model folder with MTP layers (a run of `dsmoe train --mtp-layers 1`)")
    parser.add_argument("--prompts", required=True, help="text or .jsonl file the prompts are cut from")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--num-speculative-tokens", default="1,2", help="comma-separated draft counts to time")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--json", default=None, help="write all results to this JSON file")
    from dsmoe.infer.loading import add_quantize_argument

    add_quantize_argument(parser)  # speculation on quantized weights too


def text_prompts(path: str, text_field: str, tokenizer, count: int, length: int) -> list[list[int]]:
    from dsmoe.data.prepare import read_documents
    from dsmoe.errors import UserError

    prompts = []
    for doc in read_documents([path], text_field, None):
        ids = tokenizer.encode(doc.text)
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == count:
            return prompts
    raise UserError(f"{path} has {len(prompts)} documents of at least {length} tokens; {count} are needed")


def run(args: argparse.Namespace) -> int:
    import torch

    from dsmoe.bench.decode import time_dsmoe
    from dsmoe.infer.loading import load_for_inference

    args.dtype, args.moe_impl = "auto", "auto"
    model, tokenizer, device = load_for_inference(args)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    drafts = [int(n) for n in args.num_speculative_tokens.split(",")]
    prompts = text_prompts(args.prompts, args.text_field, tokenizer, max(batches), args.prompt_len)
    cuda_graphs = not args.no_cuda_graphs and device.type == "cuda"
    print(f"{args.path}: {len(model.mtp)} MTP module(s), {device}, prompts of {args.prompt_len} tokens from "
          f"{args.prompts}, {args.new_tokens} new tokens per sequence (greedy)", flush=True)
    results, rows = {}, []
    for batch in batches:
        plain = time_dsmoe(model, batch, args.prompt_len, args.new_tokens, cuda_graphs, compile=False,
                           prompts=prompts[:batch])
        results[f"batch{batch}-plain"] = plain
        rows.append((batch, "plain", plain["tokens_per_s"], 1.0, ""))
        for n in drafts:
            spec = time_dsmoe(model, batch, args.prompt_len, args.new_tokens, cuda_graphs, compile=False,
                              prompts=prompts[:batch], speculative="mtp", num_speculative_tokens=n)
            results[f"batch{batch}-mtp{n}"] = spec
            rates = " ".join(f"{r:.2f}" for r in spec["speculation"]["acceptance_rate"])
            rows.append((batch, f"mtp x{n}", spec["tokens_per_s"], spec["tokens_per_s"] / plain["tokens_per_s"],
                         rates))
        for row in rows[-1 - len(drafts):]:
            print(f"  batch {row[0]:>3} {row[1]:<8} {row[2]:10.1f} tokens/s  x{row[3]:.2f}  {row[4]}", flush=True)
    print("\n| batch | decoding | tokens/s | vs plain | acceptance per draft position |")
    print("|---:|---|---:|---:|---|")
    for batch, name, tps, ratio, rates in rows:
        print(f"| {batch} | {name} | {tps:,.1f} | {ratio:.2f}x | {rates} |")
    if args.json:
        from dsmoe.atomic import atomic_write_text

        info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "args": vars(args)}
        atomic_write_text(Path(args.json), json.dumps({"info": info, "results": results}, indent=2, default=str) + "\n")
    return 0
