"""The MoE layer at decode shapes: two kernels that read only the chosen experts' weights, no permutation.

At a few tokens a step the layer is bound by the bytes of expert weights it reads and by launches. The
training path (triton_moe.py) sorts the T*K routing decisions by expert (histogram, cumsum, scatter), runs
two grouped GEMMs and a combine: five launches and a plan the GPU must build first. Here each decision reads
its expert's weights directly:

  up     one program per (decision, F-tile): h_n = silu(x_t W_gate[e]^T) * (x_t W_up[e]^T), fp32
  down   one program per (token, D-tile, F-part): y_t = sum_k w_tk * h_(t,k) W_down[e]^T  +  sum_s h_(t,s) W_down_s^T
         over its share of F, summed in fp32 and stored as one of MAX_SPLIT_F partial sums (no atomics)

Splitting F gives a single token enough programs to keep the SMs reading (one per D-tile left the down kernel at
1.3 TB/s on an H100 while the up kernel read at 2.5). The caller adds the partial sums (`ops.experts_decode`:
under torch.compile that sum fuses into the residual add that follows, so it costs no launch); the autotuner
picks the split, and parts it leaves out are written as zeros.

The decision (token) is the grid's fastest axis, so the programs running together read the same weight tile:
tokens that chose the same expert, and every token's shared experts, then share its HBM read through L2.

The shared experts are decisions too, always on, weight 1: DeepSeek merges its S shared experts into one MLP
of width S*F, i.e. S experts of width F side by side, so shared expert s is rows s*F:(s+1)*F of the MLP's
gate_proj / up_proj and columns s*F:(s+1)*F of its down_proj, read where they lie (no copy). The layer's whole
expert work is then two launches.

Weights are plain (bf16/fp16/fp32) or weight-only quantized codes (fp8 e4m3 with 128x128 block scales, int8
with a scale per output row; formats in `dsmoe.kernels.quant`), dequantised in registers: SCALES selects.
Quantized shared experts stay `QuantLinear`s (ops.quant_moe_experts passes none here).
The model dims are compile-time constants (a handful of shapes per model), which lets the loops unroll.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsmoe.kernels.triton_configs import DECODE_DOWN_CONFIGS, DECODE_UP_CONFIGS, prune_decode_configs, tolerant_bench
from dsmoe.kernels.triton_moe import check_expert_inputs
from dsmoe.kernels.triton_quant import codes_view, load_codes, row_scale, scale_strides

PLAIN, INT8, FP8 = 0, 1, 2  # SCALES: how a weight tile becomes fp32
MAX_SPLIT_F = 4  # partial sums the down kernel returns; its configs split F into at most this many parts


@triton.autotune(configs=DECODE_UP_CONFIGS, key=["ROWS_HINT", "F", "D", "SCALES", "N_SHARED"],
                 prune_configs_by={"early_config_prune": prune_decode_configs}, do_bench=tolerant_bench)
@triton.jit(do_not_specialize=["N_ROUTED", "ROWS_HINT"])
def _decode_up_kernel(x_ptr, idx_ptr, w_ptr, s_ptr, shared_gate_ptr, shared_up_ptr, h_ptr, s_stride_e, s_stride_r,
                      N_ROUTED, ROWS_HINT, TOP_K: tl.constexpr, N_SHARED: tl.constexpr, F: tl.constexpr,
                      D: tl.constexpr, SCALES: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)  # decisions: T*K routed (token-major), then T*S shared
    token = n // TOP_K
    e = tl.load(idx_ptr + n, mask=n < N_ROUTED, other=0).to(tl.int64)
    gate_ptr = w_ptr + e * (2 * F) * D  # the routed stack's rows are [gate; up] per expert
    up_ptr = gate_ptr + F * D
    if N_SHARED > 0:
        if n >= N_ROUTED:
            j = n - N_ROUTED
            token = j // N_SHARED
            gate_ptr = shared_gate_ptr + (j % N_SHARED).to(tl.int64) * F * D
            up_ptr = shared_up_ptr + (j % N_SHARED).to(tl.int64) * F * D
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = offs_f < F
    acc_g = tl.zeros((BLOCK_F,), tl.float32)
    acc_u = tl.zeros((BLOCK_F,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        x = tl.load(x_ptr + token * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        ok = f_ok[:, None] & d_ok[None, :]
        g = tl.sum(load_codes(gate_ptr + offs_f[:, None] * D + offs_d[None, :], ok, SCALES == 2) * x[None, :], axis=1)
        u = tl.sum(load_codes(up_ptr + offs_f[:, None] * D + offs_d[None, :], ok, SCALES == 2) * x[None, :], axis=1)
        if SCALES == 2:  # BLOCK_D divides 128: one scale per row of this D-block
            g *= row_scale(s_ptr, e, offs_f, f_ok, d0, s_stride_e, s_stride_r, True)
            u *= row_scale(s_ptr, e, F + offs_f, f_ok, d0, s_stride_e, s_stride_r, True)
        acc_g += g
        acc_u += u
    if SCALES == 1:
        acc_g *= row_scale(s_ptr, e, offs_f, f_ok, 0, s_stride_e, s_stride_r, False)
        acc_u *= row_scale(s_ptr, e, F + offs_f, f_ok, 0, s_stride_e, s_stride_r, False)
    tl.store(h_ptr + n * F + offs_f, acc_g * tl.sigmoid(acc_g) * acc_u, mask=f_ok)


@triton.jit
def _down_chunk(h_ptr, w_ptr, row_stride, offs_d, d_ok, f0, s_ptr, e, s_stride_e, s_stride_r, F: tl.constexpr,
                SCALES: tl.constexpr, BLOCK_F: tl.constexpr):
    """W[offs_d, f0:f0+BLOCK_F] @ h[f0:f0+BLOCK_F] in fp32 for one decision, scaled; W's rows `row_stride` apart
    (a slice of a wider matrix for the shared experts)."""
    offs_f = f0 + tl.arange(0, BLOCK_F)
    f_ok = offs_f < F
    h = tl.load(h_ptr + offs_f, mask=f_ok, other=0.0)
    w = load_codes(w_ptr + offs_d[:, None] * row_stride + offs_f[None, :], d_ok[:, None] & f_ok[None, :], SCALES == 2)
    part = tl.sum(w * h[None, :], axis=1)
    if SCALES > 0:  # fp8: BLOCK_F divides 128, one scale per row of this F-block; int8: one per row
        part *= row_scale(s_ptr, e, offs_d, d_ok, f0, s_stride_e, s_stride_r, SCALES == 2)
    return part


@triton.autotune(configs=DECODE_DOWN_CONFIGS, key=["ROWS_HINT", "F", "D", "SCALES", "N_SHARED"],
                 prune_configs_by={"early_config_prune": prune_decode_configs}, do_bench=tolerant_bench)
@triton.jit(do_not_specialize=["N_ROUTED", "ROWS_HINT"])
def _decode_down_kernel(h_ptr, idx_ptr, weight_ptr, w_ptr, s_ptr, shared_down_ptr, y_ptr, s_stride_e, s_stride_r,
                        N_ROUTED, ROWS_HINT, TOP_K: tl.constexpr, N_SHARED: tl.constexpr, F: tl.constexpr,
                        D: tl.constexpr, SCALES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
                        SPLIT_F: tl.constexpr, MAX_SPLIT: tl.constexpr):
    t, f_part = tl.program_id(0), tl.program_id(2)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.zeros((BLOCK_D,), tl.float32)
    # F-chunks outside (this part's: every SPLIT_F-th), the token's decisions unrolled inside: each step issues
    # K + S independent weight-tile loads at once (one decision at a time left each program waiting on one load)
    for f0 in range(f_part * BLOCK_F, F, SPLIT_F * BLOCK_F):
        for k in tl.static_range(TOP_K):
            n = t * TOP_K + k
            e = tl.load(idx_ptr + n).to(tl.int64)
            part = _down_chunk(h_ptr + n * F, w_ptr + e * D * F, F, offs_d, d_ok, f0, s_ptr, e, s_stride_e,
                               s_stride_r, F, SCALES, BLOCK_F)
            acc += tl.load(weight_ptr + n).to(tl.float32) * part
        for s in tl.static_range(N_SHARED):
            n = N_ROUTED + t * N_SHARED + s
            acc += _down_chunk(h_ptr + n * F, shared_down_ptr + s * F, N_SHARED * F, offs_d, d_ok, f0, s_ptr, 0, 0, 0,
                               F, 0, BLOCK_F)
    T = tl.num_programs(0)
    tl.store(y_ptr + (f_part * T + t) * D + offs_d, acc, mask=d_ok)
    if f_part == 0:  # the parts this config does not split into hold zeros, so the caller sums all MAX_SPLIT
        for unused in tl.static_range(SPLIT_F, MAX_SPLIT):
            tl.store(y_ptr + (unused * T + t) * D + offs_d, tl.zeros((BLOCK_D,), tl.float32), mask=d_ok)


def moe_decode(x_TD: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """y_TD = sum_k w_tk * Expert_{idx_tk}(x_t) (+ SharedMLP(x_t)) in x's dtype: `moe_decode_partials` summed."""
    return moe_decode_partials(x_TD, *args, **kwargs).sum(0).to(x_TD.dtype)


