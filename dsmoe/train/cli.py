"""`dsmoe train`: train a model from flags, from a saved train_config.json, or resume a run.

  dsmoe train                                   # tiny preset, built-in corpus -> runs/tiny (~5 min on 2 cores)
  dsmoe train --preset tiny --data FILE --steps 300 --out runs/mine
  dsmoe train --resume runs/mine                # continue exactly where the last checkpoint left off
  dsmoe train --config runs/mine/train_config.json --out runs/again
  torchrun --standalone --nproc-per-node 4 -m dsmoe train --ep 2 ...   # 4 ranks: expert parallel 2 x FSDP 2

Under torchrun the same command runs data parallel x expert parallel (dsmoe.distributed): --micro-batch and
--grad-accum are per rank, so the global batch is micro-batch x grad-accum x ranks; a run resumed on another
number of ranks keeps its global batch. The parallel flags are not part of the run's config.

The training flags are generated from TrainConfig's fields; only the flags given on the command line
override a loaded config, and resuming with a flag that changes the config is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from dsmoe.cli import names_its_default
from dsmoe.distributed import flags as parallel_flags
from dsmoe.errors import UserError
from dsmoe.train.config import TrainConfig

_TYPES = {"int": int, "float": float, "str": str}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run")
    flag = lambda *names, **kw: run.add_argument(*names, default=argparse.SUPPRESS, **kw)
    flag("--out", metavar="RUN", help="run folder to create (default: runs/PRESET)")
    flag("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    flag("--config", metavar="FILE", help="start from a saved train_config.json (flags given override it)")
    flag("--overwrite", action="store_true", help="delete an earlier run in --out and start over")
    flag("--stop-after", type=int, metavar="N", help="stop after N steps of this session (checkpoint saved; "
         "continue with --resume); the schedule still spans the whole budget")
    flag("--time-limit", type=float, metavar="SECONDS", help="stop (checkpoint saved) after this long")
    flag("--cache-dir", metavar="DIR", help="token and tokenizer cache (default: $DSMOE_CACHE or ~/.cache/dsmoe)")
    flag("--no-progress", action="store_true", help="no progress bar (evaluation lines still print)")
    parallel = parallel_flags.add_arguments(parser, ac_and_compile=False)  # the config has AC and compile flags
    parallel.add_argument("--sharded-init", action="store_true", help="build the model on the meta device and "
                          "initialise each rank's shards (GPUs; for models that do not fit whole on one GPU; the "
                          "weights then differ from a one-process run with the same seed)")
    group = parser.add_argument_group("training config (saved as RUN/train_config.json)")
    for f in dataclasses.fields(TrainConfig):
        _add_field(group, f, f.default if f.default is not dataclasses.MISSING else f.default_factory())


def _add_field(group, f: dataclasses.Field, default: Any, text: str | None = None) -> None:
    """The flag of one TrainConfig field; `text` replaces the field's help (a command that reads it otherwise)."""
    flag = "--" + f.name.replace("_", "-")
    shown = "none" if default in (None, [], {}) else default
    help_text = text or f.metadata["help"]
    if not names_its_default(help_text):
        help_text += f" (default: {shown})"
    kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
    if "choices" in f.metadata:
        kw["choices"] = f.metadata["choices"]
    if "metavar" in f.metadata:
        kw["metavar"] = f.metadata["metavar"]
    kind = str(f.type)
    if kind == "bool":
        kw["action"] = argparse.BooleanOptionalAction
    elif kind.startswith("list"):  # repeated flags add up: --data a.txt --data b.txt
        kw.update(nargs="+", action="extend")
    elif kind.startswith("dict"):
        kw.update(nargs="+", type=key_value, action="extend")
    else:
        kw["type"] = _TYPES[kind.split(" | ")[0]]
    group.add_argument(flag, **kw)


def key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string


def explicit_config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line (the others keep the default or the loaded value)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if "model" in values:
        values["model"] = dict(values["model"])
    return values


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, Path, bool]:
    """-> (config, run folder, resume?) from the flags."""
    given = explicit_config_values(args)
    resume, config, out = (getattr(args, name, None) for name in ("resume", "config", "out"))
    if resume:
        if config:
            raise UserError("--resume and --config both given: --resume already uses RUN/train_config.json")
        if out and Path(out) != Path(resume):
            raise UserError("--resume continues in its own folder; drop --out")
        base = TrainConfig.load(resume).to_dict()
        return TrainConfig.from_dict({**base, **given}), Path(resume), True
    if config:
        base = TrainConfig.load(config).to_dict()
        merged = {**base, **given, "model": {**base["model"], **given.get("model", {})}}
        cfg = TrainConfig.from_dict(merged, config)
    else:
        cfg = TrainConfig(**given)
    return cfg, Path(out or f"runs/{cfg.preset}"), False


