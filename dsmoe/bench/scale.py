"""`dsmoe bench scale`: expert-parallel weak scaling and all-to-all bandwidth of `dsmoe train`'s Trainer, under
torchrun.

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node N -m dsmoe bench scale --preset small

One run, everything measured in it, every step the Trainer's own (dsmoe.train.Trainer.run on random tokens: clipping,
schedule, aux-free update, on-device skip, its metrics record):
  1. one GPU (rank 0 alone, the others wait): a one-process Trainer (EP = 1) trains on the per-GPU micro-batch;
     before training it computes the loss of the whole global batch (the correctness reference);
  2. all N GPUs: the Trainer under torchrun (same seed, EP = N by default, FSDP2) trains on the same per-GPU
     micro-batch; its loss on the same global batch must match the one-GPU loss;
  3. every EP dispatch all-to-all of those steps is timed and replayed by a bare NCCL all_to_all_single
     with the same split sizes (same bytes); then two profiled steps give the share of step time where only
     communication kernels run (exposed communication).
  4. on both, a few more steps split into the trainer's phases (loss forward, backward, clip + optimizer), each
     phase with a device sync after it: the host time to enqueue a phase next to its wall time shows whether the
     host (Python, launches, host syncs) or the device bounds it.
  5. with --ep-capacity-factor F, steps 2-4 again on the same N-GPU model with the sync-free dispatch
     (dsmoe.distributed.ep_dispatch: fixed buffers, no host read per MoE layer), after the exact dispatch: the
     table then has one block per dispatch, with the share of routing decisions dropped (its loss is compared
     with one GPU's when nothing was dropped).
The table comes last. Weak scaling = tokens/s per GPU at EP = N over tokens/s on one GPU (goal >= 0.85);
dispatch bandwidth over the replay's (goal >= 0.9).

--baseline local is for models that do not fit on one GPU: the one-GPU run then holds E / N experts (the
same expert FLOPs per token as one EP rank), the N-GPU model is initialised after sharding, and there is
no loss check. With --nproc-per-node 1 the run checks that NCCL initialises and the code path runs.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch

from dsmoe.presets import PRESETS, get_preset
from dsmoe.devices import add_moe_impl_argument
from dsmoe.distributed import flags

BYTES_GB = 1e9
CHECK_STEP = 999_999  # the batches of the loss check: a step that training never reaches


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model preset")
    parser.add_argument("--layers", type=int, help="override num_hidden_layers")
    parser.add_argument("--experts", type=int, help="override n_routed_experts")
    parser.add_argument("--batch", type=int, default=4, help="per-GPU micro-batch, sequences")
    parser.add_argument("--seq", type=int, default=2048, help="sequence length")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--param-dtype", default="fp32", choices=["fp32", "bf16"],
                        help="the trainer's --param-dtype (fp32: fp32 master weights with bf16 autocast on CUDA)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="the trainer's --dtype")
    add_moe_impl_argument(parser)
    parser.add_argument("--baseline", default="full", choices=["full", "local"],
                        help="one-GPU model: the full model, or E/N experts (a model that only fits sharded)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the random tokens")
    parser.add_argument("--trace-dir", help="keep rank 0's profiler trace (Chrome JSON) here")
    flags.add_arguments(parser)
    parser.set_defaults(ep=-1)  # -1: EP over every rank


def _model_overrides(args, ep: int | None = None) -> dict:
    """--layers / --experts; with ep, E / ep experts on one GPU: the expert FLOPs per token of one EP rank
    (routing groups dropped)."""
    changes = {}
    if args.layers:
        changes["num_hidden_layers"] = args.layers
    if args.experts:
        changes["n_routed_experts"] = args.experts
    if ep is not None:
        config = get_preset(args.preset).replace(**changes)
        experts = config.n_routed_experts // ep
        changes.update(n_routed_experts=experts, n_group=1, topk_group=1,
                       num_experts_per_tok=min(config.num_experts_per_tok, experts))
    return changes


def _trainer(args, rt, model: dict, distributed: bool, sharded_init: bool = False):
    """The Trainer `dsmoe train` runs, on random tokens of the preset's vocabulary, nothing saved."""
    from dsmoe.train.config import TrainConfig
    from dsmoe.train.data import random_data
    from dsmoe.train.trainer import Trainer

    never = 10**9
    cfg = TrainConfig(preset=args.preset, model=model, seq_len=args.seq, micro_batch=args.batch, steps=never,
                      dtype=args.dtype, param_dtype=args.param_dtype, moe_impl=args.moe_impl,
                      activation_checkpointing=args.ac, compile=args.compile, seed=args.seed, device=rt.device.type,
                      eval_interval=never, log_interval=never, checkpoint_interval=0)
    data = random_data(get_preset(args.preset).vocab_size, args.seq, args.seed)
    return Trainer(cfg, tempfile.mkdtemp(prefix="dsmoe-scale-"), reducer=rt if distributed else None, data=data,
                   progress=False, sharded_init=sharded_init)


