"""`dsmoe bench decode`: decode tokens/s of the dsmoe engine vs transformers' generate and the bandwidth bound.

For each preset (default: `small` and the DeepSeek-V2-Lite shape, random weights built on the device, never
written to disk) and each batch size (default 1 and 32):
- check: the engine's decode step (CUDA graph, weight-absorbed MLA) reproduces a full forward's logits;
- dsmoe: steady-state decode tokens/s of the continuous-batching engine (the `Engine` that generate, chat and
  serve drive, through its public add_request/step), greedy, after a warm-up run that captures its CUDA
  graphs, with the step's kernels as written ("graphs") and through torch.compile ("compiled", what
  `--compile` gives); and the kernels one decode step launches (torch.profiler over one step run uncaptured:
  CUDA kernels, memsets and copies; on the CPU, top-level aten ops);
- transformers: DeepseekV2/V3ForCausalLM built from the same config with the same weights copied in memory,
  `generate` with each experts implementation asked for; decode tokens/s = tokens after the first / (time
  of generate(N) - time of generate(1));
- bound: the bytes a decode step must read (every weight, routed experts only where a token was routed in
  that step, the embedding rows used, the KV cache of every sequence) / the copy bandwidth measured here.
The table comes last; --json writes every number.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

from dsmoe.atomic import atomic_write_text
from dsmoe.devices import add_device_argument, add_moe_impl_argument, release_models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default="small,deepseek-v2-lite", help="comma-separated model presets")
    parser.add_argument("--batch-sizes", default="1,32", help="comma-separated sequences decoded together")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence (random ids)")
    parser.add_argument("--new-tokens", type=int, default=64,
                        help="tokens per sequence timed for dsmoe (64 + 64 stays in one cache-length bucket)")
    parser.add_argument("--hf-new-tokens", type=int, default=24, help="tokens per sequence for transformers")
    parser.add_argument("--hf-impls", default="eager,grouped_mm",
                        help="transformers experts implementations to time ('' = skip transformers)")
    parser.add_argument("--hf-skip", default="", help="presets on which transformers is not run")
    add_device_argument(parser)
    add_moe_impl_argument(parser)
    parser.add_argument("--variants", default="graphs,compiled,graphs-grouped",
                        help="dsmoe decode steps to time: graphs (CUDA graphs of the eager kernels) or compiled "
                             "(torch.compile, then CUDA graphs), optionally -IMPL to force the MoE implementation "
                             "(e.g. graphs-grouped); a forced IMPL equal to what --moe-impl resolves to is skipped")
    parser.add_argument("--quantize", default="", help="also time the weight-only schemes listed (fp8,int8) with "
                        "each variant, on a quantized copy of the same weights")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly on a GPU")
    parser.add_argument("--profile", action="store_true",
                        help="print where the GPU time of one decode step goes, per kernel and per kind")
    parser.add_argument("--json", default=None, help="write all results to this JSON file")


class Clock:
    """Wall time with the device drained at both ends."""

    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self) -> float:
        self.sync()
        return time.perf_counter()


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), best of 10."""
    import torch

    n = nbytes // 2 if device.type == "cuda" else nbytes // 16
    src = torch.ones(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    clock, best = Clock(device), float("inf")
    for _ in range(11):
        t0 = clock()
        dst.copy_(src)
        best = min(best, clock() - t0)
    return 2 * src.numel() * src.element_size() / best


def step_bytes(model, cache, batch: int, context: float) -> int:
    """Bytes one decode step of `batch` sequences must read, from the routing of the model's last forward.
    Weights count in their stored format (quantized codes and their scales included)."""
    import torch

    counts, _ = model.routing_stats()
    total, embed = 0, model.embed_tokens.weight
    for name, p in model.state_dict().items():
        if ".mlp.experts." in name or not p.is_floating_point() and p.dtype != torch.int8:
            continue
        if name == "embed_tokens.weight" and model.lm_head is not None:
            total += batch * embed.shape[1] * embed.element_size()
        else:
            total += p.numel() * p.element_size()
    for moe, layer_counts in zip(model.moe_layers(), counts):
        per_expert = sum(t[0].numel() * t.element_size() for n, t in moe.experts.state_dict().items())
        total += int((layer_counts > 0).sum()) * per_expert
    return int(total + batch * context * cache.bytes_per_token())


def check_cached_decode(model, prompt_len: int, steps: int = 4, cuda_graphs: bool = True) -> float:
    """Max |decode logits - full forward logits| / max |full forward logits| over a few decode steps."""
    import torch

    from dsmoe.infer.engine import Engine

    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len + steps), device=device)
    engine = Engine(model, max_batch=1, max_model_len=prompt_len + steps, cuda_graphs=cuda_graphs)
    worst = 0.0
    with torch.no_grad():
        full = model(ids).float()
        engine.runner.prefill(ids[:, :prompt_len], 0, 0, last_only=True)
        for t in range(prompt_len, prompt_len + steps):
            engine.slots.input_ids[0], engine.slots.positions[0] = ids[0, t], t
            out = engine.runner(1, engine.runner.length_bucket(t + 1)).float()[0]
            worst = max(worst, ((out - full[0, t]).abs().max() / full[0, t].abs().max()).item())
    return worst


