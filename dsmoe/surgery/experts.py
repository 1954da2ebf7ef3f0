"""Expert surgery on a trained model: remove the least-used routed experts, or add experts split from the
busiest ones. Each operation returns an ordinary model of a new config (n_routed_experts changed), so the
result saves, loads and trains like any other.

Routing groups (n_group > 1) are kept intact: a group is a contiguous block of E / n_group experts, so both
operations act per group (the same number kept, or added, in each) and group-limited routing still means what
it meant. The aux-loss-free selection bias travels with its expert.
"""

from __future__ import annotations

import torch

from dsmoe.config import ModelConfig
from dsmoe.errors import UserError
from dsmoe.model.transformer import Transformer


class SurgeryError(UserError):
    """A surgery request the model cannot satisfy; the message says which limit and what would work."""


def rebuild(config: ModelConfig, state: dict[str, torch.Tensor], like: Transformer) -> Transformer:
    """A model of `config` holding `state` (every key present), on the device and dtype of `like`."""
    with torch.device("meta"):
        model = Transformer(config, moe_impl=like.moe_impl)
    model.to_empty(device=next(like.parameters()).device)
    model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in model.state_dict() if k not in state]  # the statistics buffers are not persistent
    if missing:
        raise RuntimeError(f"surgery left weights unset: {missing[:3]}")  # a bug here, never the user's input
    model.init_buffers()
    return model


def moe_prefixes(model: Transformer) -> list[str]:
    """State-dict prefix of each MoE layer, in `model.moe_layers()` order (main model, then MTP modules)."""
    from dsmoe.model.moe import MoE

    return [name + "." for name, m in model.named_modules() if isinstance(m, MoE)]


def _expert_keys(prefix: str) -> dict[str, str]:
    return {"router": prefix + "gate.weight", "bias": prefix + "gate.e_score_correction_bias",
            "gate_up": prefix + "experts.gate_up_proj", "down": prefix + "experts.down_proj"}


def _check_group_split(config: ModelConfig, new_experts: int, verb: str) -> None:
    if new_experts < config.num_experts_per_tok:
        raise SurgeryError(f"{verb} to {new_experts} routed experts is below num_experts_per_tok "
                           f"({config.num_experts_per_tok}); keep at least that many")
    if new_experts % config.n_group:
        raise SurgeryError(f"{new_experts} routed experts do not split into the model's {config.n_group} routing "
                           f"groups; use a multiple of {config.n_group}")
    per_group = new_experts // config.n_group
    if config.topk_method == "noaux_tc" and config.n_group > 1 and per_group < 2:
        raise SurgeryError(f"noaux_tc scores each group by its best two experts; {per_group} per group is too few")


def select_highest(scores_LE: torch.Tensor, keep: int, n_group: int) -> list[torch.Tensor]:
    """Per MoE layer, the `keep` experts of highest score (the tokens they receive, or the loss their removal
    costs; keep / n_group in each group), in ascending id order. Ties go to the lower id."""
    L, E = scores_LE.shape
    if not 0 < keep <= E:
        raise SurgeryError(f"cannot keep {keep} experts: the model has {E} per layer")
    if keep % n_group:
        raise SurgeryError(f"keeping {keep} experts does not split into the model's {n_group} routing groups; "
                           f"use a multiple of {n_group}")
    size, per_group = E // n_group, keep // n_group
    kept = []
    for layer in range(L):
        ids = []
        for g in range(n_group):
            c = scores_LE[layer, g * size:(g + 1) * size].double() - torch.arange(size) * 1e-9  # stable ties
            ids.append(c.topk(per_group).indices + g * size)
        kept.append(torch.cat(ids).sort().values)
    return kept


def select_random(num_layers: int, num_experts: int, keep: int, n_group: int, seed: int = 0) -> list[torch.Tensor]:
    """The baseline the informed choices are compared with: `keep` experts per layer at random (per group)."""
    g = torch.Generator().manual_seed(seed)
    return select_highest(torch.rand(num_layers, num_experts, generator=g), keep, n_group)