def moe_decode_partials(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                        gate_up: torch.Tensor, down: torch.Tensor, gate_up_scale: torch.Tensor | None = None,
                        down_scale: torch.Tensor | None = None,
                        shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """[MAX_SPLIT_F, T, D] fp32 partial sums of y_TD = sum_k w_tk * Expert_{idx_tk}(x_t) (+ SharedMLP(x_t)).

    gate_up [E, 2F, D], down [E, D, F]: x's dtype, or quantized codes with their scales (both or neither).
    shared: the shared MLP's (gate_proj [S*F, D], up_proj [S*F, D], down_proj [D, S*F]) weights in x's dtype,
    S = their width over F; plain weights only."""
    quantized = gate_up_scale is not None
    if not quantized:
        check_expert_inputs(x_TD, topk_idx_TK, topk_weight_TK, gate_up, down)
    T, D = x_TD.shape
    K = topk_idx_TK.shape[1]
    E, F2, _ = gate_up.shape
    F = F2 // 2
    if quantized and (gate_up.shape[2] != D or tuple(down.shape) != (E, D, F)
                      or tuple(topk_weight_TK.shape) != (T, K)):
        raise ValueError(f"moe_decode: x {tuple(x_TD.shape)}, topk {tuple(topk_idx_TK.shape)}, gate_up "
                         f"{tuple(gate_up.shape)}, down {tuple(down.shape)} do not fit [T, D], [T, K], [E, 2F, D], "
                         "[E, D, F]")
    if quantized != (down_scale is not None) or (quantized and shared is not None):
        raise ValueError("moe_decode: scales come for both stacks or neither, and shared experts take plain weights")
    gu, fp8 = codes_view(gate_up.contiguous())
    dn, _ = codes_view(down.contiguous())
    scales = (FP8 if fp8 else INT8) if quantized else PLAIN
    gu_s = gate_up_scale.contiguous().float() if quantized else gu  # never read when PLAIN
    dn_s = down_scale.contiguous().float() if quantized else dn
    up_strides = scale_strides(gu_s, fp8) if quantized else (0, 0)
    down_strides = scale_strides(dn_s, fp8) if quantized else (0, 0)
    S = 0
    shared_gate = shared_up = shared_down = gu  # placeholders, never read when S == 0
    if shared is not None:
        shared_gate, shared_up, shared_down = (w.contiguous() for w in shared)
        S = shared_gate.shape[0] // F
        if (any(w.dtype != gu.dtype for w in (shared_gate, shared_up, shared_down)) or S == 0
                or tuple(shared_gate.shape) != (S * F, D) or shared_up.shape != shared_gate.shape
                or tuple(shared_down.shape) != (D, S * F)):
            raise ValueError(f"moe_decode: shared experts gate {tuple(shared_gate.shape)} / up "
                             f"{tuple(shared_up.shape)} / down {tuple(shared_down.shape)} are not S experts of width "
                             f"F={F} in {gu.dtype}: want [S*F, D], [S*F, D], [D, S*F]")
    idx = topk_idx_TK.reshape(-1).contiguous()
    weight = topk_weight_TK.reshape(-1).contiguous()
    x_TD = x_TD.contiguous()
    N_routed, N = T * K, T * (K + S)
    h = torch.empty(N, F, dtype=torch.float32, device=x_TD.device)
    y = torch.empty(MAX_SPLIT_F, T, D, dtype=torch.float32, device=x_TD.device)
    if T == 0:
        return y
    hint = triton.next_power_of_2(T)
    _decode_up_kernel[lambda meta: (N, triton.cdiv(F, meta["BLOCK_F"]))](
        x_TD, idx, gu, gu_s, shared_gate, shared_up, h, *up_strides, N_routed, hint,
        TOP_K=K, N_SHARED=S, F=F, D=D, SCALES=scales)
    _decode_down_kernel[lambda meta: (T, triton.cdiv(D, meta["BLOCK_D"]), meta["SPLIT_F"])](
        h, idx, weight, dn, dn_s, shared_down, y, *down_strides, N_routed, hint,
        TOP_K=K, N_SHARED=S, F=F, D=D, SCALES=scales, MAX_SPLIT=MAX_SPLIT_F)
    return y
