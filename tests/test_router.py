"""route() against the spec's formulas, written per token in plain Python."""

import pytest
import torch

from dsmoe.model.router import route


def spec_route(logits, k, scoring, method, n_group, topk_group, norm, scale, bias=None):
    T, E = logits.shape
    idx_out, w_out = [], []
    for t in range(T):
        s = logits[t].softmax(-1) if scoring == "softmax" else logits[t].sigmoid()
        sel = s + bias if bias is not None else s.clone()
        allowed = list(range(E))
        if method != "greedy" and n_group > 1:
            per = E // n_group
            if method == "noaux_tc":
                gscore = [sel[g * per:(g + 1) * per].topk(2).values.sum().item() for g in range(n_group)]
            else:
                gscore = [sel[g * per:(g + 1) * per].max().item() for g in range(n_group)]
            groups = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
            allowed = [e for e in range(E) if e // per in groups]
        chosen = sorted(allowed, key=lambda e: -sel[e].item())[:k]
        w = torch.stack([s[e] for e in chosen])
        if norm:
            w = w / (w.sum() + 1e-20)
        idx_out.append(chosen)
        w_out.append(w * scale)
    return torch.tensor(idx_out), torch.stack(w_out)


CASES = [
    ("softmax", "greedy", 1, 1, False, 1.0, False),  # V1 / V2-Lite
    ("softmax", "group_limited_greedy", 4, 2, False, 16.0, False),  # V2
    ("sigmoid", "noaux_tc", 4, 2, True, 2.5, True),  # V3
    ("sigmoid", "noaux_tc", 1, 1, True, 1.0, True),  # V3-style, one group
]


@pytest.mark.parametrize("scoring, method, n_group, topk_group, norm, scale, with_bias", CASES)
def test_route_matches_the_formulas(scoring, method, n_group, topk_group, norm, scale, with_bias):
    g = torch.Generator().manual_seed(0)
    T, E, K = 37, 16, 3
    logits = torch.randn(T, E, generator=g) * 2
    bias = torch.randn(E, generator=g) * 0.5 if with_bias else None
    r = route(logits, top_k=K, scoring_func=scoring, topk_method=method, n_group=n_group,
              topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=scale, bias_E=bias)
    idx, w = spec_route(logits, K, scoring, method, n_group, topk_group, norm, scale, bias)
    order = r.topk_idx_TK.argsort(-1)
    assert torch.equal(r.topk_idx_TK.gather(1, order), idx.gather(1, idx.argsort(-1)))
    torch.testing.assert_close(r.topk_weight_TK.gather(1, order), w.gather(1, idx.argsort(-1)))
    assert torch.equal(r.counts_E, torch.bincount(idx.flatten(), minlength=E))


def test_bias_selects_but_does_not_weigh():
    logits = torch.zeros(1, 4)
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])
    r = route(logits, top_k=1, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=False, bias_E=bias)
    assert r.topk_idx_TK.item() == 2
    assert r.topk_weight_TK.item() == pytest.approx(0.5)  # sigmoid(0), not sigmoid(0) + 5


def test_masked_groups_never_win_even_with_negative_biased_scores():
    """-inf masking (official code, transformers 5.24): a masked expert can't be picked even when every
    allowed biased score is negative (0.0 masking would let it win)."""
    logits = torch.full((1, 4), -10.0)
    bias = torch.tensor([-1.0, -1.0, -0.5, -0.5])  # allowed group {0,1} has negative biased scores
    bias_group_pick = torch.tensor([5.0, 5.0, -9.0, -9.0])
    r = route(logits, top_k=2, scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1,
              bias_E=bias + bias_group_pick)
    assert sorted(r.topk_idx_TK.tolist()[0]) == [0, 1]
