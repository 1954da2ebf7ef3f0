"""The one door from the model to the kernels: `resolve_impl`, `moe_experts`, `decode_fits` /
`experts_decode`, `router_logits`, `route_fused`, `rms_norm`, `apply_rotary`, `mla_decode_attention`.

impl: "reference" (per-expert loop, the spec), "grouped" (torch grouped_mm), "triton" (fused kernels, when
Triton and a GPU are there), or "auto" (the fastest available for these tensors). The model keeps the asked-for
impl as a constructor argument (never a global) and resolves it once per MoE forward with `resolve_impl`; the
router and the experts then both receive the resolved name.

The Triton kernels run inside `torch.library` custom ops (`dsmoe::experts_fwd` / `dsmoe::experts_bwd`,
`dsmoe::route`) with fake (meta) implementations and registered autograd, so torch.compile treats them as
opaque nodes without graph breaks and CUDA graphs capture them (they never sync with the host; run one
step before capturing so the autotuner has picked its configs). Triton is imported only inside the op
bodies: importing this module never needs it.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from dsmoe.errors import UserError
from dsmoe.kernels.grouped import grouped_mm_supported, moe_experts_grouped
from dsmoe.kernels.quant import check_scheme, dequantize, quantize  # noqa: F401 (the model's door to the formats)
from dsmoe.kernels.reference import (mla_decode_attention_reference, moe_experts_reference, rms_norm_reference,
                                    rotary_reference, router_logits_reference)
from dsmoe.kernels.router_gemm import split_router_logits

IMPLS = ("auto", "reference", "grouped", "triton")  # what users may ask for; the last three are what runs


def triton_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from dsmoe.kernels import triton_moe  # noqa: F401  (imports triton)
    except ImportError:
        return False
    return True


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in: autocast's when it is on (like F.linear), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def resolve_impl(impl: str, x: torch.Tensor, *weights: torch.Tensor) -> str:
    """The implementation that runs for these tensors: "reference", "grouped" or "triton"."""
    if impl not in IMPLS:
        raise ValueError(f"unknown MoE implementation {impl!r}; choose one of {', '.join(IMPLS)}")
    dtype = compute_dtype(x)
    if impl == "auto":
        if triton_available(x.device):
            return "triton"
        return "grouped" if grouped_mm_supported(x, *weights, dtype=dtype) else "reference"
    if impl == "triton" and x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError("--moe-impl triton runs on a CUDA GPU (on the CPU only in Triton's interpreter, "
                        "TRITON_INTERPRET=1, for tests); use --moe-impl auto or grouped here")
    if impl == "grouped" and not grouped_mm_supported(x, *weights, dtype=dtype):
        return "reference"  # same maths; grouped_mm cannot take these tensors (dtype, device, strides)
    return impl


def moe_experts(
    x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
    gate_up_EFD: torch.Tensor, down_EDF: torch.Tensor, impl: str,
) -> torch.Tensor:
    """y_t = sum_k w_tk * SwiGLU-expert_{idx_tk}(x_t) for the routed experts; fp32 combine, x's dtype out
    (the autocast dtype under autocast: like F.linear, the expert GEMMs then run in bf16 on fp32 weights).
    impl is a resolved name (see `resolve_impl`)."""
    dtype = compute_dtype(x_TD)
    x_TD, gate_up_EFD, down_EDF = x_TD.to(dtype), gate_up_EFD.to(dtype), down_EDF.to(dtype)
    if impl == "triton":
        if decode_fits(x_TD, topk_idx_TK.numel(), topk_weight_TK, gate_up_EFD, down_EDF):
            return experts_decode(x_TD, topk_idx_TK, topk_weight_TK, gate_up_EFD, down_EDF)
        return experts_fused(x_TD, topk_idx_TK, topk_weight_TK, gate_up_EFD, down_EDF)
    if impl == "grouped":
        return moe_experts_grouped(x_TD, topk_idx_TK, topk_weight_TK, gate_up_EFD, down_EDF)
    if impl == "reference":
        return moe_experts_reference(x_TD, topk_idx_TK, topk_weight_TK, gate_up_EFD, down_EDF)
    raise ValueError(f"moe_experts takes a resolved implementation (reference, grouped or triton), not {impl!r}")


def _wants_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will want a gradient through an op on these tensors (forward-only kernels have none)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _fused_inference(x: torch.Tensor, *params: torch.Tensor, when_compiling: bool = False) -> bool:
    """Whether a forward-only Triton kernel may replace a reference: on CUDA, no gradient wanted, and (unless
    `when_compiling`: a custom op inductor cannot match) not while torch.compile traces, since inductor fuses
    the reference itself."""
    return (x.is_cuda and not _wants_grad(x, *params) and (when_compiling or not torch.compiler.is_compiling())
            and triton_available(x.device))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * RMSNorm(x): one Triton kernel for inference on CUDA, the reference (with autograd) elsewhere."""
    if _fused_inference(x, weight):
        from dsmoe.kernels.triton_norm import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotary embedding of x (B, H, S, R): one Triton kernel for inference on CUDA, the reference elsewhere."""
    if _fused_inference(x) and x.dim() == 4:
        from dsmoe.kernels.triton_rotary import rotary_triton

        return rotary_triton(x, cos, sin, interleaved)
    return rotary_reference(x, cos, sin, interleaved)


# ---- MLA decode attention: dsmoe::mla_decode ----------------------------------------------------------------

@torch.library.custom_op("dsmoe::mla_decode", mutates_args=())
def _mla_decode_op(q_lat: Tensor, q_pe: Tensor, kv: Tensor, hidden: Tensor, scale: float) -> Tensor:
    from dsmoe.kernels.triton_mla_decode import mla_decode_triton

    return mla_decode_triton(q_lat, q_pe, kv, hidden, scale)


@_mla_decode_op.register_fake
def _(q_lat, q_pe, kv, hidden, scale):
    B, H, S, C = q_lat.shape
    return kv.new_empty(H, B, S, C)


def mla_decode_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, hidden: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """MLA's absorbed attention over the compressed cache (contract: `mla_decode_attention_reference`): one
    Triton pass over the cache for inference on CUDA, also inside compiled decode steps (an opaque op, so
    inductor keeps it whole); the reference (two GEMMs around an fp32 softmax) elsewhere, for gradients and for
    an fp32 cache (whose GEMMs the kernel's tensor-core dots would round to tf32)."""
    if kv.dtype in (torch.bfloat16, torch.float16) and _fused_inference(kv, q_lat, q_pe, when_compiling=True):
        return torch.ops.dsmoe.mla_decode(q_lat, q_pe, kv, hidden, float(scale))
    return mla_decode_attention_reference(q_lat, q_pe, kv, hidden, scale)


# Below this many tokens the fp32 router GEMM is memory-bound and one launch, while the split path splits [E, D]
# again at every call (about ten launches a layer; the fp32 GEMM made V2-Lite batch-1 decode 1.18x faster on an H100)
SPLIT_ROUTER_MIN_TOKENS = 1024


def router_logits(x_TD: torch.Tensor, weight_ED: torch.Tensor, impl: str) -> torch.Tensor:
    """DeepSeek's fp32 router logits [T, E]: the exact split-bf16 tensor-core GEMMs (router_gemm.py) for bf16 x
    on CUDA when the experts run a fast path and there are enough tokens for the GEMM to be compute-bound;
    the fp32 GEMM (`router_logits_reference`) everywhere else (decode steps included)."""
    if (impl != "reference" and x_TD.is_cuda and x_TD.dtype == torch.bfloat16
            and x_TD.shape[0] >= SPLIT_ROUTER_MIN_TOKENS and weight_ED.dtype in (torch.float32, torch.bfloat16)):
        return split_router_logits(x_TD, weight_ED)
    return router_logits_reference(x_TD, weight_ED)


# ---- routing: dsmoe::route ------------------------------------------------------------------------------

@torch.library.custom_op("dsmoe::route", mutates_args=())
def _route_op(
    logits: Tensor, bias: Tensor | None, top_k: int, scoring_func: str, topk_method: str, n_group: int,
    topk_group: int, norm_topk_prob: bool, routed_scaling_factor: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from dsmoe.kernels.triton_router import route_triton

    return route_triton(logits, bias, top_k=top_k, scoring_func=scoring_func, topk_method=topk_method,
                        n_group=n_group, topk_group=topk_group, norm_topk_prob=norm_topk_prob,
                        routed_scaling_factor=routed_scaling_factor)


@_route_op.register_fake
def _(logits, bias, top_k, scoring_func, topk_method, n_group, topk_group, norm_topk_prob, routed_scaling_factor):
    T, E = logits.shape
    return (logits.new_empty(T, top_k, dtype=torch.int64), logits.new_empty(T, top_k, dtype=torch.float32),
            logits.new_empty(T, E, dtype=torch.float32), logits.new_empty(E, dtype=torch.int64))


def _route_setup(ctx, inputs, output) -> None:
    logits, _, _, ctx.scoring_func, _, _, _, ctx.norm_topk_prob, ctx.routed_scaling_factor = inputs
    idx, _, scores, counts = output
    ctx.logits_dtype = logits.dtype
    ctx.mark_non_differentiable(idx, counts)
    ctx.save_for_backward(scores, idx)


def _route_backward(ctx, _d_idx, d_weight, d_scores, _d_counts):
    from dsmoe.kernels.triton_router import route_backward

    scores, idx = ctx.saved_tensors
    d_logits = route_backward(d_weight, d_scores, scores, idx, scoring_func=ctx.scoring_func,
                              norm_topk_prob=ctx.norm_topk_prob, routed_scaling_factor=ctx.routed_scaling_factor,
                              logits_dtype=ctx.logits_dtype)
    return d_logits, None, None, None, None, None, None, None, None


_route_op.register_autograd(_route_backward, setup_context=_route_setup)


def route_fused(
    logits_TE: torch.Tensor, bias_E: torch.Tensor | None, *, top_k: int, scoring_func: str, topk_method: str,
    n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = False, routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused routing kernel, same contract as `dsmoe.model.router.route`: (topk_idx_TK int64,
    topk_weight_TK fp32, scores_TE fp32, counts_E int64); differentiable in the logits."""
    return torch.ops.dsmoe.route(logits_TE, bias_E, top_k, scoring_func, topk_method, n_group, topk_group,
                                 norm_topk_prob, float(routed_scaling_factor))


# ---- routed experts: dsmoe::experts_fwd / dsmoe::experts_bwd ------------------------------------------------

@torch.library.custom_op("dsmoe::experts_fwd", mutates_args=())
def _experts_fwd_op(
    x: Tensor, topk_idx: Tensor, topk_weight: Tensor, gate_up: Tensor, down: Tensor, save_for_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from dsmoe.kernels.triton_moe import experts_forward

    y, gu, order, inverse, offsets = experts_forward(x, topk_idx, topk_weight, gate_up, down, save_for_backward)
    return y, (gu if gu is not None else x.new_empty(0)), order, inverse, offsets


@_experts_fwd_op.register_fake
def _(x, topk_idx, topk_weight, gate_up, down, save_for_backward):
    N, (E, F2, _) = topk_idx.numel(), gate_up.shape
    plan = [topk_idx.new_empty(N, dtype=torch.int32), topk_idx.new_empty(N, dtype=torch.int32),
            topk_idx.new_empty(E, dtype=torch.int32)]
    return x.new_empty(x.shape), x.new_empty((N, F2) if save_for_backward else (0,)), *plan


@torch.library.custom_op("dsmoe::experts_bwd", mutates_args=())
def _experts_bwd_op(
    dy: Tensor, x: Tensor, topk_weight: Tensor, gate_up: Tensor, down: Tensor, gu: Tensor, order: Tensor,
    inverse: Tensor, offsets: Tensor, need_dw: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from dsmoe.kernels.triton_moe import experts_backward

    dx, dw, d_gate_up, d_down = experts_backward(dy, x, topk_weight, gate_up, down, gu, order, inverse, offsets,
                                                 need_dw)
    return dx, (dw if dw is not None else topk_weight.new_empty(0)), d_gate_up, d_down


@_experts_bwd_op.register_fake
def _(dy, x, topk_weight, gate_up, down, gu, order, inverse, offsets, need_dw):
    dw = topk_weight.new_empty(topk_weight.shape if need_dw else (0,))
    return x.new_empty(x.shape), dw, gate_up.new_empty(gate_up.shape), down.new_empty(down.shape)


def _experts_setup(ctx, inputs, output) -> None:
    x, _, topk_weight, gate_up, down, _ = inputs
    _, gu, order, inverse, offsets = output
    ctx.mark_non_differentiable(gu, order, inverse, offsets)
    ctx.save_for_backward(x, topk_weight, gate_up, down, gu, order, inverse, offsets)


def _experts_backward(ctx, dy, *_unused):
    x, topk_weight, gate_up, down, gu, order, inverse, offsets = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[2]
    dx, dw, d_gate_up, d_down = torch.ops.dsmoe.experts_bwd(dy, x, topk_weight, gate_up, down, gu, order,
                                                            inverse, offsets, need_dw)
    return dx, None, (dw if need_dw else None), d_gate_up, d_down, None


_experts_fwd_op.register_autograd(_experts_backward, setup_context=_experts_setup)


def experts_fused(
    x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
    gate_up_EFD: torch.Tensor, down_EDF: torch.Tensor,
) -> torch.Tensor:
    """The Triton routed experts as one differentiable op; keeps gu_N2F for backward only when needed.
    Custom ops are not autocast by torch itself: `moe_experts` casts to the compute dtype first."""
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, topk_weight_TK, gate_up_EFD, down_EDF))
    return torch.ops.dsmoe.experts_fwd(x_TD, topk_idx_TK, topk_weight_TK, gate_up_EFD, down_EDF, save)[0]


# ---- decode-sized MoE without a permutation: dsmoe::experts_decode ----------------------------------------

DECODE_MAX_ROWS = 64  # routing decisions (T*K, plus T*S folded shared experts) up to which the decode kernels
#                       run; past it (prefill, large batches) the permuted grouped GEMMs read each expert once


def decode_fits(x: torch.Tensor, rows: int, *params: torch.Tensor, max_rows: int | None = None) -> bool:
    """Whether the decode kernels (triton_moe_decode.py, inference only) take these `rows` routing decisions of
    the Triton path: no gradient wanted through x or params (pass the routing weights too: a trained router
    needs the experts' backward), at most `max_rows` (default DECODE_MAX_ROWS) decisions, a float dtype.
    Decided from shapes alone (CUDA graphs)."""
    return (not _wants_grad(x, *params) and rows <= (DECODE_MAX_ROWS if max_rows is None else max_rows)
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32))


@torch.library.custom_op("dsmoe::experts_decode", mutates_args=())
def _experts_decode_op(
    x: Tensor, topk_idx: Tensor, topk_weight: Tensor, gate_up: Tensor, down: Tensor, gate_up_scale: Tensor | None,
    down_scale: Tensor | None, shared_gate: Tensor | None, shared_up: Tensor | None, shared_down: Tensor | None,
) -> Tensor:
    from dsmoe.kernels.triton_moe_decode import moe_decode_partials

    shared = None if shared_gate is None else (shared_gate, shared_up, shared_down)
    return moe_decode_partials(x, topk_idx, topk_weight, gate_up, down, gate_up_scale, down_scale, shared)


@_experts_decode_op.register_fake
def _(x, topk_idx, topk_weight, gate_up, down, gate_up_scale, down_scale, shared_gate, shared_up, shared_down):
    from dsmoe.kernels.triton_moe_decode import MAX_SPLIT_F

    return x.new_empty(MAX_SPLIT_F, *x.shape, dtype=torch.float32)


def _summed_decode(x_TD: torch.Tensor, *weights: torch.Tensor | None) -> torch.Tensor:
    """The decode kernels' fp32 partial sums added outside the custom op, so torch.compile fuses the sum into
    whatever follows (the residual add) instead of launching it."""
    return torch.ops.dsmoe.experts_decode(x_TD, *weights).sum(0).to(x_TD.dtype)


def experts_decode(
    x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor, gate_up_EFD: torch.Tensor,
    down_EDF: torch.Tensor, shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The routed experts (+ the shared MLP's (gate_proj, up_proj, down_proj) weights, weight 1) in two launches
    that read each decision's expert where it lies; forward only (see `decode_fits`). x's dtype throughout."""
    gate, up, down = shared if shared is not None else (None, None, None)
    return _summed_decode(x_TD, topk_idx_TK, topk_weight_TK, gate_up_EFD, down_EDF, None, None, gate, up, down)


# ---- weight-only fp8 / int8 inference: dsmoe::wq_matmul, and the quantized codes through dsmoe::experts_decode ----

def _wq_kernel_fits(x: torch.Tensor, rows: int, scale_block_ok: bool, *params: torch.Tensor,
                    max_rows: int | None = None) -> bool:
    """Past `max_rows` rows (prefill, large batches), or where a gradient is wanted (the kernels are forward
    only), the codes are dequantised and the usual path runs."""
    return (decode_fits(x, rows, *params, max_rows=max_rows) and scale_block_ok and triton_available(x.device))


# The decode kernels read one expert's codes per routing decision (1 byte a weight); the dequantising path reads
# every expert's codes, writes them in bf16 and the grouped GEMM reads those again (5 bytes a weight). Reading
# per decision moves fewer bytes up to about five decisions an expert (V2-Lite at batch 32: 192 decisions, 64
# experts), so quantized experts keep the decode kernels that far.
QUANT_DECODE_DECISIONS_PER_EXPERT = 4


def _fp8_blocks_are_128(q: torch.Tensor, scale: torch.Tensor) -> bool:
    """The kernels assume DeepSeek's 128 x 128 blocks; a checkpoint with other blocks takes the dequantised path."""
    if q.dtype != torch.float8_e4m3fn:
        return True
    return tuple(scale.shape[-2:]) == (-(-q.shape[-2] // 128), -(-q.shape[-1] // 128))


@torch.library.custom_op("dsmoe::wq_matmul", mutates_args=())
def _wq_matmul_op(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    from dsmoe.kernels.triton_quant import wq_matmul

    return wq_matmul(x, q, scale)


@_wq_matmul_op.register_fake
def _(x, q, scale):
    return x.new_empty(x.shape[0], q.shape[0])


def quant_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ dequantize(q, scale)^T in x's dtype (see dsmoe.kernels.quant for the formats)."""
    x2 = x.reshape(-1, x.shape[-1])
    if _wq_kernel_fits(x2, x2.shape[0], _fp8_blocks_are_128(q, scale)):
        y = torch.ops.dsmoe.wq_matmul(x2, q, scale)
    else:
        y = torch.nn.functional.linear(x2, dequantize(q, scale, x2.dtype))
    return y.view(*x.shape[:-1], q.shape[0])


def quant_moe_experts(
    x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor, gate_up_q: torch.Tensor,
    gate_up_scale: torch.Tensor, down_q: torch.Tensor, down_scale: torch.Tensor, impl: str,
) -> torch.Tensor:
    """`moe_experts` on quantized expert stacks. Up to QUANT_DECODE_DECISIONS_PER_EXPERT decisions an expert read
    only the chosen experts' codes; more dequantise the stacks once and take `moe_experts(impl)`."""
    blocks_ok = _fp8_blocks_are_128(gate_up_q, gate_up_scale) and _fp8_blocks_are_128(down_q, down_scale)
    max_rows = max(DECODE_MAX_ROWS, QUANT_DECODE_DECISIONS_PER_EXPERT * gate_up_q.shape[0])
    if _wq_kernel_fits(x_TD, topk_idx_TK.numel(), blocks_ok, topk_weight_TK, max_rows=max_rows):
        return _summed_decode(x_TD, topk_idx_TK, topk_weight_TK, gate_up_q, down_q, gate_up_scale, down_scale, None,
                              None, None)
    return moe_experts(x_TD, topk_idx_TK, topk_weight_TK, dequantize(gate_up_q, gate_up_scale, x_TD.dtype),
                       dequantize(down_q, down_scale, x_TD.dtype), impl)
