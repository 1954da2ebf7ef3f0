"""Fused router: scores, group-limited top-k (incl. noaux_tc), weight normalisation/scaling, expert counts.

One program owns BLOCK_T tokens and their whole row of E logits, so everything after the router GEMM
(which stays a cuBLAS F.linear) is one launch instead of the ~15 small torch kernels of
`dsmoe.model.router.route`, which is the spec this kernel reproduces: same scores, same experts in the
same (descending) order, same weights. Ties between equal choice scores go to the lower expert index.

The backward (`route_backward`) is plain torch on [T, E]: a handful of elementwise passes, cheap next
to the expert GEMMs, and it keeps the softmax/sigmoid derivative readable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SCORING = {"softmax": 0, "sigmoid": 1}
GROUP_RULE = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}  # how a group is scored


@triton.jit
def _route_kernel(
    logits_ptr, bias_ptr, scores_ptr, idx_ptr, weight_ptr, counts_ptr,
    T, stride_lt, scale,
    E: tl.constexpr, TOP_K: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
    GROUP_RULE: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, NORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
    ONE_PROGRAM: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    col = tl.arange(0, BLOCK_E)
    tok_ok = tok < T
    col_ok = col < E
    ok = tok_ok[:, None] & col_ok[None, :]
    tok64 = tok.to(tl.int64)
    logits = tl.load(logits_ptr + tok64[:, None] * stride_lt + col[None, :], mask=ok, other=0.0).to(tl.float32)
    neg_inf = float("-inf")
    if SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        logits = tl.where(col_ok[None, :], logits, neg_inf)
        shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        scores = shifted / tl.sum(shifted, axis=1)[:, None]
    tl.store(scores_ptr + tok64[:, None] * E + col[None, :], scores, mask=ok)

    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    choice = tl.where(col_ok[None, :], choice, neg_inf)

    if GROUP_RULE != 0 and N_GROUP > 1:
        # Score each group (its best expert, or for noaux_tc the sum of its best two), keep TOPK_GROUP.
        group_of_col = col // (E // N_GROUP)
        gcol = tl.arange(0, BLOCK_G)
        group_score = tl.full((BLOCK_T, BLOCK_G), neg_inf, tl.float32)
        for g in tl.static_range(N_GROUP):
            in_g = (group_of_col == g)[None, :]
            vals = tl.where(in_g, choice, neg_inf)
            best = tl.max(vals, axis=1)
            if GROUP_RULE == 2:
                first = tl.argmax(vals, axis=1, tie_break_left=True)
                best = best + tl.max(tl.where(col[None, :] == first[:, None], neg_inf, vals), axis=1)
            group_score = tl.where(gcol[None, :] == g, best[:, None], group_score)
        keep_col = tl.zeros((BLOCK_T, BLOCK_E), tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            g_best = tl.argmax(group_score, axis=1, tie_break_left=True)
            group_score = tl.where(gcol[None, :] == g_best[:, None], neg_inf, group_score)
            keep_col += (group_of_col[None, :] == g_best[:, None]).to(tl.int32)
        choice = tl.where(keep_col > 0, choice, neg_inf)

    kcol = tl.arange(0, BLOCK_K)
    topk_idx = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)
    topk_w = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    chosen = tl.zeros((BLOCK_T, BLOCK_E), tl.int32)
    for k in tl.static_range(TOP_K):
        pick = tl.argmax(choice, axis=1, tie_break_left=True)
        hit = col[None, :] == pick[:, None]
        w = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        topk_idx = tl.where(kcol[None, :] == k, pick[:, None], topk_idx)
        topk_w = tl.where(kcol[None, :] == k, w[:, None], topk_w)
        chosen = chosen + hit.to(tl.int32)
        choice = tl.where(hit, neg_inf, choice)
    if NORM:
        topk_w = topk_w / (tl.sum(topk_w, axis=1)[:, None] + 1e-20)
    topk_w = topk_w * scale
    k_ok = tok_ok[:, None] & (kcol[None, :] < TOP_K)
    tl.store(idx_ptr + tok64[:, None] * TOP_K + kcol[None, :], topk_idx.to(tl.int64), mask=k_ok)
    tl.store(weight_ptr + tok64[:, None] * TOP_K + kcol[None, :], topk_w, mask=k_ok)
    # Rows past T ran on zero logits, so their picks are dropped here. A lone program (every decode step) owns
    # the counts and stores them; several add theirs atomically into zeroed counts.
    per_expert = tl.sum(tl.where(tok_ok[:, None], chosen, 0), axis=0).to(tl.int64)
    if ONE_PROGRAM:
        tl.store(counts_ptr + col, per_expert, mask=col_ok)
    else:
        tl.atomic_add(counts_ptr + col, per_expert, mask=col_ok)


def route_triton(
    logits_TE: torch.Tensor, bias_E: torch.Tensor | None, *, top_k: int, scoring_func: str, topk_method: str,
    n_group: int, topk_group: int, norm_topk_prob: bool, routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(topk_idx_TK int64, topk_weight_TK fp32, scores_TE fp32, counts_E int64), as `route` returns them."""
    if logits_TE.dim() != 2:
        raise ValueError(f"router logits must be [T, E], got shape {tuple(logits_TE.shape)}")
    T, E = logits_TE.shape
    if scoring_func not in SCORING or topk_method not in GROUP_RULE:
        raise ValueError(f"unsupported routing {scoring_func!r}/{topk_method!r}")
    if not 1 <= top_k <= E or E % n_group:
        raise ValueError(f"top_k={top_k} and n_group={n_group} must fit E={E} experts")
    if bias_E is not None and bias_E.shape != (E,):
        raise ValueError(f"selection bias must be [E]={E}, got {tuple(bias_E.shape)}")
    logits_TE = logits_TE if logits_TE.stride(-1) == 1 else logits_TE.contiguous()
    dev = logits_TE.device
    scores = torch.empty(T, E, dtype=torch.float32, device=dev)
    idx = torch.empty(T, top_k, dtype=torch.int64, device=dev)
    weight = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    block_e = triton.next_power_of_2(E)
    # a decode step's few tokens get a tile of their size: a 64-row tile of masked rows costs its
    # top-k argmax passes all the same (11 us per layer at one token on an H200)
    block_t = max(2, min(64, 4096 // block_e, triton.next_power_of_2(max(T, 1))))
    programs = triton.cdiv(T, block_t)
    # int64 counts written by the kernel: no zero-fill and cast launches around a lone program
    counts = (torch.empty if programs == 1 else torch.zeros)(E, dtype=torch.int64, device=dev)
    if T > 0:
        _route_kernel[(programs,)](
            logits_TE, bias_E if bias_E is not None else scores, scores, idx, weight, counts,
            T, logits_TE.stride(0), float(routed_scaling_factor),
            E=E, TOP_K=top_k, SIGMOID=SCORING[scoring_func] == 1, HAS_BIAS=bias_E is not None,
            GROUP_RULE=GROUP_RULE[topk_method], N_GROUP=n_group, TOPK_GROUP=topk_group, NORM=norm_topk_prob,
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
            BLOCK_G=triton.next_power_of_2(n_group), ONE_PROGRAM=programs == 1, num_warps=4,
        )
    return idx, weight, scores, counts


def route_backward(
    grad_weight_TK: torch.Tensor | None, grad_scores_TE: torch.Tensor | None, scores_TE: torch.Tensor,
    topk_idx_TK: torch.Tensor, *, scoring_func: str, norm_topk_prob: bool, routed_scaling_factor: float,
    logits_dtype: torch.dtype,
) -> torch.Tensor:
    """d logits_TE from the gradients of the gate weights and of the (unbiased) scores.

    weight = scale * s[idx] (/ sum_k s[idx] when normalised); the bias only picked idx, so it gets none.
    """
    d_scores = torch.zeros_like(scores_TE) if grad_scores_TE is None else grad_scores_TE.float().clone()
    if grad_weight_TK is not None:
        g = grad_weight_TK.float() * routed_scaling_factor
        if norm_topk_prob:
            picked = scores_TE.gather(1, topk_idx_TK)
            denom = picked.sum(dim=-1, keepdim=True) + 1e-20
            g = g / denom - (g * picked).sum(dim=-1, keepdim=True) / denom**2
        d_scores.scatter_add_(1, topk_idx_TK, g)
    if scoring_func == "softmax":
        d_logits = scores_TE * (d_scores - (scores_TE * d_scores).sum(dim=-1, keepdim=True))
    else:
        d_logits = d_scores * scores_TE * (1 - scores_TE)
    return d_logits.to(logits_dtype)
