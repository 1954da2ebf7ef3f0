"""`dsmoe generate PATH --prompt TEXT [--stream]`: complete a prompt with a model folder's model."""

from __future__ import annotations

import argparse
import sys
import time

from dsmoe.errors import UserError
from dsmoe.infer.loading import (add_model_arguments, add_sampling_arguments, check_at_least_one, eos_ids,
                                 load_for_inference, speculative_options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    add_sampling_arguments(parser, temperature=0.8, max_new_tokens=128)
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="cache length (default: prompt + max-new-tokens)")


def generation_stats(count: int, first_count: int, start: float, first: float | None, end: float) -> str:
    """The stats line: the time to the first step's tokens apart from the rate after them, which is what
    decoding sustains (the first step pays for the prefill and any compilation or graph capture)."""
    line = f"[{count} tokens in {end - start:.2f} s"
    if first is not None and count > first_count:
        line += f": first after {first - start:.2f} s, then {(count - first_count) / max(end - first, 1e-9):.1f} " \
                "tokens/s"
    return line + "]"


def run(args: argparse.Namespace) -> int:
    from dsmoe.infer.engine import Engine
    from dsmoe.infer.sampling import SamplingParams
    from dsmoe.infer.text import stream_text

    check_at_least_one(args, ("max_model_len",))
    model, tokenizer, _ = load_for_inference(args)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise UserError("the prompt encodes to no tokens; give some text")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    max_len = len(prompt_ids) + args.max_new_tokens if args.max_model_len is None else args.max_model_len
    engine = Engine(model, max_batch=1, max_model_len=max_len, eos_token_ids=eos_ids(model, tokenizer),
                    cuda_graphs=not args.no_cuda_graphs, compile=args.compile, **speculative_options(args))
    start = time.perf_counter()
    first, first_count = None, 0  # when the first tokens arrived (after the prefill and any compilation), how many
    pieces, count = [], 0
    out = sys.stdout
    if args.stream:
        out.write(args.prompt)
        out.flush()
    for delta, step in stream_text(engine, tokenizer, prompt_ids, params, args.stop):
        count += len(step.token_ids)
        if first is None:
            first, first_count = time.perf_counter(), count
        pieces.append(delta)
        if args.stream and delta:
            out.write(delta)
            out.flush()
    if not args.stream:
        out.write(args.prompt + "".join(pieces))
    out.write("\n")
    out.flush()  # before the stats line on stderr: piped, stdout is block-buffered and the line landed mid-text
    print(generation_stats(count, first_count, start, first, time.perf_counter()), file=sys.stderr)
    stats = engine.speculation_stats()
    if stats:
        rates = ", ".join("-" if r is None else f"{r:.0%}" for r in stats["acceptance_rate"])
        per_step = f"{stats['tokens_per_step']:.2f} tokens per step; " if stats["tokens_per_step"] else ""
        print(f"[speculative ({stats['method']}): {per_step}drafts kept per position {rates}]", file=sys.stderr)
    return 0
