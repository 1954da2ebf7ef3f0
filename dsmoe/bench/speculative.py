"""`dsmoe bench speculative RUN --prompts FILE`: decode tokens/s, plain vs speculative (MTP drafts when the model
has an MTP module, prompt-lookup drafts for any model), and how often each draft position is kept.

Prompts are the first --prompt-len tokens of documents of a text or JSONL file (real text: a trained model's
drafts are kept far more often on text than on random ids), tokenized with the run folder's tokenizer. For each
batch size the engine decodes --new-tokens greedy tokens per sequence (the timing loop of `dsmoe bench decode`,
CUDA graphs after a warm-up run), once plainly and once per method and --num-speculative-tokens value; the table
gives tokens/s, the speed-up over plain decoding and the acceptance rate of every draft position. Prompt lookup
pays when the output repeats its context: time it with long prompts (--prompt-len) of the text you serve.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dsmoe.devices import add_device_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="model folder (with MTP layers, e.g. a run of `dsmoe train --mtp-layers 1`, "
                                     "for the mtp method)")
    parser.add_argument("--prompts", required=True, help="text or .jsonl file the prompts are cut from")
    parser.add_argument("--text-field", default="text", help="field of .jsonl records holding the text")
    parser.add_argument("--batch-sizes", default="1,32", help="comma-separated sequences decoded together")
    parser.add_argument("--methods", default=None,
                        help="comma-separated: mtp, ngram (default: both when the model has MTP modules, else ngram)")
    parser.add_argument("--num-speculative-tokens", default="1,2", help="comma-separated draft counts to time")
    parser.add_argument("--prompt-lookup-min", type=int, default=2, help="shortest n-gram the ngram method matches")
    parser.add_argument("--prompt-lookup-max", type=int, default=4, help="longest n-gram the ngram method matches")
    parser.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt, cut from --prompts")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence (greedy)")
    add_device_argument(parser)
    parser.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly on a GPU")
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
    methods = args.methods.split(",") if args.methods else ["mtp", "ngram"] if len(model.mtp) else ["ngram"]
    lookup = (args.prompt_lookup_min, args.prompt_lookup_max)
    prompts = text_prompts(args.prompts, args.text_field, tokenizer, max(batches), args.prompt_len)
    cuda_graphs = not args.no_cuda_graphs and device.type == "cuda"
    print(f"{args.path}: {len(model.mtp)} MTP module(s), {device}, methods {', '.join(methods)}, "
          f"prompts of {args.prompt_len} tokens from "
          f"{args.prompts}, {args.new_tokens} new tokens per sequence (greedy)", flush=True)
    results, rows = {}, []
    for batch in batches:
        plain = time_dsmoe(model, batch, args.prompt_len, args.new_tokens, cuda_graphs, compile=False,
                           prompts=prompts[:batch])
        results[f"batch{batch}-plain"] = plain
        rows.append((batch, "plain", plain["tokens_per_s"], 1.0, 1.0, ""))
        for method, n in ((m, n) for m in methods for n in drafts):
            spec = time_dsmoe(model, batch, args.prompt_len, args.new_tokens, cuda_graphs, compile=False,
                              prompts=prompts[:batch], speculative=method, num_speculative_tokens=n,
                              prompt_lookup=lookup)
            results[f"batch{batch}-{method}{n}"] = spec
            stats = spec["speculation"]
            rates = " ".join("-" if r is None else f"{r:.2f}" for r in stats["acceptance_rate"])
            rows.append((batch, f"{method} x{n}", spec["tokens_per_s"], spec["tokens_per_s"] / plain["tokens_per_s"],
                         stats["tokens_per_step"], rates))
        for row in rows[-1 - len(drafts) * len(methods):]:
            print(f"  batch {row[0]:>3} {row[1]:<8} {row[2]:10.1f} tokens/s  x{row[3]:.2f}  {row[4]:.2f} tokens/step  "
                  f"{row[5]}", flush=True)
    print("\n| batch | decoding | tokens/s | vs plain | tokens per step | acceptance per draft position |")
    print("|---:|---|---:|---:|---:|---|")
    for batch, name, tps, ratio, per_step, rates in rows:
        print(f"| {batch} | {name} | {tps:,.1f} | {ratio:.2f}x | {per_step:.2f} | {rates} |")
    if args.json:
        from dsmoe.atomic import atomic_write_text

        info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "args": vars(args)}
        atomic_write_text(Path(args.json), json.dumps({"info": info, "results": results}, indent=2, default=str) + "\n")
    return 0
