"""Autotune configurations of the grouped GEMM kernels (H100/H200, bf16) and the helpers that pick them.

Starting points are the published tuned tables: vLLM's fused_moe configs for H100/H200 (M >= 256 rows per
expert: BLOCK 128x256x64, 8 warps, 3-4 stages; fine experts E=128: 64-128 x 128 x 64, 4-8 warps;
M < 32: BLOCK_M 16, BLOCK_K 128) and ScatterMoE's (128x128x32/64, 4-8 warps, 4 stages). Each kernel
gets a handful, pruned by shape, so autotuning a new shape costs seconds, not minutes.

Under TRITON_INTERPRET=1 (the CPU tests) there is exactly one small config: the interpreter would
otherwise "benchmark" every config by running it.
"""

from __future__ import annotations

import os

import torch
import triton

from triton import knobs

INTERPRET = bool(knobs.runtime.interpret)
# DSMOE_TRITON_AUTOTUNE=0: take the first shape-appropriate config instead of benchmarking several
# (quick GPU test runs; read at import).
AUTOTUNE = os.environ.get("DSMOE_TRITON_AUTOTUNE", "1") != "0"


def _patch_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter keeps scalars as 1-element arrays and converts them with int(array),
    which numpy >= 2.4 refuses ("only 0-dimensional arrays ..."), so `range(0, K, BLOCK_K)` over a
    runtime bound fails. Convert through the element instead; only ever applied in interpreter mode."""
    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.ones(1, dtype=np.int32))
        return
    except TypeError:
        pass
    if getattr(interpreter._patch_lang_tensor, "_dsmoe_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._dsmoe_patched = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _patch_interpreter_scalar_index()


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, group: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


if INTERPRET:
    ROW_CONFIGS = [_cfg(16, 32, 32, 4, 1, group=2)]
    WEIGHT_CONFIGS = [_cfg(16, 32, 16, 4, 1, group=2)]
else:
    ROW_CONFIGS = [
        # rows per expert >= 64 (training, prefill); the winners of a sweep of 30 configs per GEMM on an
        # H200 at the V2-Lite, fine-grained and V3 shapes (T=16384): 128 rows x 128-256 columns, 8 warps
        _cfg(128, 128, 64, 8, 4),
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 256, 64, 8, 3),
        _cfg(128, 256, 64, 8, 4),
        _cfg(64, 128, 64, 4, 4),
        # few rows per expert (decode, small batches): weight-bandwidth bound, small BLOCK_M
        _cfg(16, 64, 128, 4, 4, group=1),
        _cfg(16, 128, 128, 4, 3, group=1),
        _cfg(32, 64, 128, 4, 4, group=1),
        _cfg(32, 128, 64, 4, 4, group=1),
    ]
    # BLOCK_M/BLOCK_N are the two output dims (I, J) of a weight gradient, BLOCK_K its rows per step.
    WEIGHT_CONFIGS = [
        _cfg(128, 128, 64, 8, 4),
        _cfg(128, 256, 64, 8, 3),
        _cfg(128, 128, 32, 4, 4),
        _cfg(64, 128, 64, 4, 4),
        _cfg(128, 64, 64, 4, 4),
    ]


# The decode MoE kernels (triton_moe_decode.py): matrix-vector products over a few rows, bound by the weight
# bytes they read. (output rows, reduced dim) per program; the reduced block divides 128, as the fp8 block
# scales need. The first of each is the tile the fp8/int8 decode kernels were written with.
def _decode_cfg(rows_key: str, rows: int, reduced_key: str, reduced: int, warps: int, **more) -> triton.Config:
    return triton.Config({rows_key: rows, reduced_key: reduced, **more}, num_warps=warps)


if INTERPRET:
    DECODE_UP_CONFIGS = [_decode_cfg("BLOCK_F", 32, "BLOCK_D", 32, 4)]
    DECODE_DOWN_CONFIGS = [_decode_cfg("BLOCK_D", 32, "BLOCK_F", 32, 4, SPLIT_F=2)]  # a split, some parts unused
else:
    DECODE_UP_CONFIGS = [_decode_cfg("BLOCK_F", f, "BLOCK_D", d, w)
                         for f, d, w in [(32, 128, 4), (16, 128, 4), (64, 128, 4), (64, 128, 8), (32, 64, 4)]]
    # one program per (token, D-tile, F-part) sums the token's decisions over its part of F; at T = 1 small
    # D-tiles or a split of F keep the SMs busy; each step holds K + S tiles in flight, so the tiles stay small
    DECODE_DOWN_CONFIGS = [_decode_cfg("BLOCK_D", d, "BLOCK_F", f, w, SPLIT_F=split)
                           for d, f, w, split in [(32, 128, 4, 1), (8, 128, 4, 1), (16, 128, 4, 1), (4, 128, 4, 1),
                                                  (16, 64, 4, 1), (32, 128, 8, 1), (32, 128, 4, 2), (32, 128, 4, 4),
                                                  (16, 128, 4, 4), (64, 128, 8, 4)]]

# The weight-only quantized linears at decode shapes (triton_quant.wq_matmul): (output columns, reduced dim) per
# program, the reduced block dividing 128 (fp8 block scales). One token's projections have few column tiles of 64
# (V2-Lite's q_proj 48, o_proj 32: a third of an H100's SMs), so narrower tiles are candidates; the first is the
# tile the kernel was written with.
if INTERPRET:
    WQ_CONFIGS = [_decode_cfg("BLOCK_N", 64, "BLOCK_K", 128, 4)]
else:
    WQ_CONFIGS = [_decode_cfg("BLOCK_N", n, "BLOCK_K", k, w)
                  for n, k, w in [(64, 128, 4), (32, 128, 4), (16, 128, 4), (16, 128, 2), (32, 64, 4), (16, 64, 2)]]


SMEM_BUDGET = 180 * 1024  # bytes; H100/H200 allow 227 KB per block, leave room for the epilogue


def _fit_stages(config: triton.Config, tile_elems: int, elem_bytes: int) -> triton.Config:
    """The config with num_stages lowered until its pipelined tiles fit shared memory (fp32 inputs
    would otherwise fail every bf16-sized config)."""
    stages = config.num_stages
    while stages > 1 and stages * tile_elems * elem_bytes > SMEM_BUDGET:
        stages -= 1
    if stages == config.num_stages:
        return config
    return triton.Config(dict(config.kwargs), num_warps=config.num_warps, num_stages=stages)


def _select(configs: list, keep: list) -> list:
    keep = keep or configs[:1]
    return keep if AUTOTUNE else keep[:1]


def prune_row_configs(configs, named_args, **kwargs):
    """Keep small BLOCK_M for few rows per expert and large otherwise; the fused SwiGLU keeps two
    accumulators, so it gets BLOCK_N <= 128; never a tile much wider than the output."""
    rows = named_args["ROWS_HINT"]
    two_acc = kwargs.get("MODE", named_args.get("MODE")) == 1
    n_out = named_args["N_OUT"]
    keep = [
        c for c in configs
        if (c.kwargs["BLOCK_M"] <= 32) == (rows < 64)
        and not (two_acc and c.kwargs["BLOCK_N"] > 128)
        and c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(n_out))
    ]
    elem = named_args["a_ptr"].element_size()
    return [_fit_stages(c, c.kwargs["BLOCK_K"] * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"] * (2 if two_acc else 1)),
                        elem) for c in _select(configs, keep)]


def prune_weight_configs(configs, named_args, **kwargs):
    i_out, j_out = named_args["I"], named_args["J"]
    keep = [c for c in configs
            if c.kwargs["BLOCK_M"] <= max(32, triton.next_power_of_2(i_out))
            and c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(j_out))]
    elem = named_args["a_ptr"].element_size()
    return [_fit_stages(c, c.kwargs["BLOCK_K"] * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]), elem)
            for c in _select(configs, keep)]


def prune_decode_configs(configs, named_args, **kwargs):
    """Every decode config is a candidate at any shape; only DSMOE_TRITON_AUTOTUNE=0 narrows them to the first."""
    return _select(configs, configs)


def tolerant_bench(kernel_call, quantiles):
    """The autotuner's timer, shorter than Triton's default (10/40 ms), and a config that fails to
    compile for any reason (not only out-of-resources) only drops out instead of failing the call."""
    from triton.testing import do_bench

    try:
        return do_bench(kernel_call, warmup=10, rep=40, quantiles=quantiles)
    except Exception as e:  # noqa: BLE001 - compile errors of one config; the final launch still raises
        if knobs.autotuning.print:
            print(f"autotune: config dropped: {type(e).__name__}: {e}")
        return [float("inf")] * len(quantiles)


def rows_hint(num_rows: int, num_experts: int) -> int:
    """Autotune key: rows per expert rounded to a power of two (computed from shapes, no device read)."""
    return min(4096, triton.next_power_of_2(max(1, num_rows // max(1, num_experts))))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32 (parity with torch.matmul); bf16/fp16 use the tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"