@torch.no_grad()
def prune_experts(model: Transformer, kept: list[torch.Tensor]) -> Transformer:
    """Keep only `kept[i]` (expert ids) in the i-th MoE layer; every layer keeps the same number."""
    c = model.config
    sizes = {len(k) for k in kept}
    prefixes = moe_prefixes(model)
    if len(kept) != len(prefixes) or len(sizes) != 1:
        raise SurgeryError("pass one list of kept experts per MoE layer, all of the same length")
    new_e = sizes.pop()
    if new_e > c.n_routed_experts:
        raise SurgeryError(f"cannot keep {new_e} experts: the model has {c.n_routed_experts} per layer")
    _check_group_split(c, new_e, "pruning")
    state = dict(model.state_dict())
    for prefix, ids in zip(prefixes, kept):
        layer = prefix.rstrip(".").removesuffix(".mlp")
        ids = ids.to(torch.long)
        if ids.unique().numel() != ids.numel() or ids.min() < 0 or ids.max() >= c.n_routed_experts:
            raise SurgeryError(f"layer {layer}: kept expert ids must be distinct and in [0, {c.n_routed_experts})")
        per_group = c.n_routed_experts // c.n_group
        if torch.bincount(ids // per_group, minlength=c.n_group).ne(new_e // c.n_group).any():
            raise SurgeryError(f"layer {layer}: keep {new_e // c.n_group} experts in each of the {c.n_group} groups")
        for key in _expert_keys(prefix).values():
            if key in state:
                state[key] = state[key].index_select(0, ids.to(state[key].device)).clone()
    return rebuild(c.replace(n_routed_experts=new_e), state, model)


@torch.no_grad()
def grow_experts(model: Transformer, add: int, counts_LE: torch.Tensor, noise: float = 1e-3,
                 seed: int = 0) -> Transformer:
    """Add `add` experts to every MoE layer (add / n_group at the end of each group), each a copy of one of
    the busiest experts of its group (by `counts_LE`), weights perturbed by `noise` x their std so that
    parent and child can diverge in training, router row copied.

    Output at step 0: with a selection bias (noaux_tc) the new experts get a bias below every old expert's
    choice score (scores lie in [0, 1]), so no token selects them and the logits are unchanged exactly until
    the aux-loss-free update raises their bias as they stay idle. A softmax router has no bias: the copied
    router row shares the parent's probability mass, so the outputs move (the test reports by how much).
    """
    c = model.config
    if add < 1:
        raise SurgeryError("--add must be at least 1")
    if add % c.n_group:
        raise SurgeryError(f"add a multiple of the model's {c.n_group} routing groups, so each group grows alike")
    new_e = c.n_routed_experts + add
    _check_group_split(c, new_e, "growing")
    size, add_per_group = c.n_routed_experts // c.n_group, add // c.n_group
    g = torch.Generator().manual_seed(seed)
    state = dict(model.state_dict())
    for li, prefix in enumerate(moe_prefixes(model)):
        keys = _expert_keys(prefix)
        order = []  # new expert order: each group's old experts, then its children
        for grp in range(c.n_group):
            busiest = select_highest(counts_LE[li:li + 1, grp * size:(grp + 1) * size], size, 1)[0]
            ranked = busiest[counts_LE[li, grp * size + busiest].argsort(descending=True, stable=True)]
            parents = ranked[torch.arange(add_per_group) % size] + grp * size
            order += [torch.arange(grp * size, (grp + 1) * size), parents]
        source = torch.cat(order)
        child_in_group = torch.cat([torch.zeros(size), torch.ones(add_per_group)])
        is_child = torch.cat([child_in_group for _ in range(c.n_group)]).bool()
        for name, key in keys.items():
            if key not in state:
                continue
            t = state[key].index_select(0, source.to(state[key].device)).clone()
            if name in ("gate_up", "down"):
                child = t[is_child]
                jitter = torch.randn(child.shape, generator=g).to(child) * noise * child.float().std().to(child)
                t[is_child] = child + jitter
            elif name == "bias":
                t[is_child] = t[~is_child].min() - 2.0
            state[key] = t
    return rebuild(c.replace(n_routed_experts=new_e), state, model)