def time_dsmoe(model, batch: int, prompt_len: int, new_tokens: int, cuda_graphs: bool, compile: bool,
               repeats: int = 2, prompts: list[list[int]] | None = None, profile: bool = False,
               **engine_options) -> dict:
    """prompts: `batch` prompts of prompt_len tokens (default random ids); engine_options go to the Engine
    (e.g. speculative="mtp"; the result then has the drafts' acceptance); profile: also the per-kernel table
    of one step (CUDA)."""
    import torch

    from dsmoe.bench.profiling import kernel_table

    from dsmoe.infer.engine import Engine
    from dsmoe.infer.sampling import SamplingParams

    device = next(model.parameters()).device
    engine = Engine(model, max_batch=batch, max_model_len=prompt_len + new_tokens,
                    prefill_chunk=batch * prompt_len, cuda_graphs=cuda_graphs, compile=compile, **engine_options)
    if prompts is None:
        prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len)).tolist()
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    clock = Clock(device)

    def one_run() -> tuple[float, int]:
        for p in prompts:
            engine.add_request(p, params)
        produced, start, produced_at_start = 0, None, 0
        while engine.has_work():
            produced += sum(len(o.token_ids) for o in engine.step())
            if start is None and not engine.waiting and engine.prefilling is None:
                start, produced_at_start = clock(), produced  # every sequence is decoding from here on
        return (produced - produced_at_start) / (clock() - start), produced

    t0 = time.perf_counter()
    one_run()  # warm-up: compiles and captures the CUDA graphs of the buckets this run goes through
    warmup_s = time.perf_counter() - t0
    runs = [one_run() for _ in range(repeats)]
    assert all(n == batch * new_tokens for _, n in runs), f"expected {batch * new_tokens} tokens, got {runs}"
    tokens_per_s = max(t for t, _ in runs)
    context = prompt_len + new_tokens / 2
    B, L = engine.runner.batch_bucket(batch), engine.runner.length_bucket(prompt_len + new_tokens)
    prof, cuda = profile_step(engine, B, L), device.type == "cuda"
    return {"tokens_per_s": tokens_per_s, "ms_per_step": 1e3 * batch / tokens_per_s, "warmup_s": warmup_s,
            "kernels_per_step": kernels_per_step(prof, cuda),
            "profile": kernel_table(prof, steps=1, top=25) if profile and cuda else None,
            "step_bytes": step_bytes(model, engine.cache, batch, context),
            "graphs": sorted(step_runner(engine).graphs), "graph_failures": dict(step_runner(engine).failed),
            "speculation": engine.speculation_stats()}


def step_runner(engine):
    """The decode step the benchmark's greedy requests run (it samples inside its graph)."""
    return engine.runner.sampling({"any_random": False, "any_filtered": False})


