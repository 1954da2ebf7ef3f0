"""`dsmoe bench train`: whole-model training-step throughput (tokens/s) and MFU of dsmoe and of transformers'
DeepseekV3ForCausalLM, on the same config, the same weights and the same batch, measured in one run.

Variants (all: forward, fp32 cross-entropy, backward, AdamW step, fused on CUDA):
  dsmoe              bf16 weights (router fp32), eager
  dsmoe+compile      the same under torch.compile
  dsmoe-amp          what `dsmoe train` runs: fp32 master weights, bf16 autocast, aux-free bias update
  dsmoe-amp+compile  the same under torch.compile (`dsmoe train --compile`)
  hf-grouped_mm      transformers, bf16 weights, experts_implementation="grouped_mm"
  hf-eager           transformers, bf16 weights, experts_implementation="eager"

Correctness first: every variant starts from the same weights and batch, and the first-step losses are
compared (dsmoe vs transformers). MFU = model FLOPs/s / the dense bf16 GEMM rate measured in this run
(8192^3 torch.mm); it is also given against the H100/H200 spec (989 TFLOP/s). Model FLOPs per token
= 6 x matmul parameters a token uses + causal attention (dsmoe/train/flops.py). The table prints last;
--json writes every number.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

VARIANTS = ("dsmoe", "dsmoe+compile", "dsmoe-amp", "dsmoe-amp+compile", "hf-grouped_mm", "hf-eager")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="small", help="model preset")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="NAME",
                        help=f"which to run: {' '.join(VARIANTS)}")
    parser.add_argument("--moe-impl", nargs="+", default=["grouped"], metavar="IMPL",
                        choices=("auto", "grouped", "triton", "reference"),
                        help="dsmoe expert implementation(s); each dsmoe variant runs once per implementation")
    parser.add_argument("--device", default="cuda", help="cuda (cpu only to smoke-test the script, with --preset tiny)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
    import torch

    from dsmoe.config import get_preset
    from dsmoe.errors import UserError
    from dsmoe.train.flops import (
        H200_BF16_SPEC_TFLOPS,
        measure_dense_tflops,
        train_flops_per_token,
    )

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("dsmoe bench train needs a CUDA GPU (or --device cpu --preset tiny to smoke-test it)")
    config = get_preset(args.preset)
    if args.seq_len > config.max_position_embeddings:
        raise UserError(f"--seq-len {args.seq_len} is beyond the preset's max_position_embeddings")
    tokens = args.micro_batch * args.seq_len
    flops_per_token = train_flops_per_token(config, args.seq_len)
    dense = measure_dense_tflops(device) if device.type == "cuda" else None
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen).to(device)
    print(f"config: {args.preset} ({config.num_params() / 1e9:.2f}B total, {config.num_params(active=True) / 1e9:.3f}B "
          f"active), batch {args.micro_batch} x {args.seq_len}, {flops_per_token / 1e9:.2f} GFLOP/token (train)")
    if dense:
        print(f"dense bf16 GEMM (8192^3, measured): {dense:.0f} TFLOP/s")

    runs = [(name, impl) for name in args.variants for impl in (args.moe_impl if name.startswith("dsmoe") else [None])]
    results = []
    report = {"preset": args.preset, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
              "flops_per_token": flops_per_token, "dense_bf16_tflops": dense, "device": _device_name(device),
              "versions": _versions(), "results": results}
    with tempfile.TemporaryDirectory(prefix="dsmoe-bench-") as tmp:
        _write_weights(config, device, Path(tmp))
        for name, impl in runs:
            label = f"{name} [{impl}]" if impl else name
            try:
                result = _measure(name, impl, Path(tmp), device, batch, args.warmup, args.steps)
            except Exception as e:  # one failing variant (an old transformers, an OOM) must not hide the others
                result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            gc.collect()  # the variant's model and optimizer are gone with _measure's frame
            if device.type == "cuda":
                torch.cuda.empty_cache()
            result.update(variant=label, moe_impl=impl)
            if "seconds_per_step" in result:
                result["tokens_per_s"] = tokens / result["seconds_per_step"]
                result["model_tflops"] = result["tokens_per_s"] * flops_per_token / 1e12
                if dense:
                    result["mfu"] = result["model_tflops"] / dense
                    result["mfu_spec"] = result["model_tflops"] / H200_BF16_SPEC_TFLOPS
            results.append(result)
            print(f"{label}: " + (result["error"] if "error" in result else
                                  f"{result['tokens_per_s']:,.0f} tokens/s, first loss {result['first_loss']:.4f}"),
                  flush=True)
            if args.json:  # after every variant: a run cut short still leaves its numbers
                Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    _print_checks(results)
    _print_table(results, dense is not None)
    return 0


def _write_weights(config, device, folder: Path) -> None:
    """One random initialisation, saved in bf16 in the hub layout: every variant loads exactly these weights."""
    import torch

    from dsmoe.checkpoint.hf import save_pretrained
    from dsmoe.model.transformer import build_model

    torch.manual_seed(0)
    model = build_model(config, device)
    save_pretrained(model, folder, dtype=torch.bfloat16)
    del model


def _measure(name: str, moe_impl: str | None, folder: Path, device, batch, warmup: int, steps: int) -> dict:
    """Build one variant from the saved weights and time its training step."""
    import torch
    import torch.nn.functional as F

    inputs, targets = batch[:, :-1], batch[:, 1:]
    if name.startswith("hf-"):
        model = _load_transformers(folder, name[3:], device)
        forward = lambda: model(input_ids=inputs).logits
        bias_update = None
    else:
        from dsmoe.checkpoint.hf import load_pretrained

        amp = name.startswith("dsmoe-amp")
        model = load_pretrained(folder, dtype=torch.float32 if amp else torch.bfloat16, device=device,
                                moe_impl=moe_impl).train()
        compiled = torch.compile(model) if name.endswith("+compile") else model

        def forward():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                return compiled(inputs)

        def bias_update():  # what the trainer does after each step (reads the counts the forward left)
            model.update_expert_bias(model.routing_stats()[0], 1e-3)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")

    def step():
        logits = forward()
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        if bias_update is not None:
            bias_update()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return _time(step, warmup, steps, device)


def _load_transformers(folder: Path, experts: str, device):
    import torch
    import transformers
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, experts_implementation=experts,
                                                  attn_implementation="sdpa")
    got = getattr(model.config, "_experts_implementation", None)
    if got != experts:
        raise RuntimeError(f"transformers {transformers.__version__} ran experts_implementation={got!r}, "
                           f"not {experts!r}")
    return model.to(device).train()


def _time(step, warmup: int, steps: int, device) -> dict:
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_loss = step().item()
    for _ in range(max(warmup - 1, 0)):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    result = {"seconds_per_step": seconds, "first_loss": first_loss, "last_loss": loss.item()}
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return result


def _print_checks(results: list[dict]) -> None:
    """Same weights, same batch: the first-step losses of every variant must agree to bf16 precision."""
    losses = {r["variant"]: r["first_loss"] for r in results if "first_loss" in r}
    reference = next((v for k, v in losses.items() if k.startswith("hf-")), None)
    for name, loss in losses.items():
        if reference is None or name.startswith("hf-"):
            continue
        diff = abs(loss - reference)
        verdict = "ok" if diff < 0.01 * max(abs(reference), 1.0) else "MISMATCH"
        print(f"check: first-step loss {name} {loss:.4f} vs transformers {reference:.4f} (|diff| {diff:.4f}): "
              f"{verdict}")


def _print_table(results: list[dict], has_mfu: bool) -> None:
    baseline = next((r.get("tokens_per_s") for r in results if r["variant"] == "hf-grouped_mm"), None)
    header = f"{'variant':<28}{'tokens/s':>12}{'vs hf-grouped_mm':>18}{'step ms':>10}"
    header += f"{'MFU':>8}{'MFU(989)':>10}{'TFLOP/s':>9}" if has_mfu else ""
    header += f"{'peak GB':>9}{'loss@1':>9}"
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<28}failed: {r['error']}")
            continue
        ratio = f"{r['tokens_per_s'] / baseline:.2f}x" if baseline else "-"
        line = f"{r['variant']:<28}{r['tokens_per_s']:>12,.0f}{ratio:>18}{r['seconds_per_step'] * 1e3:>10.1f}"
        if has_mfu:
            line += f"{r['mfu']:>8.1%}{r['mfu_spec']:>10.1%}{r['model_tflops']:>9.0f}"
        line += f"{r.get('peak_memory_gb', float('nan')):>9.1f}{r['first_loss']:>9.4f}"
        print(line)


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _versions() -> dict:
    import torch

    versions = {"torch": torch.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        versions["transformers"] = None
    return versions
