"""`dsmoe bench train`: tokens/s and MFU of `dsmoe train`'s own step, next to transformers' DeepseekV3ForCausalLM on
the same config, the same initial weights and the same batches, measured in one run.

Variants:
  trainer                 dsmoe.train.Trainer as `dsmoe train` runs it (fp32 master weights, bf16 autocast on CUDA,
                          chunked cross-entropy, gradient clipping, LR schedule, aux-free bias update, on-device
                          skip of non-finite steps, its metrics record), eager
  trainer+compile         the same with --compile (each block compiled on its own, as under torchrun)
  trainer+compile-model   the same with --compile --compile-scope model (the whole forward in one graph)
  hf-grouped_mm           transformers, bf16 weights, experts_implementation="grouped_mm", fused AdamW + clipping
  hf-eager                transformers, bf16 weights, experts_implementation="eager"

Random tokens by default, or --data (text, tokenized as `dsmoe train` does). The trainer rows are the Trainer's
own throughput record (what `dsmoe train` logs to metrics.jsonl): the window of
--steps steps after --warmup steps (compilation happens there). --set KEY=VALUE changes the training config of
every trainer variant (e.g. --set activation_checkpointing=true param_dtype=bf16). MFU = model FLOPs/s over the
dense bf16 GEMM rate measured once in this process (dsmoe/train/flops.py), the same number the Trainer uses. The
first-step losses of the trainer variants are checked against transformers'. The table prints last.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dsmoe.atomic import atomic_write_text
from dsmoe.devices import release_models
from dsmoe.kernels.ops import IMPLS

PROFILED_STEPS = 2
VARIANTS = ("trainer", "trainer+compile", "trainer+compile-model", "hf-grouped_mm", "hf-eager")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dsmoe.train.cli import key_value

    parser.add_argument("--preset", default="small", help="model preset")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="NAME",
                        help=f"which to run: {' '.join(VARIANTS)}")
    parser.add_argument("--moe-impl", nargs="+", default=["auto"], metavar="IMPL",
                        choices=IMPLS,
                        help="dsmoe expert implementation(s); each trainer variant runs once per implementation")
    parser.add_argument("--data", nargs="+", action="extend", metavar="PATH",
                        help="train on this text (as `dsmoe train --data`; a tokenizer of the preset's vocabulary is "
                             "trained on it) instead of random tokens")
    parser.add_argument("--set", nargs="+", action="extend", default=[], type=key_value, metavar="KEY=VALUE",
                        help="training config overrides for the trainer variants (TrainConfig field names)")
    parser.add_argument("--device", default="cuda", help="cuda (cpu only to smoke-test the script, with --preset tiny)")
    parser.add_argument("--profile", action="store_true",
                        help="after each trainer variant's timed window, print where the GPU time of "
                             f"{PROFILED_STEPS} more steps goes (per kernel and per kind)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
    import torch

    from dsmoe.presets import get_preset
    from dsmoe.errors import UserError
    from dsmoe.train.flops import H200_BF16_SPEC_TFLOPS, dense_tflops, train_flops_per_token

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("dsmoe bench train needs a CUDA GPU (or --device cpu --preset tiny to smoke-test it)")
    config = get_preset(args.preset)
    if args.seq_len > config.max_position_embeddings:
        raise UserError(f"--seq-len {args.seq_len} is beyond the preset's max_position_embeddings")
    flops_per_token = train_flops_per_token(config, args.seq_len)
    dense = dense_tflops(device) if device.type == "cuda" else None
    print(f"config: {args.preset} ({config.num_params() / 1e9:.2f}B total, {config.num_params(active=True) / 1e9:.3f}B "
          f"active), batch {args.micro_batch} x {args.seq_len}, {flops_per_token / 1e9:.2f} GFLOP/token (train)")
    if dense:
        print(f"dense bf16 GEMM (8192^3, measured): {dense:.0f} TFLOP/s")

    data = _training_data(args, config, device)
    runs = [(name, impl) for name in args.variants
            for impl in (args.moe_impl if name.startswith("trainer") else [None])]
    results = []
    report = {"preset": args.preset, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
              "flops_per_token": flops_per_token, "dense_bf16_tflops": dense, "device": _device_name(device),
              "versions": _versions(), "overrides": dict(args.set), "results": results}
    with tempfile.TemporaryDirectory(prefix="dsmoe-bench-") as tmp:
        for name, impl in runs:
            label = f"{name} [{impl}]" if impl else name
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                if name.startswith("hf-"):
                    result = _measure_transformers(name[3:], args, config, data, device, Path(tmp))
                else:
                    result = _measure_trainer(name, impl, args, data, device,
                                              Path(tmp) / label.replace(" ", "_"))
            except Exception as e:  # one failing variant (an old transformers, an OOM) must not hide the others
                result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
            release_models(device)  # the variant's model and optimizer are gone with its frame
            if device.type == "cuda":
                result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            result.update(variant=label, moe_impl=impl)
            if "tokens_per_s" in result:
                result["model_tflops"] = result["tokens_per_s"] * flops_per_token / 1e12
                if dense:
                    result["mfu"] = result["model_tflops"] / dense
                    result["mfu_spec"] = result["model_tflops"] / H200_BF16_SPEC_TFLOPS
            results.append(result)
            print(f"{label}: " + (result["error"] if "error" in result else
                                  f"{result['tokens_per_s']:,.0f} tokens/s, first loss {result['first_loss']:.4f}"),
                  flush=True)
            if args.json:  # after every variant: a run cut short still leaves its numbers
                atomic_write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
    _print_checks(results)
    _print_table(results, dense is not None)
    return 0


def _train_config(args, device, **changes):
    from dsmoe.presets import get_preset
    from dsmoe.train.config import TrainConfig

    never = 10**9  # no evaluation or checkpoint inside the timed steps
    vocab = {"vocab_size": get_preset(args.preset).vocab_size}  # padded past a smaller trained tokenizer's
    values = dict(preset=args.preset, model=vocab, seq_len=args.seq_len, micro_batch=args.micro_batch, grad_accum=1,
                  steps=args.warmup + args.steps + 1 + (PROFILED_STEPS if args.profile else 0), device=str(device),
                  eval_interval=never, checkpoint_interval=never, log_interval=never, **changes)
    return TrainConfig.from_dict({**values, **dict(args.set)}, "--set")


def _training_data(args, config, device):
    """Random tokens, or the text of --data tokenized as `dsmoe train` does it; one copy for every variant."""
    from dsmoe.data.prepare import read_documents
    from dsmoe.train.data import pretraining_data, random_data
    from dsmoe.train.reduce import SingleProcess

    if not args.data:
        return random_data(config.vocab_size, args.seq_len)
    cfg = _train_config(args, device, data=args.data, vocab_size=config.vocab_size)
    docs = read_documents(cfg.data, cfg.text_field, cfg.corpus_limit_bytes())
    return pretraining_data(cfg, docs, SingleProcess(), cfg.tokenizer, None, None)


def _measure_trainer(name: str, moe_impl: str, args, data, device, out: Path) -> dict:
    """The Trainer's own step and loop (Trainer.run: what `dsmoe train` runs between its final evaluation and
    export): one step (its loss is the correctness check), the rest of the warm-up, then the timed window."""
    from dsmoe.train.trainer import Trainer

    compile_scope = {"trainer": None, "trainer+compile": "blocks", "trainer+compile-model": "model"}[name]
    cfg = _train_config(args, device, moe_impl=moe_impl, compile=compile_scope is not None,
                        compile_scope=compile_scope or "blocks")
    trainer = Trainer(cfg, out, data=data, progress=False)
    trainer.run(stop_after=1)
    first_loss = trainer.last_record["lm_loss"]
    if args.warmup > 1:
        trainer.run(stop_after=args.warmup - 1)
    trainer.run(stop_after=args.steps)
    record = trainer.last_record
    if args.profile and device.type == "cuda":
        from dsmoe.bench.profiling import cuda_profile, kernel_table

        with cuda_profile() as prof:
            trainer.run(stop_after=PROFILED_STEPS)
        print(f"where the GPU time of one {name} step goes:\n{kernel_table(prof, PROFILED_STEPS, top=20)}", flush=True)
    return {"tokens_per_s": record["tokens_per_s"], "first_loss": first_loss,
            "last_loss": record["lm_loss"], "skipped_steps": record["skipped_steps"],
            "seconds_per_step": args.micro_batch * args.seq_len / record["tokens_per_s"]}


def _measure_transformers(experts: str, args, config, data, device, tmp: Path) -> dict:
    """transformers' model from the trainer's initial weights (bf16), trained on the same batches with the same
    fused AdamW and clipping."""
    import torch
    import torch.nn.functional as F

    from dsmoe.train.optim import build_optimizer

    model = _load_transformers(_initial_weights(args, config, device, tmp), experts, device)
    cfg = _train_config(args, device)
    optimizer = build_optimizer(model, cfg)

    def step(i: int) -> torch.Tensor:
        (batch,) = data.train.batches(i, micro_batch=args.micro_batch, grad_accum=1, dp_rank=0, dp_size=1)
        batch = batch.to(device)
        logits = model(input_ids=batch.input_ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first_loss = step(0).item()
    for i in range(1, args.warmup):
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        loss = step(i)
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    return {"tokens_per_s": args.micro_batch * args.seq_len / seconds, "seconds_per_step": seconds,
            "first_loss": first_loss, "last_loss": loss.item()}


def _initial_weights(args, config, device, tmp: Path) -> Path:
    """The weights every trainer variant starts from (build_training_model: the seed, then the model), saved once
    in bf16 in the hub layout."""
    import torch

    from dsmoe.checkpoint.hf import save_pretrained
    from dsmoe.model.transformer import build_model

    folder = tmp / "initial"
    if not (folder / "config.json").is_file():
        cfg = _train_config(args, device)
        torch.manual_seed(cfg.seed)
        save_pretrained(build_model(config, device), folder, dtype=torch.bfloat16)
    return folder


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
    header = f"{'variant':<32}{'tokens/s':>12}{'vs hf-grouped_mm':>18}{'step ms':>10}"
    header += f"{'MFU':>8}{'MFU(989)':>10}{'TFLOP/s':>9}" if has_mfu else ""
    header += f"{'peak GB':>9}{'loss@1':>9}"
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<32}failed: {r['error']}")
            continue
        ratio = f"{r['tokens_per_s'] / baseline:.2f}x" if baseline else "-"
        line = f"{r['variant']:<32}{r['tokens_per_s']:>12,.0f}{ratio:>18}{r['seconds_per_step'] * 1e3:>10.1f}"
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
