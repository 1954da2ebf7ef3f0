"""metrics.jsonl (one JSON object per logged step or evaluation) and, optionally, TensorBoard.

Train records: step, tokens, loss (lm + aux), lm_loss, aux_loss, lr, grad_norm, tokens_per_s, mfu (CUDA),
maxvio (per MoE layer) and maxvio_mean, skipped_steps, elapsed_s; under expert parallelism ep_dropped (the share
of routing decisions the capacity-bounded dispatch dropped, 0 with the exact one); with adaptive routing
experts_per_token (routed experts per real token, mean over the main model's MoE layers). Eval records: step, val_loss,
val_ppl, val_nats_per_byte. On resume, records after the checkpoint's step are dropped: those steps run again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from dsmoe.atomic import atomic_write_text
from dsmoe.errors import UserError

log = logging.getLogger(__name__)


def window_means(window: list[dict], metric_names: list[str]) -> dict[str, Any]:
    """A log record's statistics of the steps since the last one: means over the steps that updated (all of them
    if none did), the last step's learning rate, maxvio per MoE layer and its mean."""
    good = [r for r in window if r["ok"]] or window

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in good]))

    maxvio = np.mean([r["maxvio"] for r in good], axis=0).tolist() if good[0]["maxvio"] else []
    return {"loss": mean("loss"), **{name: mean(name) for name in ("aux_loss", *metric_names) if name in good[0]},
            "lr": window[-1]["lr"], "grad_norm": mean("grad_norm"), "maxvio": maxvio,
            "maxvio_mean": float(np.mean(maxvio)) if maxvio else None}


def require_tensorboard():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard "
                        "(or drop --tensorboard)") from None
    return SummaryWriter


class MetricsLog:
    def __init__(self, run: Path, *, resume_step: int | None = None, tensorboard: bool = False):
        self.file = run / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and self.file.is_file():
            for number, line in enumerate(self.file.read_text(errors="replace").splitlines(), 1):
                try:
                    record = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:  # a record the crash that stopped the run cut short
                    log.warning("%s:%d is not a whole record; dropped", self.file, number)
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= resume_step:
                    self.records.append(record)
        atomic_write_text(self.file, "".join(json.dumps(r) + "\n" for r in self.records))
        self._tb = require_tensorboard()(str(run / "tensorboard"), purge_step=resume_step) if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.file, "a") as f:  # opened per record: a crash loses nothing, no handle outlives a run
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key == "step":
                    continue
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
                elif isinstance(value, list):
                    for i, v in enumerate(value):
                        self._tb.add_scalar(f"{key}/{i}", v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
