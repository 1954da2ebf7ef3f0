"""Interventions that measure what experts contribute: the redundancy probe, the cost of removing each expert
alone (what `dsmoe experts prune --by loss` keeps), and the shared-expert ablation.

Redundancy probe (DeepSeekMoE section 4.5, "lower redundancy among routed experts"): disable some routed experts
and measure the rise of the validation loss. As in the paper a disabled expert is masked out of the routing, so
each token selects its top-K among the remaining experts; its gate weights come from the affinities over those
remaining experts (a softmax gate renormalises over them; a sigmoid gate keeps its scores, renormalised over the
K chosen when the model does). Disabling the n experts each layer routes most tokens to is compared with
disabling n random ones: the paper's claim is that fine-grained, specialised experts are less redundant, so
losing the busiest ones hurts more than losing random ones, and more than it does in a coarse (GShard) model.

Every loss is `evaluate_loss` (the loss `dsmoe eval` prints) over the same windows.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from dsmoe.model.router import Routing, route, route_options
from dsmoe.model.transformer import Transformer
from dsmoe.tasks.perplexity import evaluate_loss


def _reroute(disabled_E: torch.Tensor, module, args, routing: Routing) -> Routing:
    """The routing `module` gives when the experts in disabled_E (bool [E]) do not exist. The logits are
    recovered from the affinities the router returned (log p for softmax, logit s for sigmoid: each maps back to
    the same affinities), so no routing code is repeated here."""
    c = module.config
    scores = routing.scores_TE.double()
    logits = scores.clamp_min(1e-300).log() if c.scoring_func == "softmax" else torch.logit(scores, eps=1e-15)
    logits = logits.float().masked_fill(disabled_E, float("-inf"))
    bias = module.e_score_correction_bias
    bias = torch.zeros_like(disabled_E, dtype=torch.float32) if bias is None else bias.float()
    return route(logits, bias_E=bias.masked_fill(disabled_E, float("-inf")), top_p=c.routing_top_p,
                 min_k=c.routing_min_k, **route_options(c))


@contextlib.contextmanager
def experts_disabled(model: Transformer, disabled_LE: torch.Tensor):
    """Within the block, the routed experts marked in disabled_LE (bool [L_moe, E]) are masked out of routing."""
    handles = []
    try:
        for moe, disabled in zip(model.moe_layers(), disabled_LE):
            mask = disabled.to(moe.gate.weight.device)
            handles.append(moe.gate.register_forward_hook(lambda m, a, r, mask=mask: _reroute(mask, m, a, r)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def shared_experts_removed(model: Transformer):
    """Within the block every shared expert outputs zeros (the ablation of the shared-expert isolation)."""
    handles = [moe.shared_experts.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
               for moe in model.moe_layers() if moe.shared_experts is not None]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def redundancy_probe(model: Transformer, windows: list[np.ndarray], counts_LE: np.ndarray, disable: list[int], *,
                     baseline: float, random_draws: int = 2, seed: int = 0, **eval_kw) -> list[dict]:
    """For each n in `disable`: the loss with each layer's n most-routed experts disabled (by counts_LE of the
    same sample) and with n random experts per layer (the mean and spread of `random_draws` draws)."""
    L, E = counts_LE.shape
    K = model.config.num_experts_per_tok
    rng = np.random.default_rng(seed)
    rows = []
    for n in disable:
        if not 0 < n <= E - K:
            raise ValueError(f"cannot disable {n} of {E} routed experts when each token needs {K}")
        top = torch.zeros(L, E, dtype=torch.bool)
        busiest = np.argsort(-counts_LE, axis=1, kind="stable")[:, :n]
        top[np.arange(L)[:, None], torch.from_numpy(busiest)] = True
        with experts_disabled(model, top):
            top_loss = evaluate_loss(model, windows, **eval_kw)[0]
        random_losses = []
        for _ in range(random_draws):
            chosen = torch.from_numpy(np.argsort(rng.random((L, E)), axis=1)[:, :n])
            mask = torch.zeros(L, E, dtype=torch.bool)
            mask[torch.arange(L)[:, None], chosen] = True
            with experts_disabled(model, mask):
                random_losses.append(evaluate_loss(model, windows, **eval_kw)[0])
        random_loss = float(np.mean(random_losses))
        rows.append({"disabled": n, "top_loss": top_loss, "top_rise": top_loss - baseline,
                     "random_loss": random_loss, "random_rise": random_loss - baseline,
                     "random_spread": float(np.std(random_losses)), "random_draws": random_draws,
                     "load_share_disabled": float(np.take_along_axis(counts_LE, busiest, 1).sum() / counts_LE.sum())})
    return rows


def single_expert_removal(model: Transformer, windows: list[np.ndarray], *, baseline: float, progress: bool = False,
                          **eval_kw) -> np.ndarray:
    """[L_moe, E]: the loss rise when that one routed expert is masked out of its layer's routing (each token
    then picks its top-K among the others; the same function as pruning it), over the same windows: one pass of
    `evaluate_loss` per main-model MoE layer and expert. Under a sigmoid gate an expert no token chooses costs 0
    (to rounding); a softmax gate renormalises over the rest. The MTP modules' layers do not take part in the
    loss and are left at 0."""
    from tqdm import tqdm

    c = model.config
    L, E = len(model.moe_layers()), c.n_routed_experts
    main = range(len(c.main_moe_layer_ids))  # the main model's MoE layers come first
    rise = np.zeros((L, E))
    passes = [(layer, expert) for layer in main for expert in range(E)]
    for layer, expert in tqdm(passes, desc="removal cost per expert", unit="pass", disable=not progress):
        mask = torch.zeros(L, E, dtype=torch.bool)
        mask[layer, expert] = True
        with experts_disabled(model, mask):
            rise[layer, expert] = evaluate_loss(model, windows, **eval_kw)[0] - baseline
    return rise


def shared_expert_ablation(model: Transformer, windows: list[np.ndarray], *, baseline: float, **eval_kw) -> dict | None:
    if not any(moe.shared_experts is not None for moe in model.moe_layers()):
        return None
    with shared_experts_removed(model):
        loss = evaluate_loss(model, windows, **eval_kw)[0]
    return {"loss": loss, "rise": loss - baseline}
