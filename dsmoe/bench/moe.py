"""`dsmoe bench moe`: one MoE layer, forward + backward, every implementation on the same weights and inputs.

Per layer shape and token count: the dense-GEMM ceiling of equal FLOPs, transformers' DeepseekV3MoE
(eager and grouped_mm, sharing our parameters), and dsmoe reference / grouped / triton. Each row gives
milliseconds (median over fresh random inputs, CUDA events after warm-up; with --cuda-graphs, of the step
captured in a CUDA graph and replayed, which removes launch overhead for every variant that can be
captured), model TFLOP/s, the ratio to the dense ceiling, the speedup over transformers grouped_mm, peak
memory, the activation memory the forward keeps for the backward (what each layer of a model holds until its
backward runs), and the largest relative error
of the outputs and gradients against dsmoe grouped (or reference) in the same run. Then a Zipf-skewed
routing row per shape and a host-sync check of the Triton layer. A variant that fails (compile error,
out of memory) prints its error and the run goes on.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import traceback
from pathlib import Path

from dsmoe.atomic import atomic_write_text

IMPLS = ("dense", "grouped", "triton", "reference", "hf-grouped", "hf-eager")
RUN_ORDER = ("dense", "grouped", "reference", "triton", "hf-grouped", "hf-eager")
# per-expert loops that read expert counts on the host: a capture would fail (and a failed capture can
# leave the CUDA context unusable), so --cuda-graphs times them eagerly
NOT_CAPTURABLE = ("reference", "hf-eager")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default="lite,fine,v3", help="comma list of lite, fine, v3 (tiny: smoke run)")
    parser.add_argument("--tokens", default="512,4096,16384", help="comma list of token counts T")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    parser.add_argument("--slow-max-tokens", type=int, default=4096,
                        help="run the per-expert loops (dsmoe reference, transformers eager) only up to this T")
    parser.add_argument("--seconds", type=float, default=0.5, help="measuring time per variant (>= 3 steps)")
    parser.add_argument("--no-skew", action="store_true", help="skip the Zipf-skewed routing rows")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run (no timing claims)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, inputs and skewed routing")
    parser.add_argument("--json", dest="json_path", default=None, help="also write all results to this file")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="time each variant by replaying its forward+backward captured in a CUDA graph (GPU "
                             "time without launch overhead); a variant that cannot be captured is timed eagerly")
    parser.add_argument("--profile", action="store_true",
                        help="at the largest T, print where the time of dsmoe grouped/triton goes, per GPU kernel")


def _parse(args):
    from dsmoe.bench.moe_layers import SHAPES
    from dsmoe.errors import UserError

    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    bad = [s for s in shapes if s not in SHAPES] + [i for i in impls if i not in IMPLS]
    if bad:
        raise UserError(f"unknown shape/impl {', '.join(bad)}: use shapes from {', '.join(SHAPES)} "
                        f"and impls from {', '.join(IMPLS)}")
    try:
        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--tokens wants comma-separated integers, got {args.tokens!r}") from None
    return shapes, tokens, impls


def _fmt(v, spec):
    width = int(spec.split(".")[0])
    return "-".rjust(width) if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_table(rows: list[dict]) -> None:
    head = (f"{'shape':<8} {'T':>6} {'impl':<26} {'ms':>9} {'TFLOP/s':>8} {'x dense':>8} {'x HF-gmm':>8} "
            f"{'peak GB':>8} {'saved GB':>8} {'max rel err':>12}  note")
    print(head)
    print("-" * len(head))
    for r in rows:
        impl = r["impl"] + (" [graph]" if r.get("mode") == "graph" else "")
        print(f"{r['shape']:<8} {r['tokens']:>6} {impl:<26} {_fmt(r.get('ms'), '9.3f')} "
              f"{_fmt(r.get('tflops'), '8.1f')} {_fmt(r.get('x_dense'), '8.2f')} "
              f"{_fmt(r.get('x_hf_grouped'), '8.2f')} {_fmt(r.get('peak_gb'), '8.2f')} "
              f"{_fmt(r.get('saved_gb'), '8.2f')} {_fmt(r.get('max_rel_err'), '12.2e')}  {r.get('note', '')}")


def run(args: argparse.Namespace) -> int:
    import torch

    from dsmoe.bench import moe_layers as L
    from dsmoe.errors import UserError

    shapes, token_counts, impls = _parse(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("dsmoe bench moe needs a CUDA GPU; pass --device cpu --shapes tiny for a smoke run")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type != "cuda" and "triton" in impls:  # the default list has it: a smoke run, not a FAILED row
        impls = [i for i in impls if i != "triton"]
        print("dsmoe triton skipped: its kernels need a CUDA GPU (the tests run them on the CPU with "
              "TRITON_INTERPRET=1)", flush=True)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    print("dsmoe bench moe:", ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    rows, skew_rows, sync_checks = [], [], []
    for shape_name in shapes:
        shape = L.SHAPES[shape_name]
        try:
            _bench_shape(L, shape, token_counts, impls, args, device, dtype, rows, skew_rows, sync_checks)
        except Exception as e:  # a shape that cannot even be built: report, go on with the next
            rows.append(dict(shape=shape.label, tokens=0, impl="(setup)", note=f"FAILED: {_short(e)}"))
            traceback.print_exc()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.json_path:  # after every shape, so a run cut short still leaves its results
            atomic_write_text(Path(args.json_path), json.dumps({"env": env, "rows": rows, "skew": skew_rows,
                                                                "sync": sync_checks}, indent=1))
    print("\n== MoE layer forward+backward (model FLOPs 2*T*(k+shared)*3*d*f per forward, x3) ==")
    print_table(rows)
    if skew_rows:
        print("\n== Zipf-skewed routing (max expert load 4x mean, 1/8 of experts empty) vs the same impl balanced ==")
        for r in skew_rows:
            print(f"{r['shape']:<8} T={r['tokens']:<6} {r['impl']:<8} " + (
                f"{r['ms']:.3f} ms  throughput x{r['vs_balanced']:.2f} of balanced  peak x{r['peak_vs_balanced']:.2f}  "
                f"max/mean load {r['max_over_mean']:.2f}, {r['empty_experts']} empty"
                if "ms" in r else r.get("note", "")))
    if sync_checks:
        print("\n== host-device sync inside the Triton layer (torch.cuda.set_sync_debug_mode('error')) ==")
    for c in sync_checks:
        print(f"{c['shape']:<8} T={c['tokens']:<6} {c['result']}")
    if args.json_path:
        print(f"\nwrote {args.json_path}")
    return 0


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:160]


def _bench_shape(L, shape, token_counts, impls, args, device, dtype, rows, skew_rows, sync_checks):
    import torch

    layer = L.dsmoe_layer(shape, device, dtype, impl="grouped")
    hf = {}
    for name, implementation in (("hf-grouped", "grouped_mm"), ("hf-eager", "eager")):
        if name in impls:
            try:
                hf[name] = L.hf_layer(shape, layer, implementation)
            except Exception as e:
                rows.append(dict(shape=shape.label, tokens=0, impl=name, note=f"unavailable: {_short(e)}"))
    dense = L.DenseMLP(shape, device, dtype) if "dense" in impls else None
    params = list(layer.parameters()) + (list(dense.parameters()) if dense is not None else [])
    probe = sorted({0, 1, shape.experts // 2, shape.experts - 1})  # experts whose weight grads are compared

    def make_step(module):
        def step(x, dy):
            for p in params:
                p.grad = None
            x.grad = None
            y = module(x)
            y.backward(dy)
            return y
        return step

    def release():
        for p in params:
            p.grad = None

    def outputs(step, x, dy):
        y = step(x, dy)
        out = {"y": y.detach().clone(), "dx": x.grad.clone(), "d router": layer.gate.weight.grad.clone(),
               "d gate_up[probe]": layer.experts.gate_up_proj.grad[probe].clone(),
               "d down[probe]": layer.experts.down_proj.grad[probe].clone()}
        for p in params:
            p.grad = None
        return out

    for tokens in token_counts:
        gen = torch.Generator(device=device).manual_seed(args.seed + tokens)
        inputs = [(torch.randn(1, tokens, shape.d, generator=gen, device=device, dtype=dtype).requires_grad_(),
                   torch.randn(1, tokens, shape.d, generator=gen, device=device, dtype=dtype)) for _ in range(3)]
        flops = shape.model_flops(tokens)
        results, reference = {}, None
        for impl in sorted(impls, key=RUN_ORDER.index):  # the error reference (grouped) runs first
            row = dict(shape=shape.label, tokens=tokens, impl=impl if impl in ("dense",) or impl.startswith("hf")
                       else f"dsmoe {impl}")
            if impl in ("reference", "hf-eager") and tokens > args.slow_max_tokens:
                continue
            if impl.startswith("hf") and impl not in hf:
                continue
            if impl == "dense" and dense is None:
                continue
            if impl == "dense":
                module = dense
            elif impl.startswith("hf"):
                module = hf[impl]
            else:
                layer.impl = impl
                module = layer
            step = make_step(module)
            try:
                if impl != "dense":
                    out = outputs(step, *inputs[0])
                    if reference is None and impl in ("grouped", "reference"):
                        reference, row["note"] = out, "(error reference)"
                    elif reference is not None and (not impl.startswith("hf") or L.same_routing_as_hf(shape)):
                        errs = L.relative_errors(out, reference)
                        worst = max(errs, key=errs.get)
                        row.update(max_rel_err=errs[worst], errors=errs, note=f"worst: {worst}")
                    elif impl.startswith("hf"):
                        row["note"] = "routing differs (HF is sigmoid/V3): no error check"
                    del out
                t = _time(L, step, inputs, device, args, row, release, capturable=impl not in NOT_CAPTURABLE)
                if args.profile and impl in ("grouped", "triton") and tokens == max(token_counts):
                    print(f"  kernel time of {shape.label} T={tokens} dsmoe {impl}, forward+backward:")
                    print(L.kernel_profile(step, inputs))
                release()
                row.update(t, tflops=flops / t["ms"] / 1e9, saved_gb=L.saved_for_backward_gb(module, inputs[0][0]))
                results[impl] = t
                if impl == "triton" and device.type == "cuda" and tokens == token_counts[0]:
                    sync_checks.append(dict(shape=shape.label, tokens=tokens, result=_sync_check(step, inputs[1])))
                    print(f"  sync check: {sync_checks[-1]['result']}", flush=True)
            except Exception as e:
                row["note"] = f"FAILED: {_short(e)}"
                traceback.print_exc()
            rows.append(row)
            _print_row(row)
            for p in params:
                p.grad = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for row in rows:
            if row["shape"] == shape.label and row["tokens"] == tokens and "ms" in row:
                if "dense" in results:
                    row["x_dense"] = results["dense"]["ms"] / row["ms"]
                if "hf-grouped" in results:
                    row["x_hf_grouped"] = results["hf-grouped"]["ms"] / row["ms"]
        if not args.no_skew and tokens == max(token_counts):
            _skew_rows(L, shape, layer, tokens, impls, results, make_step, inputs, args, device, skew_rows, release)
        del inputs


def _time(L, step, inputs, device, args, row: dict, release, capturable: bool = True) -> dict:
    """Graph replay when asked for and possible, else eager; the row's note says which."""
    import torch

    if args.cuda_graphs and device.type == "cuda" and capturable:
        try:
            t = L.time_graph(step, inputs, device, args.seconds, release)
            row["mode"] = "graph"
            return t
        except Exception as e:  # e.g. a host sync inside the step: not capturable
            torch.cuda.synchronize(device)
            row["mode"] = "eager"
            row["note"] = (row.get("note", "") + f" [no CUDA graph: {_short(e)[:60]}; eager]").strip()
    else:
        row["mode"] = "eager"
    release()
    return L.time_steps(step, inputs, device, args.seconds)


