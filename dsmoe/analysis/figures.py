"""Figures of `dsmoe analyze` and `dsmoe experiment`: heatmaps of routing and loss curves of experiment rows.

The load heatmap (layer x expert) is the trainer's own (dsmoe.train.plots.plot_expert_load); this module adds the
domain x expert and expert x expert heatmaps of one layer and the experiment plot. matplotlib object API, Agg.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from dsmoe.train.plots import _save


def _heatmap(ax, values: np.ndarray, label: str, fig: Figure) -> None:
    limit = max(1.0, float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0)
    image = ax.imshow(values, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -limit, limit),
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, label=label)


def plot_domain_experts(domain_share_DE: np.ndarray, domains: list[str], layer_id: int, mi_bits: float,
                        path: Path) -> None:
    """Each domain's share of routings per expert relative to the expert's share of the whole sample (log2):
    red = the expert takes more of this domain than of the mix."""
    share = np.asarray(domain_share_DE, dtype=np.float64)
    overall = share.mean(axis=0, keepdims=True)
    lift = np.log2(np.maximum(share, 1e-6) / np.maximum(overall, 1e-6))
    E = share.shape[1]
    fig = Figure(figsize=(min(4 + 0.25 * E, 16), 1.8 + 0.4 * len(domains)), layout="constrained")
    ax = fig.subplots()
    _heatmap(ax, lift, "log2(domain share / mean share)", fig)
    ax.set_yticks(range(len(domains)), domains)
    ax.set_xlabel("expert")
    ax.set_title(f"domain specialisation, layer {layer_id} (MI expert-domain {mi_bits:.3f} bits)")
    _save(fig, path)


def plot_coactivation(lift_EE: np.ndarray, layer_id: int, path: Path) -> None:
    """log2 of P(i and j) / (P(i) P(j)): red pairs fire together more than chance, blue less."""
    E = lift_EE.shape[0]
    fig = Figure(figsize=(min(3 + 0.18 * E, 14), min(2.5 + 0.18 * E, 13)), layout="constrained")
    ax = fig.subplots()
    _heatmap(ax, np.log2(np.maximum(lift_EE, 1e-3)), "log2 co-activation lift", fig)
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    ax.set_title(f"expert co-activation, layer {layer_id}")
    _save(fig, path)


def plot_experiment(curves: dict[str, list[list[tuple[int, float]]]], maxvio: dict[str, list[list[tuple[int, float]]]],
                    title: str, path: Path) -> None:
    """Validation loss against tokens for each arm (one line per seed, one colour per arm); below it the MaxVio
    of the training batches when any arm has MoE layers."""
    has_vio = any(any(series) for series in maxvio.values())
    fig = Figure(figsize=(8, 6.5 if has_vio else 4.8), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.3]) if has_vio else [fig.subplots()]
    for color, (arm, runs) in enumerate(curves.items()):
        for seed, points in enumerate(runs):
            if points:
                x, y = zip(*points)
                axes[0].plot(np.asarray(x) / 1e6, y, "o-" if len(x) < 12 else "-", ms=3, lw=1.2, color=f"C{color}",
                             alpha=1.0 if seed == 0 else 0.55, label=arm if seed == 0 else None)
        if has_vio:
            for seed, points in enumerate(maxvio.get(arm, [])):
                if points:
                    x, y = zip(*points)
                    axes[1].plot(np.asarray(x) / 1e6, y, lw=1, color=f"C{color}", alpha=1.0 if seed == 0 else 0.55)
    axes[0].set_ylabel("validation loss (nats/token)")
    axes[0].set_title(title)
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    if has_vio:
        axes[1].set_ylabel("MaxVio (batch,\nmean of layers)")
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("training tokens (millions)")
    _save(fig, path)
