"""The results of `dsmoe experiment`, read back from the rows' run folders: one table, one loss-curve plot, and
optionally the `dsmoe analyze` comparison of the trained MoE models.

Per arm: final validation loss (mean ± sample standard deviation over seeds); the paired difference to the first
arm (per seed, arm minus reference, then mean ± sd: the data order and non-FFN weights are shared within a seed,
so this spread is what to judge a gap by); MaxVio of the training batches at the end (mean over MoE layers and
over the last logged windows); training tokens/s; active / total parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

REDUNDANCY_SHARES = (1 / 8, 1 / 4)  # share of each layer's routed experts the comparison disables


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarise(rows, out: Path, shards_meta: dict) -> dict:
    from dsmoe.checkpoint.hf import read_config

    per_row = []
    for row in rows:
        run = out / "runs" / row.name
        records = _records(run)
        tokens_per_step = row.config.tokens_per_step()
        train = [r for r in records if "loss" in r]
        val = [r for r in records if "val_loss" in r]
        vio = [(r["tokens"], r["maxvio_mean"]) for r in train if r.get("maxvio_mean") is not None]
        config, _ = read_config(run)
        adaptive = config.routing_top_p is not None
        used = [r["experts_per_token"] for r in train if "experts_per_token" in r]  # logged under adaptive routing
        if used:
            k = float(np.mean(used[-3:]))
        else:  # fixed top-k uses k; an adaptive run from before the metric was logged is unknown
            k = None if adaptive or not config.n_routed_experts else float(config.num_experts_per_tok)
        per_row.append({
            "arm": row.arm, "seed": row.seed, "run": str(run), "val_loss": val[-1]["val_loss"],
            "curve": [(r["step"] * tokens_per_step, r["val_loss"]) for r in val], "maxvio_curve": vio,
            "maxvio_end": float(np.mean([v for _, v in vio[-3:]])) if vio else None, "experts_per_token_end": k,
            "adaptive": adaptive,
            "tokens_per_s": float(np.median([r["tokens_per_s"] for r in train[1:] or train])),
            "params": config.num_params(), "active_params": config.num_params(active=True),
            "tokens": row.config.total_steps() * tokens_per_step})
    arms = list(dict.fromkeys(r["arm"] for r in per_row))
    reference = {r["seed"]: r["val_loss"] for r in per_row if r["arm"] == arms[0]}
    summary = {}
    for arm in arms:
        mine = [r for r in per_row if r["arm"] == arm]
        mean, sd = _mean_sd([r["val_loss"] for r in mine])
        diffs = [r["val_loss"] - reference[r["seed"]] for r in mine if r["seed"] in reference]
        d_mean, d_sd = _mean_sd(diffs) if diffs else (None, None)
        vios = [r["maxvio_end"] for r in mine if r["maxvio_end"] is not None]
        summary[arm] = {"val_loss_mean": mean, "val_loss_sd": sd, "seeds": [r["seed"] for r in mine],
                        "val_losses": [r["val_loss"] for r in mine], "paired_diff_mean": d_mean,
                        "paired_diff_sd": d_sd, "maxvio_end": float(np.mean(vios)) if vios else None,
                        "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in mine])),
                        "experts_per_token_end": None if any(r["experts_per_token_end"] is None for r in mine)
                        else float(np.mean([r["experts_per_token_end"] for r in mine])),
                        "params": mine[0]["params"], "active_params": mine[0]["active_params"]}
    tokens = per_row[0]["tokens"]
    return {"reference_arm": arms[0], "tokens_per_run": tokens, "train_tokens": shards_meta["train_tokens"],
            "val_tokens": shards_meta["val_tokens"], "epochs": tokens / max(shards_meta["train_tokens"], 1),
            "data": rows[0].config.data or ["built-in corpus"], "arms": summary, "rows": per_row}


def compare_analyses(rows, out: Path, specs: list[str], text_field: str, tokens: int, device_name: str) -> list[dict]:
    """`dsmoe analyze` of each MoE arm's model of the first seed: the redundancy probe at equal shares of the
    routed experts disabled, and the domain specialisation."""
    import torch

    from dsmoe.analysis.analyze import analyze, write_outputs
    from dsmoe.checkpoint.hf import load_pretrained
    from dsmoe.data.tokenizer import load_tokenizer
    from dsmoe.devices import resolve_device

    device = resolve_device(device_name)
    on_gpu = device.type == "cuda"
    seed = rows[0].seed
    results = []
    for row in (r for r in rows if r.seed == seed):
        run = out / "runs" / row.name
        model = load_pretrained(run, dtype=torch.bfloat16 if on_gpu else torch.float32, device=device)
        if not model.moe_layers():
            continue
        E, K = model.config.n_routed_experts, model.config.num_experts_per_tok
        disable = sorted({min(max(1, round(E * share)), E - K) for share in REDUNDANCY_SHARES})
        report, arrays = analyze(model, load_tokenizer(run), specs, text_field=text_field, tokens=tokens,
                                 seq_len=row.config.seq_len, batch_size=row.config.micro_batch, disable=disable,
                                 device=device, autocast_dtype=torch.bfloat16 if on_gpu else None, name=row.name)
        write_outputs(report, arrays, model.config.main_moe_layer_ids, out / "analysis" / row.arm)
        results.append({"arm": row.arm, "routed_experts": E, "loss": report["loss"],
                        "redundancy": [{k: r[k] for k in ("disabled", "top_rise", "random_rise", "random_spread")}
                                       | {"share": r["disabled"] / E} for r in report["redundancy"]],
                        "shared_removed_rise": (report["shared_ablation"] or {}).get("rise"),
                        **{k: report["summary"][k] for k in ("specialisation_mean", "domain_mi_bits_mean",
                                                               "maxvio_mean")}})
    return results


def table(results: dict, name: str) -> str:
    from dsmoe.analysis.report import markdown_table

    ref = results["reference_arm"]
    lines = [f"# dsmoe experiment {name}", "",
             f"{results['tokens_per_run']:,} training tokens per run ({results['epochs']:.2f} epochs of "
             f"{results['train_tokens']:,}; data: {', '.join(results['data'])}); validation on "
             f"{results['val_tokens']:,} held-out tokens; paired differences against `{ref}` within each seed"
             + (f"; tokens/s of each run while {results['parallel']} ran at once" if results.get("parallel", 1) > 1
                else "") + ".", ""]
    adaptive = any(r.get("adaptive") for r in results["rows"])  # then the experts per token are worth a column
    rows = [_arm_row(arm, a, ref) for arm, a in results["arms"].items()]
    if adaptive:
        rows = [row + ["-" if a["experts_per_token_end"] is None else f"{a['experts_per_token_end']:.2f}"]
                for row, a in zip(rows, results["arms"].values())]
    lines += markdown_table(
        ["arm", "val loss (mean ± sd)", f"Δ vs {ref} (paired, mean ± sd)", "MaxVio at the end", "tokens/s",
         "active / total params", *(["routed experts per token (end)"] if adaptive else [])], rows, left=1)
    if results.get("analysis"):
        lines += ["", "`dsmoe analyze` of the first seed's models (loss rise when each layer loses that share of its "
                  "routed experts: the most-routed ones, or random ones; specialisation = MI(expert; domain) / "
                  "H(domain), mean over layers):", ""]
        lines += markdown_table(
            ["arm", "disabled per layer", "rise, most-routed", "rise, random", "specialisation", "MI (bits)",
             "shared removed"],
            [_analysis_row(a, r, i == 0) for a in results["analysis"] for i, r in enumerate(a["redundancy"])], left=2)
    return "\n".join(lines) + "\n"


def _spread(sd: float, seeds: int) -> str:
    """" ± sd" over several seeds; nothing for one, whose sd says nothing."""
    return f" ± {sd:.4f}" if seeds > 1 else ""


def _arm_row(arm: str, a: dict, ref: str) -> list[str]:
    seeds = len(a["seeds"])
    diff = "-" if arm == ref or a["paired_diff_mean"] is None else \
        f"{a['paired_diff_mean']:+.4f}{_spread(a['paired_diff_sd'], seeds)}"
    vio = "-" if a["maxvio_end"] is None else f"{a['maxvio_end']:.3f}"
    return [arm, f"{a['val_loss_mean']:.4f}{_spread(a['val_loss_sd'], seeds)} (n={seeds})", diff, vio,
            f"{a['tokens_per_s']:,.0f}", f"{a['active_params'] / 1e6:.2f}M / {a['params'] / 1e6:.2f}M"]


def _analysis_row(a: dict, r: dict, first: bool) -> list[str]:
    """One row per probe size; the arm's own columns only on its first row."""
    shared = "-" if a["shared_removed_rise"] is None else f"{a['shared_removed_rise']:+.3f}"
    own = [a["arm"], f"{a['specialisation_mean']:.4f}", f"{a['domain_mi_bits_mean']:.4f}", shared] if first \
        else ["", "", "", ""]
    return [own[0], f"{r['disabled']} of {a['routed_experts']} ({r['share']:.0%})", f"{r['top_rise']:+.4f}",
            f"{r['random_rise']:+.4f} ± {r['random_spread']:.4f}", *own[1:]]


def write_results(results: dict, name: str, out: Path) -> None:
    from dsmoe.analysis.figures import plot_experiment
    from dsmoe.atomic import atomic_write_text

    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "table.md", table(results, name))
    arms = list(results["arms"])
    curves = {arm: [r["curve"] for r in results["rows"] if r["arm"] == arm] for arm in arms}
    maxvio = {arm: [r["maxvio_curve"] for r in results["rows"] if r["arm"] == arm] for arm in arms}
    plot_experiment(curves, maxvio, f"dsmoe experiment {name}: {results['tokens_per_run']:,} tokens per run, "
                    f"{len(results['rows']) // max(len(arms), 1)} seeds", out / "loss.png")