def _print_row(row: dict) -> None:
    print(f"  {row['shape']} T={row['tokens']} {row['impl']}: " + (
        f"{row['ms']:.3f} ms, {row['tflops']:.1f} TFLOP/s, peak {row['peak_gb']:.2f} GB" if "ms" in row else "")
        + (f", max rel err {row['max_rel_err']:.2e}" if "max_rel_err" in row else "") + f" {row.get('note', '')}",
        flush=True)


def _sync_check(step, inputs) -> str:
    import torch

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(*inputs)
        return "pass: no host-device sync in router, permutation, experts, combine and their backward"
    except RuntimeError as e:
        return f"FAIL: {_short(e)}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _skew_rows(L, shape, layer, tokens, impls, results, make_step, inputs, args, device, skew_rows, release):
    import torch

    idx = L.zipf_routing(tokens, shape.k, shape.experts, args.seed, device)
    counts = torch.bincount(idx.flatten().cpu(), minlength=shape.experts)
    experts_forward = type(layer.experts).forward

    def skewed(x_TD, topk_idx_TK, topk_weight_TK, impl, shared=None, active_TK=None):  # the skewed choice
        return experts_forward(layer.experts, x_TD, idx, topk_weight_TK, impl, shared, active_TK)

    layer.experts.forward = skewed
    try:
        for impl in ("grouped", "triton"):
            if impl not in impls or impl not in results:
                continue
            layer.impl = impl
            row = dict(shape=shape.label, tokens=tokens, impl=impl)
            try:
                t = _time(L, make_step(layer), inputs, device, args, row, release)
                row.update(t, vs_balanced=results[impl]["ms"] / t["ms"],
                           peak_vs_balanced=t["peak_gb"] / results[impl]["peak_gb"],
                           max_over_mean=(counts.max() / counts.float().mean()).item(),
                           empty_experts=int((counts == 0).sum()))
            except Exception as e:
                row["note"] = f"FAILED: {_short(e)}"
                traceback.print_exc()
            skew_rows.append(row)
    finally:
        del layer.experts.forward