def profile_step(engine, B: int, L: int):
    """torch.profiler over one decode step of the engine run uncaptured (its CUDA graph replays these kernels);
    on CUDA with the operators too, so the kernel table traces the small copies back to the code that launched
    them."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dsmoe.bench.profiling import cuda_profile

    cuda = engine.device.type == "cuda"
    with torch.no_grad(), (cuda_profile() if cuda else profile(activities=[ProfilerActivity.CPU])) as prof:
        step_runner(engine).forward(B, L)
    return prof


def kernels_per_step(prof, cuda: bool) -> int:
    """Device work items of a profiled step (on the CPU: top-level aten ops)."""
    from torch.autograd import DeviceType

    if cuda:
        return sum(e.device_type == DeviceType.CUDA for e in prof.events())
    return sum(e.cpu_parent is None and e.name.startswith("aten::") for e in prof.events())


def time_variants(model, batch: int, variants: list[str], args, bandwidth: float, cuda_graphs: bool) -> dict:
    results = {}
    for variant in variants:
        step, _, impl = variant.partition("-")
        if impl and impl == resolved_impl(model, args.moe_impl):
            continue  # the same as the plain variant
        model.moe_impl = impl or args.moe_impl
        try:
            result = time_dsmoe(model, batch, args.prompt_len, args.new_tokens, cuda_graphs,
                                compile=step == "compiled", profile=args.profile)
            result["moe_impl"] = resolved_impl(model)
        except Exception as e:  # e.g. a compiler failure: report it, keep the other numbers
            why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
            print(f"  dsmoe {variant} batch {batch}: FAILED ({why})", flush=True)
            results[variant] = {"error": why}
            continue
        finally:
            model.moe_impl = args.moe_impl
        result["bound_tokens_per_s"] = batch * bandwidth / result["step_bytes"]
        result["fraction_of_bound"] = result["tokens_per_s"] / result["bound_tokens_per_s"]
        results[variant] = result
        print(f"  dsmoe {variant} ({result['moe_impl']}) batch {batch}: {result['tokens_per_s']:.1f} tokens/s "
              f"({result['fraction_of_bound']:.2f} of the bound; {result['kernels_per_step']} kernels per step; "
              f"warm-up {result['warmup_s']:.0f} s)", flush=True)
        if result["profile"]:
            print(f"  where one uncaptured step's GPU time goes ({result['ms_per_step']:.3f} ms per step replayed):\n"
                  f"{result['profile']}", flush=True)
    return results


def resolved_impl(model, impl: str | None = None) -> str:
    """The MoE implementation `impl` (default: the model's) resolves to for this model's weights."""
    from dsmoe.kernels.ops import resolve_impl

    moe = model.moe_layers()[0]
    x = moe.experts.gate_up_proj.new_empty(1, moe.experts.gate_up_proj.shape[-1])
    return resolve_impl(impl or moe.impl, x, moe.experts.gate_up_proj, moe.experts.down_proj)


def build_transformers(model):
    """transformers' DeepseekV2/V3ForCausalLM with this model's config and weights (copied in memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsmoe.checkpoint.hf import hub_state

    hf_dict = model.config.to_hf_dict()
    config = AutoConfig.for_model(hf_dict.pop("model_type"), **hf_dict)
    device = next(model.parameters()).device
    dtype = model.embed_tokens.weight.dtype
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    # transformers 5 keeps routed experts fused in memory ("model." + our names); older layouts are per expert
    ours = dict(hub_state(model))
    ours.update({(n if n == "lm_head.weight" else "model." + n): t for n, t in model.state_dict().items()})
    with torch.no_grad():
        for key, target in hf.state_dict().items():
            source = ours.get(key)
            if source is None or source.shape != target.shape:
                raise RuntimeError(f"transformers parameter {key} {tuple(target.shape)} has no dsmoe counterpart")
            target.copy_(source)
    return hf


def set_experts_implementation(hf, impl: str) -> None:
    if hasattr(hf, "set_experts_implementation"):
        hf.set_experts_implementation(impl)
    else:  # transformers versions that dispatch on the config attribute at forward time
        hf.config._experts_implementation = impl


def logits_gap(model, hf, prompt_len: int) -> float:
    import torch

    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)
    from dsmoe.infer.runner import eager

    with torch.no_grad(), eager():  # an engine may have compiled the blocks for its decode shapes
        ours, theirs = model(ids).float(), hf(ids).logits.float()
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def time_transformers(hf, batch: int, prompt_len: int, new_tokens: int) -> float:
    import torch

    device = next(hf.parameters()).device
    ids = torch.randint(0, hf.config.vocab_size, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)
    clock = Clock(device)

    def generate(n: int) -> float:
        t0 = clock()
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)
        assert out.shape[1] == prompt_len + n
        return clock() - t0

    generate(2)  # warm-up
    return batch * (new_tokens - 1) / (generate(new_tokens) - generate(1))


