"""The run's figures: plots/loss.png (train and validation loss, load imbalance) and plots/expert_load.png
(a MoE-layer x expert heatmap of the token share each expert received, relative to a uniform share).

Uses matplotlib's object API with the Agg canvas: no display, no global pyplot state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from dsmoe.atomic import atomic_write


def plot_loss(records: list[dict[str, Any]], path: Path) -> None:
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    fig = Figure(figsize=(8, 6.5), layout="constrained")
    ax, ax_vio = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.3])
    if train:
        key = "lm_loss" if "lm_loss" in train[-1] else "loss"  # a classifier's loss is not a language model's
        ax.plot([r["step"] for r in train], [r[key] for r in train], lw=1, color="C0", label=f"train ({key})")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color="C1", ms=4, label="validation")
        last = val[-1]
        ax.annotate(f"{last['val_loss']:.3f}", (last["step"], last["val_loss"]), textcoords="offset points",
                    xytext=(4, 6), fontsize=8, color="C1")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    if train or val:  # no line, no legend: matplotlib warns of a legend with nothing to label
        ax.legend()
    vio = [r for r in train if r.get("maxvio_mean") is not None]
    if vio:
        ax_vio.plot([r["step"] for r in vio], [r["maxvio_mean"] for r in vio], lw=1, color="C2")
    ax_vio.set_ylabel("MaxVio (mean\nover layers)")
    ax_vio.set_xlabel("step")
    ax_vio.grid(alpha=0.3)
    _save(fig, path)


def plot_expert_load(counts_LE: np.ndarray, layer_ids: list[int], path: Path, title: str) -> None:
    """counts_LE: tokens routed to each expert of each MoE layer over some steps."""
    counts = np.asarray(counts_LE, dtype=np.float64)
    E = counts.shape[1]
    relative = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) * E  # 1 = a uniform share of 1/E
    norm = TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=max(2.0, float(relative.max())))  # white = uniform
    fig = Figure(figsize=(min(4 + 0.25 * E, 16), 1.5 + 0.45 * len(layer_ids)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(relative, aspect="auto", cmap="RdBu_r", norm=norm)
    ax.set_yticks(range(len(layer_ids)), [str(i) for i in layer_ids])
    ax.set_ylabel("layer")
    ax.set_xlabel("expert")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="token share x E (1 = uniform 1/E)")
    _save(fig, path)


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