def _batch(trainer, step: int, rank: int, world: int):
    (batch,) = trainer.data.train.batches(step, micro_batch=trainer.cfg.micro_batch, grad_accum=1, dp_rank=rank,
                                          dp_size=world)
    return batch.to(trainer.device)


@torch.no_grad()
def _loss(trainer, batch) -> torch.Tensor:
    with trainer._autocast():
        return trainer.loss_fn(trainer.model, batch)[0].float()


def _run(trainer, steps: int) -> float:
    """Seconds of `steps` steps of the Trainer's loop, from its own throughput record."""
    trainer.run(stop_after=steps)
    record = trainer.last_record
    return steps * trainer.sequences_per_step * trainer.cfg.seq_len / record["tokens_per_s"]


PHASES = ("forward", "backward", "clip + optimizer")


def _phases(trainer, rt, first_step: int, align: bool, steps: int = 3) -> dict:
    """{phase: [host ms to enqueue it, wall ms until the device finished it]}, means over `steps` steps of the
    trainer's pieces (its loss function, backward, its clipping and optimizer), each phase started after a
    device sync (and, with align, a barrier so that every rank starts it together)."""
    state: dict = {}
    model, optimizer = trainer.model, trainer.optimizer

    def forward(step: int) -> None:
        batch = _batch(trainer, step, rt.rank, rt.world_size if trainer.distributed else 1)
        with trainer._autocast():
            state["loss"] = trainer.loss_fn(model, batch)[0]

    def update() -> None:
        trainer._clip_grad_norm(model.parameters(), trainer.cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    totals = {name: [0.0, 0.0] for name in PHASES}
    for step in range(first_step, first_step + steps):
        work = (lambda step=step: forward(step), lambda: state["loss"].backward(), update)
        for name, fn in zip(PHASES, work):
            _sync(rt.device)
            if align:
                rt.barrier()
            start = time.perf_counter()
            fn()
            enqueued = time.perf_counter()
            _sync(rt.device)
            totals[name][0] += (enqueued - start) * 1e3 / steps
            totals[name][1] += (time.perf_counter() - start) * 1e3 / steps
    return totals


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def _one_gpu(args, rt) -> dict:
    """Rank 0 alone: reference loss of the global batch, then tokens/s at EP = 1."""
    full = args.baseline == "full"
    trainer = _trainer(args, rt, _model_overrides(args, None if full else rt.world_size), distributed=False)
    out = {}
    if full:
        losses = [_loss(trainer, _batch(trainer, CHECK_STEP, r, rt.world_size)).item() for r in range(rt.world_size)]
        out["loss"] = sum(losses) / len(losses)
    _run(trainer, args.warmup)
    out["seconds"] = _run(trainer, args.steps)
    out["mfu"] = trainer.last_record.get("mfu")
    out["phases"] = _phases(trainer, rt, trainer.step, align=False)
    out["peak_gib"] = _peak_gib(rt.device)
    del trainer
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(rt.device)
    return out


def _profile_split(trainer, args, rt) -> dict:
    """Compute / exposed communication / idle shares of two profiled steps (CUDA only)."""
    from dsmoe.bench.scale_timing import kernels_from_trace, step_time_split

    if rt.device.type != "cuda":
        return {}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        trainer.run(stop_after=2)
    folder = args.trace_dir if (args.trace_dir and rt.is_main) else tempfile.mkdtemp()
    os.makedirs(folder, exist_ok=True)
    trace = os.path.join(folder, f"scale_trace_rank{rt.rank}.json")
    prof.export_chrome_trace(trace)
    split = step_time_split(kernels_from_trace(trace))
    if not (args.trace_dir and rt.is_main):
        os.remove(trace)
    return split


def _many_gpus(args, rt) -> dict:
    """The N-GPU Trainer with the exact dispatch and, with --ep-capacity-factor, the sync-free one (switched on the
    same model): {mode: loss check and measurements}, peak_gib."""
    from dsmoe.distributed.expert_parallel import dropped_share, ep_layers

    local = args.baseline == "local"
    trainer = _trainer(args, rt, _model_overrides(args), distributed=True, sharded_init=local)
    layers = ep_layers(trainer.model)
    modes = {"exact": None}
    if args.ep_capacity_factor is not None:
        modes[f"sync-free (capacity factor {args.ep_capacity_factor:g})"] = args.ep_capacity_factor
    out: dict = {"modes": {mode: {} for mode in modes}}
    for phase in ("loss", "measure"):  # every loss check before the first training step
        for mode, factor in modes.items():
            for layer in layers:
                layer.capacity_factor = factor
            result = out["modes"][mode]
            if phase == "measure":
                result.update(_measure(trainer, args, rt))
            elif not local:
                loss = _loss(trainer, _batch(trainer, CHECK_STEP, rt.rank, rt.world_size))
                result["loss"] = rt.reduce(loss, "mean").item()
                result["loss_dropped"] = rt.reduce(dropped_share(layers), "mean").item() if layers else 0.0
    out["peak_gib"] = rt.reduce(torch.tensor(_peak_gib(rt.device)), "max").item()
    return out


def _measure(trainer, args, rt) -> dict:
    """Warm-up, timed steps with every dispatch all-to-all recorded and replayed bare, phases, profile split."""
    from dsmoe.bench.scale_timing import DispatchRecorder, replay_all_to_all
    from dsmoe.distributed.expert_parallel import ep_layers

    recorder = DispatchRecorder(rt.device)
    recorder.attach(ep_layers(trainer.model))
    _run(trainer, args.warmup)
    recorder.enabled = True
    seconds = _run(trainer, args.steps)
    recorder.enabled = False
    out = {"seconds": rt.reduce(torch.tensor(seconds), "max").item(), "mfu": trainer.last_record.get("mfu"),
           "dropped": trainer.last_record.get("ep_dropped")}
    calls = recorder.calls()
    if calls:
        sent = sum(c[3] for c in calls)
        dispatch_s = sum(c[4] for c in calls)
        replay_s = replay_all_to_all(calls, rt.device, rt.mesh.ep_mesh.get_group())
        totals = rt.reduce(torch.tensor([sent, dispatch_s, replay_s], dtype=torch.float64), "sum")
        out["dispatch_gbps"] = totals[0].item() / totals[1].item() / BYTES_GB
        out["replay_gbps"] = totals[0].item() / totals[2].item() / BYTES_GB
    phases = _phases(trainer, rt, trainer.step, align=True)
    worst = rt.reduce(torch.tensor([v for name in PHASES for v in phases[name]]), "max").tolist()
    out["phases"] = {name: worst[2 * i:2 * i + 2] for i, name in enumerate(PHASES)}
    split = _profile_split(trainer, args, rt)
    if split:
        shares = rt.reduce(torch.tensor([split["compute"], split["exposed_comm"], split["idle"]]), "mean")
        out["split"] = dict(zip(("compute", "exposed_comm", "idle"), shares.tolist()))
    return out


def _table(args, rt, config, one: dict, many: dict) -> tuple[str, bool]:
    tokens = args.batch * args.seq
    tps_one = tokens * args.steps / one["seconds"]
    ep = rt.mesh.dims.ep if rt.mesh else 1
    bf16 = args.param_dtype == "bf16" or args.dtype == "bf16" or (args.dtype == "auto" and rt.device.type == "cuda")
    precision = f"{args.param_dtype} weights" + (", bf16 compute" if bf16 else "")
    described = f"{args.preset}: {config.num_params() / 1e9:.2f}B params, {config.n_routed_experts} experts"
    rows = [("metric", "value", "goal"),
            ("model", f"{described}, {config.num_hidden_layers} layers", ""),
            ("GPUs / EP / dp_shard", f"{rt.world_size} / {ep} / {rt.world_size // ep}", ""),
            ("per-GPU micro-batch", f"{args.batch} x {args.seq} = {tokens} tokens, {precision}", ""),
            ("1 GPU tokens/s" + (" (E/N experts)" if args.baseline == "local" else ""), f"{tps_one:,.0f}", "")]
    ok = True
    for mode, result in many["modes"].items():
        prefix = "" if mode == "exact" else f"{mode}: "
        mode_rows, mode_ok = _mode_rows(prefix, args, rt, one, result, tps_one, bf16)
        rows += [(f"EP dispatch: {mode}", "", "")] + mode_rows
        ok &= mode_ok
    rows.append(("peak memory GiB: 1 GPU / per GPU", f"{one['peak_gib']:.1f} / {many['peak_gib']:.1f}", ""))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, width)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in width) + "|")
    return "\n".join(lines), ok