def run(args: argparse.Namespace) -> int:
    import torch

    from dsmoe.presets import get_preset
    from dsmoe.devices import resolve_device
    from dsmoe.model.transformer import build_model

    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cuda_graphs = not args.no_cuda_graphs and device.type == "cuda"
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    hf_impls = [i for i in args.hf_impls.split(",") if i]
    variants = [v for v in args.variants.split(",") if v]
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s", flush=True)
    # platform.processor() is "" on most Linux builds: the table's title read "decode, , torch.float32"
    cpu = f"cpu ({platform.processor() or platform.machine()})"
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
              "torch": torch.__version__, "copy_bandwidth_bytes_per_s": bandwidth, "dtype": str(dtype),
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "models": {}}
    failed = False
    for preset in args.presets.split(","):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        model = build_model(get_preset(preset), device=device, dtype=dtype, moe_impl=args.moe_impl).eval()
        entry = {"params": model.config.num_params(), "active_params": model.config.num_params(active=True),
                 "check_rel_err": check_cached_decode(model, args.prompt_len, cuda_graphs=cuda_graphs),
                 "batches": {}}
        check_ok = entry["check_rel_err"] < (0.05 if dtype == torch.bfloat16 else 1e-4)
        failed |= not check_ok
        print(f"{preset}: built in {time.perf_counter() - t0:.0f} s; cached decode vs full forward: relative "
              f"error {entry['check_rel_err']:.2e} ({'ok' if check_ok else 'FAILED'})", flush=True)
        for batch in batch_sizes:
            entry["batches"][batch] = {"dsmoe": time_variants(model, batch, variants, args, bandwidth, cuda_graphs),
                                       "transformers": {}}
        for scheme in [s for s in args.quantize.split(",") if s]:
            from dsmoe.model.quantized import quantize_model

            quantized = quantize_model(copy.deepcopy(model), scheme)
            entry[f"check_rel_err_{scheme}"] = check_cached_decode(quantized, args.prompt_len, cuda_graphs=cuda_graphs)
            for batch in batch_sizes:
                timed = time_variants(quantized, batch, variants, args, bandwidth, cuda_graphs)
                entry["batches"][batch]["dsmoe"].update({f"{v}+{scheme}": r for v, r in timed.items()})
            del quantized
            release_models(device)
        if hf_impls and preset not in args.hf_skip.split(","):
            import transformers

            report["transformers"] = transformers.__version__
            hf = build_transformers(model)
            entry["transformers_logits_rel_gap"] = logits_gap(model, hf, args.prompt_len)
            print(f"  transformers on the same weights: logits differ by {entry['transformers_logits_rel_gap']:.2e} "
                  "of their largest value", flush=True)
            for impl in hf_impls:
                for batch in batch_sizes:
                    try:
                        set_experts_implementation(hf, impl)
                        tps = time_transformers(hf, batch, args.prompt_len, args.hf_new_tokens)
                    except Exception as e:  # an implementation this transformers does not have, OOM, ...
                        print(f"  transformers {impl} batch {batch}: FAILED ({type(e).__name__}: "
                              f"{(str(e).strip().splitlines() or [''])[0][:300]})", flush=True)
                        continue
                    entry["batches"][batch]["transformers"][impl] = tps
                    print(f"  transformers {impl} batch {batch}: {tps:.1f} tokens/s", flush=True)
            del hf
        report["models"][preset] = entry
        del model
        release_models(device)
    print_table(report, hf_impls)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(report, indent=2, default=str))
    return 1 if failed else 0


def print_table(report: dict, hf_impls: list[str]) -> None:
    heads = ["model", "batch", "dsmoe", "tok/s", "ms/step", "kernels/step", "bound tok/s", "of bound",
             *[f"HF {i} tok/s" for i in hf_impls], *[f"x HF {i}" for i in hf_impls], "graphs"]
    rows = []
    for name, entry in report["models"].items():
        for batch, r in entry["batches"].items():
            hf = r["transformers"]
            for variant, d in r["dsmoe"].items():
                if "error" in d:
                    rows.append([name, str(batch), variant, "failed", *["-"] * (len(heads) - 4)])
                    continue
                rows.append([name, str(batch), variant, f"{d['tokens_per_s']:.1f}", f"{d['ms_per_step']:.2f}",
                             str(d["kernels_per_step"]),
                             f"{d['bound_tokens_per_s']:.1f}", f"{d['fraction_of_bound']:.2f}",
                             *[f"{hf[i]:.1f}" if i in hf else "-" for i in hf_impls],
                             *[f"{d['tokens_per_s'] / hf[i]:.1f}x" if i in hf else "-" for i in hf_impls],
                             "fallback" if d["graph_failures"] else ("yes" if d["graphs"] else "no")])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    print(f"\ndecode, {report['device']}, {report['dtype']}, prompt {report['prompt_len']} + "
          f"{report['new_tokens']} new tokens, copy bandwidth {report['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s")
    for line in (heads, ["-" * w for w in widths], *rows):
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))
