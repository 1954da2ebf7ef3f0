"""From routing totals to the numbers of the `dsmoe analyze` report (JSON) and its short markdown summary.

Definitions (per MoE layer):
- load share of expert i: its routings / all routings; MaxVio = (max load - mean load) / mean load
  (model/balance.py's max_violation).
- routing entropy: mean over tokens of H(p_t), p_t the token's affinities normalised to sum 1, in nats and as a
  share of log E (1 = every token spreads evenly).
- co-activation lift of experts (i, j): P(i and j chosen) / (P(i) P(j)); above 1 = they fire together more than
  chance.
- domain specialisation: the mutual information between expert and domain (input file) of a routing, in bits,
  and as a share of the domain entropy H(domain) (0 = every expert sees the domains in the mix of the sample,
  1 = the expert identifies the domain).
- characteristic tokens of an expert: the tokens with the largest contribution n(e, v) log(n(e, v) N /
  (n(e) n(v))) to the mutual information between expert and token: frequent and concentrated on that expert.
- shared share: sum over tokens of |shared output| / (|shared output| + |routed output|).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dsmoe.analysis.collect import RoutingTotals
from dsmoe.data.tokenizer import Tokenizer
from dsmoe.model.balance import max_violation


def mutual_information_bits(joint: np.ndarray) -> float:
    """I(X; Y) in bits of a joint count table."""
    p = joint / max(joint.sum(), 1)
    outer = p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log2(p[nz] / outer[nz])).sum())


def entropy_bits(counts: np.ndarray) -> float:
    p = counts / max(counts.sum(), 1)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def coactivation_lift(coactivation_EE: np.ndarray, tokens: int) -> np.ndarray:
    """P(i and j) / (P(i) P(j)) with the diagonal set to nan (an expert always fires with itself)."""
    chosen = np.diag(coactivation_EE)
    lift = coactivation_EE * tokens / np.maximum(np.outer(chosen, chosen), 1)
    np.fill_diagonal(lift, np.nan)
    return lift


MIN_PAIR_TOKENS = 20  # a lift from a few tokens is noise: two experts chosen once each, together, have lift T


def top_coactivated_pairs(coactivation_EE: np.ndarray, tokens: int, top: int = 5) -> list[dict]:
    """The expert pairs chosen together most often relative to chance (lift), among pairs chosen together by at
    least MIN_PAIR_TOKENS tokens."""
    lift = coactivation_lift(coactivation_EE, tokens)
    ranked = np.triu(np.where(coactivation_EE >= MIN_PAIR_TOKENS, np.nan_to_num(lift, nan=0.0), 0.0), 1)
    order = np.argsort(-ranked, axis=None)[:top]
    return [{"experts": [int(i), int(j)], "lift": float(lift[i, j]), "tokens": int(coactivation_EE[i, j])}
            for i, j in zip(*np.unravel_index(order, lift.shape)) if ranked[i, j] > 0]


def characteristic_tokens(token_expert_EV: torch.Tensor, tokenizer: Tokenizer, top: int) -> list[list[dict]]:
    n = token_expert_EV.double()
    n_e, n_v, total = n.sum(1, keepdim=True), n.sum(0, keepdim=True), n.sum()
    score = torch.special.xlogy(n, n * total / (n_e * n_v).clamp_min(1))
    values, ids = score.topk(min(top, n.shape[1]), dim=1)
    counts = n.gather(1, ids)
    return [[{"token": tokenizer.decode([int(v)]), "id": int(v), "count": int(c)}
             for v, c, s in zip(row_ids.tolist(), row_counts.tolist(), row_values.tolist()) if s > 0]
            for row_ids, row_counts, row_values in zip(ids, counts, values)]


def layer_statistics(totals: RoutingTotals, layer_ids: list[int], tokenizer: Tokenizer,
                     top_tokens: int = 8) -> list[dict]:
    E = totals.counts_LE.shape[1]
    maxvio = max_violation(torch.from_numpy(totals.counts_LE)).tolist()
    layers = []
    for l, layer_id in enumerate(layer_ids):
        counts = totals.counts_LE[l]
        domain = totals.domain_counts_LDE[l]
        h_domain = entropy_bits(domain.sum(axis=1))
        mi = mutual_information_bits(domain)
        entropy = float(totals.entropy_sum_L[l] / max(totals.tokens, 1))
        shared, routed = totals.shared_norm_L[l], totals.routed_norm_L[l]
        layers.append({
            "layer": layer_id, "maxvio": maxvio[l], "load_share": (counts / max(counts.sum(), 1)).tolist(),
            "routing_entropy_nats": entropy, "routing_entropy_share": entropy / math.log(E),
            "domain_mi_bits": mi, "specialisation": mi / h_domain if h_domain > 0 else 0.0,
            "domain_share": (domain / np.maximum(domain.sum(axis=1, keepdims=True), 1)).tolist(),
            "shared_norm_share": float(shared / (shared + routed)) if shared > 0 else None,
            "top_coactivated_pairs": top_coactivated_pairs(totals.coactivation_LEE[l], totals.tokens),
            "characteristic_tokens": characteristic_tokens(totals.token_expert_LEV[l], tokenizer, top_tokens),
            **experts_per_token(totals, l, tokenizer, top_tokens),
        })
    return layers


def experts_per_token(totals: RoutingTotals, layer: int, tokenizer: Tokenizer, top: int, min_count: int = 5) -> dict:
    """How many routed experts tokens used (fixed under top-k; spread under adaptive routing), and the tokens
    that took the most on average (seen at least min_count times)."""
    hist = totals.experts_per_token_LK[layer]
    mean = float((hist * np.arange(len(hist))).sum() / max(hist.sum(), 1))
    out = {"experts_per_token_mean": mean, "experts_per_token_hist": hist.tolist()}
    if np.count_nonzero(hist) > 1:
        freq = totals.token_counts_V
        used_V = totals.token_expert_LEV[layer].sum(dim=0).cpu().numpy()
        seen = np.flatnonzero(freq >= min_count)
        per_token = used_V[seen] / freq[seen]
        order = seen[np.argsort(-per_token)[:top]]
        out["tokens_taking_most_experts"] = [
            {"token": tokenizer.decode([int(v)]), "experts": float(used_V[v] / freq[v])} for v in order]
    return out


def summary_numbers(layers: list[dict]) -> dict:
    mean = lambda key: float(np.mean([l[key] for l in layers if l[key] is not None])) \
        if any(l[key] is not None for l in layers) else None
    return {"maxvio_mean": mean("maxvio"), "routing_entropy_share_mean": mean("routing_entropy_share"),
            "domain_mi_bits_mean": mean("domain_mi_bits"), "specialisation_mean": mean("specialisation"),
            "shared_norm_share_mean": mean("shared_norm_share")}


def markdown_table(header: list[str], rows: list[list[str]], left: int = 0) -> list[str]:
    """Lines of a markdown table: the first `left` columns aligned left, the others (numbers) right."""
    rule = "|" + "|".join(["---"] * left + ["---:"] * (len(header) - left)) + "|"
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(cells) + " |" for cells in rows)]


def markdown(report: dict) -> str:
    s = report["summary"]
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)
    domains = ", ".join(f"{d['name']} {d['loss']:.3f}" for d in report["domains"])
    lines = [f"# dsmoe analyze: {report['model']}", "",
             f"{report['tokens']:,} tokens from {len(report['domains'])} domain(s); loss {report['loss']:.4f} "
             f"({domains}).", "",
             f"Mean over MoE layers: MaxVio {fmt(s['maxvio_mean'])}, "
             f"routing entropy {fmt(s['routing_entropy_share_mean'])}"
             f" of log E, expert-domain MI {fmt(s['domain_mi_bits_mean'])} bits (specialisation "
             f"{fmt(s['specialisation_mean'])}), shared experts' share of the output norm "
             f"{fmt(s['shared_norm_share_mean'])}.", ""]
    lines += markdown_table(
        ["layer", "MaxVio", "entropy / log E", "MI expert-domain (bits)", "specialisation", "shared norm share"],
        [[str(l["layer"]), f"{l['maxvio']:.3f}", f"{l['routing_entropy_share']:.3f}", f"{l['domain_mi_bits']:.4f}",
          f"{l['specialisation']:.4f}", fmt(l["shared_norm_share"])] for l in report["layers"]])
    if report.get("redundancy"):
        lines += ["", "Redundancy probe (loss rise when each layer loses experts; random: mean ± sd):", ""]
        lines += markdown_table(
            ["disabled per layer", "load they carried", "most-routed: loss rise", "random: loss rise"],
            [[str(r["disabled"]), f"{r['load_share_disabled']:.1%}", f"{r['top_rise']:+.4f}",
              f"{r['random_rise']:+.4f} ± {r['random_spread']:.4f}"] for r in report["redundancy"]])
    if report.get("shared_ablation"):
        a = report["shared_ablation"]
        lines += ["", f"Shared experts removed: loss {a['loss']:.4f} ({a['rise']:+.4f})."]
    layer = report["layers"][report["figure_layer"]]
    ranked = np.argsort(-np.asarray(layer["load_share"]))[:4]
    lines += ["", f"Characteristic tokens of the busiest experts of layer {layer['layer']}:", ""]
    for e in ranked:
        tokens = " ".join(repr(t["token"]) for t in layer["characteristic_tokens"][e][:8])
        lines.append(f"- expert {e} ({layer['load_share'][e]:.1%} of routings): {tokens}")
    return "\n".join(lines) + "\n"