def _mode_rows(prefix: str, args, rt, one: dict, many: dict, tps_one: float, bf16: bool) -> tuple[list, bool]:
    """The rows of one dispatch mode of the N-GPU run (prefix: the mode's name, empty for the exact one)."""
    tps_many = args.batch * args.seq * args.steps / many["seconds"]
    rows = [(f"{prefix}{rt.world_size} GPUs tokens/s per GPU", f"{tps_many:,.0f}", ""),
            (f"{prefix}weak scaling", f"{tps_many / tps_one:.3f}", ">= 0.85")]
    if many.get("mfu") is not None:
        rows.append((f"{prefix}MFU (vs measured dense): 1 GPU / per GPU", f"{one['mfu']:.1%} / {many['mfu']:.1%}", ""))
    if prefix and many.get("dropped") is not None:
        rows.append((f"{prefix}routing decisions dropped (last steps)", f"{many['dropped']:.2%}", ""))
    if "dispatch_gbps" in many:
        rows += [(f"{prefix}dispatch all-to-all GB/s per rank", f"{many['dispatch_gbps']:.3g}", ""),
                 (f"{prefix}bare all_to_all_single, same bytes, GB/s", f"{many['replay_gbps']:.3g}", ""),
                 (f"{prefix}dispatch / bare all-to-all", f"{many['dispatch_gbps'] / many['replay_gbps']:.3f}",
                  ">= 0.9")]
    if "split" in many:
        s = many["split"]
        rows += [(f"{prefix}step time: exposed communication", f"{s['exposed_comm']:.1%}", ""),
                 (f"{prefix}step time: compute / idle", f"{s['compute']:.1%} / {s['idle']:.1%}", "")]
    ok = True
    if "loss" in one and "loss" in many:
        tol = 2e-2 if bf16 else 1e-4
        diff = abs(one["loss"] - many["loss"]) / max(1e-9, abs(one["loss"]))
        check = f"{many['loss']:.4f} vs {one['loss']:.4f} (rel {diff:.1e})"
        if many["loss_dropped"] > 0:  # dropped routing decisions change the loss: not comparable
            check += f", {many['loss_dropped']:.2%} of routing decisions dropped: not compared"
        else:
            ok = diff <= tol and math.isfinite(many["loss"])
            check += " ok" if ok else " MISMATCH"
        rows.append((f"{prefix}loss, global batch: N GPUs vs 1 GPU", check, f"rel <= {tol:g}"))
    for name in PHASES:
        (h1, w1), (hn, wn) = one["phases"][name], many["phases"][name]
        rows.append((f"{prefix}{name} ms, host enqueue / wall: 1 GPU; {rt.world_size} GPUs",  # no "|": a markdown cell
                     f"{h1:.1f} / {w1:.1f}; {hn:.1f} / {wn:.1f}", ""))
    return rows, ok


def run(args: argparse.Namespace) -> int:
    from dsmoe.distributed.runtime import init_from_env

    world = int(os.environ.get("WORLD_SIZE", "1"))
    # the dispatch mode is switched on the model (exact first, then --ep-capacity-factor): not in the mesh
    rt = init_from_env(ep=world if args.ep == -1 else args.ep, dp_shard=args.dp_shard, timeout_s=args.dist_timeout)
    try:
        config = get_preset(args.preset).replace(**_model_overrides(args))
        if rt.is_main:
            backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
            print(f"dsmoe bench scale: {rt.world_size} rank(s), backend {backend}, device {rt.device}", flush=True)
        one = _one_gpu(args, rt) if rt.is_main else {}
        rt.barrier()
        many = _many_gpus(args, rt)
        if not rt.is_main:
            return 0
        table, ok = _table(args, rt, config, one, many)
        print(table, flush=True)
        return 0 if ok else 1
    finally:
        rt.shutdown()
