"""`dsmoe bench prefill`: prompt tokens/s of the engine's prefill vs transformers' forward on the same weights.

For each preset (random weights built on the device) and batch size: the dsmoe number is the Engine that
generate, chat and serve drive, given `batch` prompts of --prompt-len tokens with one new token each, timed from
the first request to the last first token (its prefill at --prefill-chunk tokens per step, as `dsmoe serve
--prefill-chunk` runs it, plus one sampling step; by default every prompt fits one step, so the engine prefills
them in one padded forward as transformers does); transformers is DeepseekV2/V3ForCausalLM with the same config and
weights copied in memory, one forward with a cache over the same prompts (what its `generate` does before the
first token), for each experts implementation asked for. The table prints last; --json writes every number.
"""

from __future__ import annotations

import argparse
import json

from dsmoe.bench.decode import Clock, build_transformers, set_experts_implementation
from dsmoe.devices import add_device_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default="small,deepseek-v2-lite", help="comma-separated model presets")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated prompts submitted together")
    parser.add_argument("--prompt-len", type=int, default=2048, help="tokens per prompt (random ids)")
    parser.add_argument("--prefill-chunk", type=int, default=0,
                        help="prompt tokens the engine prefills per step (dsmoe serve's --prefill-chunk, default 512 "
                             "there); 0 = batch x --prompt-len, every prompt in one step")
    parser.add_argument("--hf-impls", default="grouped_mm", help="transformers experts implementations ('' = none)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per number (the best counts)")
    add_device_argument(parser)
    parser.add_argument("--profile", action="store_true",
                        help="print where the GPU time of one engine prefill goes (the first batch size)")
    parser.add_argument("--json", default=None, help="write all results to this JSON file")


def time_engine(model, batch: int, prompt_len: int, prefill_chunk: int, repeats: int, profile: bool = False) -> float:
    """Prompt tokens/s from submitting `batch` prompts to every request's first token; profile: print where
    the GPU time of one more run goes."""
    import torch

    from dsmoe.infer.engine import Engine
    from dsmoe.infer.sampling import SamplingParams

    engine = Engine(model, max_batch=batch, max_model_len=prompt_len + 1, prefill_chunk=prefill_chunk)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len)).tolist()
    params = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
    clock = Clock(engine.device)

    def one_run() -> float:
        t0 = clock()
        for p in prompts:
            engine.add_request(p, params)
        while engine.has_work():
            engine.step()
        return clock() - t0

    one_run()  # warm-up
    best = min(one_run() for _ in range(repeats))
    if profile and engine.device.type == "cuda":
        from dsmoe.bench.profiling import cuda_profile, kernel_table

        with cuda_profile() as prof:
            one_run()
        print(f"where one prefill of {batch} x {prompt_len} tokens goes ({1e3 * best:.2f} ms wall):\n"
              f"{kernel_table(prof, steps=1, top=25)}", flush=True)
    return batch * prompt_len / best


def time_transformers(hf, batch: int, prompt_len: int, repeats: int) -> float:
    import torch

    device = next(hf.parameters()).device
    ids = torch.randint(0, hf.config.vocab_size, (batch, prompt_len), device=device)
    clock = Clock(device)

    def one_run() -> float:
        t0 = clock()
        with torch.no_grad():
            hf(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
        return clock() - t0

    one_run()
    return batch * prompt_len / min(one_run() for _ in range(repeats))


def run(args: argparse.Namespace) -> int:
    import torch

    from dsmoe.presets import get_preset
    from dsmoe.devices import resolve_device
    from dsmoe.model.transformer import build_model

    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    hf_impls = [i for i in args.hf_impls.split(",") if i]
    report = {"prompt_len": args.prompt_len, "prefill_chunk": args.prefill_chunk, "dtype": str(dtype),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "models": {}}
    for preset in args.presets.split(","):
        torch.manual_seed(0)
        model = build_model(get_preset(preset), device=device, dtype=dtype).eval()
        rows = report["models"][preset] = {}
        for batch in batch_sizes:
            chunk = args.prefill_chunk or batch * args.prompt_len
            rows[batch] = {"dsmoe": time_engine(model, batch, args.prompt_len, chunk, args.repeats,
                                                profile=args.profile and batch == batch_sizes[0])}
            print(f"{preset} batch {batch}: dsmoe {rows[batch]['dsmoe']:,.0f} prompt tokens/s", flush=True)
        if hf_impls:
            hf = build_transformers(model)
            for impl in hf_impls:
                set_experts_implementation(hf, impl)
                for batch in batch_sizes:
                    try:
                        rows[batch][f"hf-{impl}"] = time_transformers(hf, batch, args.prompt_len, args.repeats)
                    except Exception as e:  # OOM, an implementation this transformers lacks: keep the rest
                        print(f"  transformers {impl} batch {batch}: FAILED ({type(e).__name__})", flush=True)
                        continue
                    print(f"{preset} batch {batch}: transformers {impl} {rows[batch][f'hf-{impl}']:,.0f} "
                          "prompt tokens/s", flush=True)
            del hf
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    chunk = args.prefill_chunk or "batch x prompt length"
    print(f"\nprefill, {report['device']}, {report['dtype']}, {args.prompt_len}-token prompts, prefill chunk "
          f"{chunk}, prompt tokens/s")
    print(f"{'model':<20}{'batch':>6}{'dsmoe':>12}" + "".join(f"{'HF ' + i:>16}{'x':>7}" for i in hf_impls))
    for preset, rows in report["models"].items():
        for batch, r in rows.items():
            line = f"{preset:<20}{batch:>6}{r['dsmoe']:>12,.0f}"
            for impl in hf_impls:
                theirs = r.get(f"hf-{impl}")
                line += f"{theirs:>16,.0f}{r['dsmoe'] / theirs:>6.1f}x" if theirs else f"{'-':>16}{'-':>7}"
            print(line)
    if args.json:
        from pathlib import Path

        from dsmoe.atomic import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
    return 0
