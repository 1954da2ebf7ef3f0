"""The run folder (`--out RUN`), which training writes and every other command reads:

RUN/config.json + model.safetensors   the final model, hub layout (dsmoe.load_pretrained, transformers)
RUN/tokenizer.json, tokenizer_config.json
RUN/train_config.json                 the full resolved TrainConfig (`dsmoe train --config` runs it again)
RUN/metrics.jsonl                     one record per logged step and per evaluation
RUN/checkpoints/step_N/               resumable training state (checkpoint/training.py)
RUN/plots/loss.png, expert_load.png
RUN/tensorboard/                      with --tensorboard

The checks here stop a run before any work when the folder cannot be used, with one sentence naming the fix.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from dsmoe.atomic import atomic_write_text
from dsmoe.checkpoint.training import clean_stale, latest_checkpoint
from dsmoe.errors import UserError
from dsmoe.train.config import TrainConfig


def start_run_folder(out: Path, cfg: TrainConfig, overwrite: bool = False) -> None:
    """A new run: an empty or new folder, or an earlier run folder with overwrite=True (it is deleted)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "train_config.json").is_file():
            raise UserError(f"--out {out} is not empty and holds no dsmoe run; choose a new or empty folder")
        if not overwrite:
            raise UserError(f"{out} already holds a run: continue it with --resume {out}, or pass --overwrite "
                            "to start it over")
        shutil.rmtree(out)
    check_writable(out)
    write_config(out, cfg)


def empty_run_folder(out: Path) -> None:
    """Undo `start_run_folder` for a run that failed before its first step (the folder itself stays)."""
    for entry in out.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def open_run_for_resume(out: Path, cfg: TrainConfig) -> Path:
    """An existing run with the same config; returns its newest checkpoint."""
    if not (out / "train_config.json").is_file():
        raise UserError(f"{out} holds no dsmoe run (no train_config.json); check the path, or start a run there "
                        "with --out")
    saved = TrainConfig.load(out)
    changed = saved.differences(cfg)
    if changed:
        name = changed[0]
        flag = "--" + name.replace("_", "-")
        raise UserError(f"{out} was trained with {flag} {getattr(saved, name)!r}, not {getattr(cfg, name)!r}: "
                        f"resume without changing it, or start a new run with --out NEW_FOLDER")
    check_writable(out)
    clean_stale(out / "checkpoints")  # a save killed after its last write is complete: it counts
    checkpoint = latest_checkpoint(out / "checkpoints")
    if checkpoint is None:
        raise UserError(f"{out} has no checkpoint to resume from yet; start it over with --overwrite")
    return checkpoint


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {out} ({e.strerror}); choose a writable --out folder") from None


def write_config(out: Path, cfg: TrainConfig) -> None:
    atomic_write_text(out / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