def run(args: argparse.Namespace) -> int:
    cfg, out, resume = resolve_config(args)
    stop_after, time_limit = getattr(args, "stop_after", None), getattr(args, "time_limit", None)
    if stop_after is not None and stop_after < 1:
        raise UserError("--stop-after must be at least 1")
    rt = start_runtime(args, cfg.device, "train", sharded_init=args.sharded_init)
    from dsmoe.train.trainer import Trainer

    cache_dir = getattr(args, "cache_dir", None)
    trainer = Trainer(cfg, out, resume=resume, overwrite=getattr(args, "overwrite", False),
                      reducer=rt if rt is not None and rt.world_size > 1 else None, sharded_init=args.sharded_init,
                      progress=not getattr(args, "no_progress", False),
                      cache_dir=Path(cache_dir) if cache_dir else None)
    summary = trainer.train(stop_after=stop_after, time_limit=time_limit)
    if rt is not None:
        rt.shutdown()  # only after success: a failing rank exits at once, and torchrun stops the others
    if trainer.main:
        _print_summary(summary, out)
    return 0


def start_runtime(args: argparse.Namespace, device: str, command: str, sharded_init: bool = False):
    """Under torchrun: join the process group (every rank owns the device of its LOCAL_RANK) and build the mesh
    of --ep / --dp-shard -> the trainer's reducer; None in one process. Parallel flags without torchrun, or a
    fixed --device under it, are one clear error."""
    under_torchrun = "WORLD_SIZE" in os.environ
    if not under_torchrun and (args.ep != 1 or args.dp_shard not in (-1, 1) or sharded_init
                               or args.ep_capacity_factor is not None):
        flags = "--ep, --ep-capacity-factor, --dp-shard and --sharded-init" if command == "train" else \
            "--ep, --ep-capacity-factor and --dp-shard"
        raise UserError(f"{flags} need several processes: launch with torchrun --nproc-per-node N -m dsmoe "
                        f"{command} ...")
    if not under_torchrun:
        return None
    from dsmoe.devices import resolve_device  # torch loads only once the flags are valid
    from dsmoe.distributed.runtime import init_from_env

    rt = init_from_env(ep=args.ep, dp_shard=args.dp_shard, timeout_s=args.dist_timeout,
                       device_type=resolve_device(device).type, ep_capacity_factor=args.ep_capacity_factor)
    if rt.world_size > 1 and device.startswith("cuda:"):
        raise UserError(f"--device {device}: under torchrun each rank uses the GPU of its LOCAL_RANK; "
                        "use --device cuda or auto")
    if sharded_init and (rt.world_size == 1 or rt.device.type != "cuda"):
        # DTensor draws distinct random numbers per shard only on GPUs; on the CPU every shard repeats them
        raise UserError("--sharded-init needs more than one rank on GPUs; drop it (every rank then builds the "
                        "whole model once before sharding it)")
    return rt


def run_status(summary: dict, out: Path) -> tuple[str, str]:
    """How a run ended ("done", or where it stopped and how to go on) and its last speed, for the final line."""
    status = "done" if summary["steps"] >= summary["total_steps"] else \
        f"stopped at step {summary['steps']} of {summary['total_steps']} (continue with --resume {out})"
    speed = f", last {summary['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in summary else ""
    return status, speed


def _print_summary(summary: dict, out: Path) -> None:
    status, speed = run_status(summary, out)
    speed += f" (MFU {summary['mfu']:.1%})" if "mfu" in summary else ""
    print(f"{status}: {summary['tokens']:,} tokens in {summary['elapsed_s']:.0f}s{speed}, "
          f"{summary['skipped_steps']} skipped steps")
    if "val_loss" in summary:
        per_byte = f" | {summary['val_nats_per_byte']:.4f} nats/byte" if "val_nats_per_byte" in summary else ""
        print(f"final val loss {summary['val_loss']:.4f} | perplexity {summary['val_ppl']:.2f}{per_byte}")
    print(f"run folder: {out} (model, tokenizer, metrics.jsonl, plots/loss.png, plots/expert_load.png)")
