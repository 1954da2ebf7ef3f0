"""The Triton MoE kernels against the plain-PyTorch references: forward and every gradient.

Without a GPU the kernels run in Triton's CPU interpreter in fp32 (its bf16 dot is not trustworthy);
tests/conftest.py selects the interpreter before anything imports triton, because Triton makes that
choice at import. On a GPU machine the same tests run compiled on CUDA, and the tests marked `gpu` add
bf16 parity at real model dims, the sync-free check, CUDA-graph capture and torch.compile.
"""

import os

import pytest
import torch

from triton_guard import DEVICE, ON_GPU, require_triton


def _import_kernels():
    require_triton(module_level=True)
    saved = os.environ.get("DSMOE_TRITON_AUTOTUNE")
    os.environ["DSMOE_TRITON_AUTOTUNE"] = "0"  # one config per shape: tests check maths, not speed
    try:
        from dsmoe.kernels import (triton_gemm_rows, triton_gemm_weights, triton_moe, triton_permute,
                                   triton_router, triton_swiglu)
    finally:
        if saved is None:
            os.environ.pop("DSMOE_TRITON_AUTOTUNE")
        else:
            os.environ["DSMOE_TRITON_AUTOTUNE"] = saved
    return triton_gemm_rows, triton_gemm_weights, triton_moe, triton_permute, triton_router, triton_swiglu


rows_mod, weights_mod, moe_mod, permute_mod, router_mod, swiglu_mod = _import_kernels()

from dsmoe.presets import get_preset  # noqa: E402
from dsmoe.kernels import ops, reference  # noqa: E402
from dsmoe.model.router import route  # noqa: E402


def triton_experts(x, idx, w, gate_up, down):
    """The routed experts on the Triton kernels, through the one door the model uses."""
    return ops.moe_experts(x, idx, w, gate_up, down, impl="triton")


def make_inputs(T, D, F, E, K, dtype=torch.float32, empty=(), seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    idx = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(T)]).reshape(T, K)
    x = torch.randn(T, D, generator=g)
    w = torch.rand(T, K, generator=g)
    gate_up = torch.randn(E, 2 * F, D, generator=g) / D**0.5
    down = torch.randn(E, D, F, generator=g) / F**0.5
    return (x.to(device, dtype), idx.to(device), w.to(device), gate_up.to(device, dtype), down.to(device, dtype))


def forward_and_grads(fn, x, idx, w, gate_up, down, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, gate_up, down)]
    y = fn(leaves[0], idx, leaves[1], leaves[2], leaves[3])
    return [y.detach(), *torch.autograd.grad(y, leaves, grad_out)]


NAMES = ["y", "dx", "d topk_weight", "d gate_up", "d down"]
SHAPES = [  # T, D, F, E, K, experts that receive no tokens
    (1, 16, 8, 4, 2, ()),  # a single token
    (33, 32, 24, 5, 3, (0, 4)),  # empty experts incl. first and last; E not a multiple of any block
    (40, 37, 19, 6, 1, (2,)),  # k=1, odd hidden sizes (D, F not multiples of 16)
    (18, 24, 40, 3, 3, ()),  # every token uses every expert; F > BLOCK_N
]


# ---- the whole experts op, fp32 ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-D{}-F{}-E{}-K{}".format(*s[:5]))
def test_experts_forward_and_every_gradient_match_reference(shape):
    T, D, F, E, K, empty = shape
    x, idx, w, gate_up, down = make_inputs(T, D, F, E, K, empty=empty)
    grad_out = torch.randn(T, D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ours = forward_and_grads(triton_experts, x, idx, w, gate_up, down, grad_out)
    ref = forward_and_grads(reference.moe_experts_reference, x, idx, w, gate_up, down, grad_out)
    for name, a, b in zip(NAMES, ours, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)
    for e in empty:  # experts without tokens get exactly zero weight gradient
        assert ours[3][e].abs().max() == 0 and ours[4][e].abs().max() == 0


@pytest.mark.parametrize("use_grouped_mm", [False, True], ids=["triton-backward", "grouped_mm-backward"])
def test_backward_gemm_backends_agree_with_reference(use_grouped_mm):
    """Both backends of the gathered backward GEMMs (Triton gather-on-load; torch grouped_mm over gathered
    copies, what Hopper bf16 uses), incl. an empty expert. D, F multiples of 4 for CPU grouped_mm."""
    if use_grouped_mm and ON_GPU:
        pytest.skip("CUDA grouped_mm takes bf16 only: the bf16 GPU tests below cover that backend")
    T, D, F, E, K = 23, 32, 24, 5, 2
    x, idx, w, gate_up, down = make_inputs(T, D, F, E, K, empty=(3,))
    dy = torch.randn(T, D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y, gu, order, inverse, offsets = moe_mod.experts_forward(x, idx, w, gate_up, down, save_for_backward=True)
    dx, dw, d_gate_up, d_down = moe_mod.experts_backward(dy, x, w, gate_up, down, gu, order, inverse, offsets,
                                                         need_dw=True, use_grouped_mm=use_grouped_mm)
    ref = forward_and_grads(reference.moe_experts_reference, x, idx, w, gate_up, down, dy)
    for name, ours, theirs in zip(NAMES, [y, dx, dw, d_gate_up, d_down], ref):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4, msg=name)
    assert d_gate_up[3].abs().max() == 0 and d_down[3].abs().max() == 0


def test_weights_go_through_tensor_descriptors_only_where_the_copy_engine_can_read_them():
    """Forward GEMMs (reduced dim contiguous, rows 16-byte aligned) use descriptors; the backward [K, N]
    layout and unaligned rows use pointer loads. Both paths meet the reference in the tests above:
    SHAPES holds aligned (D=32, F=24 in fp32) and unaligned (D=37, F=19) cases."""
    _, _, _, gate_up, down = make_inputs(3, 32, 24, 2, 1)
    assert rows_mod.weights_by_descriptor(gate_up, (gate_up.stride(2), gate_up.stride(1)))
    assert rows_mod.weights_by_descriptor(down, (down.stride(2), down.stride(1)))
    assert not rows_mod.weights_by_descriptor(down, (down.stride(1), down.stride(2)))
    _, _, _, gate_up, down = make_inputs(3, 37, 19, 2, 1)
    assert not rows_mod.weights_by_descriptor(gate_up, (gate_up.stride(2), gate_up.stride(1)))


@pytest.mark.parametrize("need_dw", [True, False])
def test_swiglu_backward_matches_autograd(need_dw):
    N, F = 29, 150  # F over two column blocks with a tail
    g = torch.Generator().manual_seed(3)
    gu = torch.randn(N, 2 * F, generator=g).to(DEVICE)
    dh = torch.randn(N, F, generator=g).to(DEVICE)
    w = torch.rand(N, generator=g).to(DEVICE)
    order = torch.randperm(N, generator=g).int().to(DEVICE)
    dgu, hw, dw = swiglu_mod.swiglu_backward(dh, gu, order, w, need_dw)
    gu_leaf = gu.clone().requires_grad_()
    w_rows = w[order.long()][:, None]  # the gate weight of each sorted row
    h = reference.swiglu(gu_leaf)
    h.backward(dh * w_rows)  # d gu of <dh, w * h>
    torch.testing.assert_close(dgu, gu_leaf.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(hw, h.detach() * w_rows, atol=1e-6, rtol=1e-5)
    if need_dw:
        expected = torch.empty(N, device=DEVICE)
        expected[order.long()] = (dh * h.detach()).sum(1)
        torch.testing.assert_close(dw, expected, atol=1e-4, rtol=1e-4)
    else:
        assert dw is None


def test_no_grad_forward_skips_saving_and_weight_grad_is_optional():
    x, idx, w, gate_up, down = make_inputs(9, 16, 8, 4, 2)
    with torch.no_grad():
        y, gu, *_ = moe_mod.experts_forward(x, idx, w, gate_up, down, save_for_backward=False)
    assert gu is None
    torch.testing.assert_close(y, reference.moe_experts_reference(x, idx, w, gate_up, down), atol=2e-5, rtol=1e-4)
    # topk weights that do not require grad: no atomics, the other gradients unchanged
    xg = x.clone().requires_grad_()
    triton_experts(xg, idx, w, gate_up, down).sum().backward()  # expanded grad_out
    xr = x.clone().requires_grad_()
    reference.moe_experts_reference(xr, idx, w, gate_up, down).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, atol=2e-5, rtol=1e-4)


def test_ops_dispatches_triton_and_rejects_bad_shapes():
    x, idx, w, gate_up, down = make_inputs(5, 16, 8, 4, 2)
    y = ops.moe_experts(x, idx, w, gate_up, down, impl="triton")
    torch.testing.assert_close(y, reference.moe_experts_reference(x, idx, w, gate_up, down), atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="do not fit"):
        triton_experts(x, idx, w, gate_up[:, :, :8], down)
    with pytest.raises(ValueError, match="\\[T=5, K\\]"):
        triton_experts(x, idx[:3], w[:3], gate_up, down)
    with pytest.raises(ValueError, match="integer"):
        triton_experts(x, idx.float(), w, gate_up, down)


# ---- the single kernels ------------------------------------------------------------------------------

@pytest.mark.parametrize("T, K, E", [(1, 1, 1), (1, 2, 4), (37, 3, 5), (50, 3, 64), (300, 6, 64), (700, 2, 8)])
def test_permutation_is_the_stable_sort(T, K, E):
    _, idx, *_ = make_inputs(T, 8, 8, E, K, empty=(1,) if E > 2 else ())
    ours = permute_mod.permute_triton(idx, E)
    for name, a, b in zip(["order", "inverse", "offsets"], ours, reference.permute_reference(idx, E)):
        assert a.dtype == torch.int32 and torch.equal(a, b), name


class LaunchLog:
    """Stands in for a Triton kernel: records its name at each launch, then launches it."""

    def __init__(self, kernel, name: str, log: list):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


@pytest.mark.parametrize("T, K, E, launches", [
    (1, 6, 64, ["_sort_one_program_kernel"]),
    (512, 2, 8, ["_sort_one_program_kernel"]),  # exactly DECISIONS_PER_PROG
    (513, 2, 8, ["_histogram_kernel", "_scatter_kernel"]),
])
def test_permutation_of_one_program_of_decisions_is_one_launch(T, K, E, launches, monkeypatch):
    assert T * K in (6, permute_mod.DECISIONS_PER_PROG, permute_mod.DECISIONS_PER_PROG + 2)
    log = []
    for name in ("_histogram_kernel", "_scatter_kernel", "_sort_one_program_kernel"):
        monkeypatch.setattr(permute_mod, name, LaunchLog(getattr(permute_mod, name), name, log))
    _, idx, *_ = make_inputs(T, 8, 8, E, K, empty=(1,))
    ours = permute_mod.permute_triton(idx, E)
    assert log == launches
    for name, a, b in zip(["order", "inverse", "offsets"], ours, reference.permute_reference(idx, E)):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("weighted", [True, False])
def test_combine_sums_in_fp32(weighted):
    T, K, D = 11, 3, 37
    g = torch.Generator().manual_seed(0)
    y = torch.randn(T * K, D, generator=g).to(DEVICE)
    inverse = torch.randperm(T * K, generator=g).int().to(DEVICE)
    w = torch.rand(T, K, generator=g).to(DEVICE) if weighted else None
    out = permute_mod.combine_triton(y, inverse, w, T, K, torch.float32)
    torch.testing.assert_close(out, reference.combine_reference(y, inverse, K, w), atol=1e-6, rtol=1e-5)


def test_grouped_gemm_kernels_match_their_references():
    T, D, F, E, K = 21, 24, 20, 5, 2
    x, idx, w, gate_up, down = make_inputs(T, D, F, E, K, empty=(3,))
    order, inverse, offsets = permute_mod.permute_triton(idx, E)
    gu = torch.empty(T * K, 2 * F, device=DEVICE)
    h = rows_mod.grouped_rows(rows_mod.SWIGLU, x, gate_up, (gate_up.stride(2), gate_up.stride(1)), F, order,
                                 offsets, K, gather_a=True, gu=gu, store_gu=True)
    gu_ref, h_ref = reference.grouped_swiglu_reference(x, order, offsets, gate_up, K)
    torch.testing.assert_close(gu, gu_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(h, h_ref, atol=2e-5, rtol=1e-4)
    y = rows_mod.grouped_rows(rows_mod.PLAIN, h, down, (down.stride(2), down.stride(1)), D, order, offsets, K,
                                 gather_a=False)
    torch.testing.assert_close(y, reference.grouped_linear_reference(h, offsets, down), atol=2e-5, rtol=1e-4)
    # weight gradient of the down projection: sum over each expert's rows of dy^T h
    dy = torch.randn(T, D, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    d_down = weights_mod.grouped_weight_grad(dy, h, order, offsets, K, gather_a=True, gather_b=False,
                                             out_dtype=torch.float32)
    dy_rows = dy[order.long() // K]
    expected = torch.stack([dy_rows[a:b].t() @ h[a:b] for a, b in reference.expert_rows(offsets)])
    torch.testing.assert_close(d_down, expected, atol=2e-5, rtol=1e-4)
    assert d_down[3].abs().max() == 0


# ---- the fused router -----------------------------------------------------------------------------------

ROUTINGS = [  # scoring, method, n_group, topk_group, norm, scale, with_bias, E, K
    ("softmax", "greedy", 1, 1, False, 1.0, False, 64, 6),  # V2-Lite
    ("softmax", "group_limited_greedy", 4, 2, False, 16.0, False, 16, 3),  # V2
    ("sigmoid", "noaux_tc", 4, 2, True, 2.5, True, 16, 3),  # V3
    ("sigmoid", "noaux_tc", 1, 1, True, 1.0, True, 12, 1),  # one group, k=1, E not a power of two
    ("sigmoid", "noaux_tc", 3, 2, True, 1.0, True, 24, 4),  # group size 8, 3 groups (not a power of two)
]


@pytest.mark.parametrize("T", [1, 3, 37, 200])  # the tile follows T: 2, 4, 64 rows; 200 tokens: several programs
@pytest.mark.parametrize("case", ROUTINGS, ids=lambda c: f"{c[0]}-{c[1]}-g{c[2]}")
def test_fused_router_reproduces_route_and_its_gradient(case, T):
    scoring, method, n_group, topk_group, norm, scale, with_bias, E, K = case
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(T, E, generator=g) * 2).to(DEVICE)
    bias = (torch.randn(E, generator=g) * 0.5).to(DEVICE) if with_bias else None
    kw = dict(top_k=K, scoring_func=scoring, topk_method=method, n_group=n_group, topk_group=topk_group,
              norm_topk_prob=norm, routed_scaling_factor=scale)
    ours_logits = logits.clone().requires_grad_()
    idx, weight, scores, counts = ops.route_fused(ours_logits, bias, **kw)
    ref_logits = logits.clone().requires_grad_()
    r = route(ref_logits, bias_E=bias, **kw)
    assert torch.equal(idx, r.topk_idx_TK)  # same experts in the same order
    assert counts.dtype == torch.int64 and torch.equal(counts, r.counts_E)
    torch.testing.assert_close(weight, r.topk_weight_TK, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scores, r.scores_TE, atol=1e-6, rtol=1e-5)
    d_weight = torch.randn(T, K, generator=g).to(DEVICE)
    d_scores = torch.randn(T, E, generator=g).to(DEVICE)
    (ours,) = torch.autograd.grad((weight * d_weight).sum() + (scores * d_scores).sum(), ours_logits)
    (ref,) = torch.autograd.grad((r.topk_weight_TK * d_weight).sum() + (r.scores_TE * d_scores).sum(), ref_logits)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


def test_router_rejects_bad_arguments():
    with pytest.raises(ValueError, match="must fit"):
        router_mod.route_triton(torch.zeros(2, 6, device=DEVICE), None, top_k=7, scoring_func="softmax",
                                topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
                                routed_scaling_factor=1.0)


# ---- through the model, torch.compile and the op checker ----------------------------------------------

def test_tiny_model_on_triton_matches_reference_forward_and_grads(monkeypatch):
    from dsmoe.model.transformer import build_model

    calls = {"route": 0, "experts": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(ops, "route_fused", counted("route", ops.route_fused))
    monkeypatch.setattr(ops, "experts_fused", counted("experts", ops.experts_fused))

    config = get_preset("tiny").replace(num_hidden_layers=2, vocab_size=64, hidden_size=32, moe_intermediate_size=16,
                                        n_routed_experts=6, num_experts_per_tok=2, n_group=2, topk_group=1)
    model = build_model(config, DEVICE, torch.float32, moe_impl="reference")
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    results = {}
    for impl in ("reference", "triton"):
        model.moe_impl = impl
        model.zero_grad(set_to_none=True)
        logits = model(ids)
        logits.float().square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = (logits.detach(), grads, model.routing_stats()[0].clone())
    assert calls == {"route": 1, "experts": 1}  # one MoE layer, on the fused kernels only when asked
    (l_ref, g_ref, c_ref), (l_tri, g_tri, c_tri) = results["reference"], results["triton"]
    torch.testing.assert_close(l_tri, l_ref, atol=2e-5, rtol=1e-4)
    assert torch.equal(c_tri, c_ref)
    assert g_tri.keys() == g_ref.keys() and any("gate.weight" in n for n in g_ref)
    for name in g_ref:
        torch.testing.assert_close(g_tri[name], g_ref[name], atol=2e-5, rtol=1e-4, msg=name)


def test_custom_ops_trace_under_torch_compile():
    x, idx, w, gate_up, down = make_inputs(7, 16, 8, 4, 2)
    grad_out = torch.randn(7, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    backend = "inductor" if ON_GPU else "aot_eager"  # no C++ toolchain needed for the CPU check
    compiled = torch.compile(triton_experts, backend=backend, fullgraph=True)
    ours = forward_and_grads(compiled, x, idx, w, gate_up, down, grad_out)
    ref = forward_and_grads(reference.moe_experts_reference, x, idx, w, gate_up, down, grad_out)
    for name, a, b in zip(NAMES, ours, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


def test_opcheck_fake_and_autograd_registrations():
    x, idx, w, gate_up, down = make_inputs(5, 16, 8, 4, 2)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.dsmoe.experts_fwd.default,
                          (x, idx, w.requires_grad_(), gate_up.requires_grad_(), down, True), test_utils=tests)
    logits = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.dsmoe.route.default, (logits, None, 2, "softmax", "greedy", 1, 1, False, 1.0),
                          test_utils=tests)


# ---- GPU only: bf16, no host sync, CUDA graphs -------------------------------------------------------------

GPU_SHAPES = [SHAPES[0], SHAPES[2]] + [
    (512, 256, 128, 16, 4, (3, 7)),  # >= 64 rows per expert: the large-tile configs
    (300, 2048, 1408, 64, 6, ()),  # V2-Lite expert dims
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "T{}-D{}-F{}-E{}-K{}".format(*s[:5]))
def test_gpu_bf16_as_close_to_float64_as_the_reference(shape):
    T, D, F, E, K, empty = shape
    x, idx, w, gate_up, down = make_inputs(T, D, F, E, K, torch.bfloat16, empty)
    grad_out = torch.randn(T, D, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    ours = forward_and_grads(triton_experts, x, idx, w, gate_up, down, grad_out)
    ref = forward_and_grads(reference.moe_experts_reference, x, idx, w, gate_up, down, grad_out)
    exact = forward_and_grads(reference.moe_experts_reference, x.double(), idx, w.double(), gate_up.double(),
                              down.double(), grad_out.double())
    for name, a, b, e in zip(NAMES, ours, ref, exact):
        err_ours = ((a.double() - e).norm() / e.norm().clamp_min(1e-12)).item()
        err_ref = ((b.double() - e).norm() / e.norm().clamp_min(1e-12)).item()
        assert err_ours <= max(2 * err_ref, 1e-2), f"{name}: {err_ours:.2e} vs reference {err_ref:.2e}"


@pytest.mark.gpu
def test_gpu_v3_expert_weights_beyond_int32_offsets():
    """E*2F*D = 7.5e9 elements: expert offsets must be computed in int64 (experts >= 74 overflow int32)."""
    T, D, F, E, K = 64, 7168, 2048, 256, 8
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    idx = torch.rand(T, E, device="cuda", generator=g).argsort(dim=1)[:, :K]
    w = torch.rand(T, K, device="cuda", generator=g).requires_grad_()
    gate_up = (torch.randn(E, 2 * F, D, device="cuda", dtype=torch.bfloat16, generator=g) / D**0.5).requires_grad_()
    down = (torch.randn(E, D, F, device="cuda", dtype=torch.bfloat16, generator=g) / F**0.5).requires_grad_()
    grad_out = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    assert idx.max() >= 200
    leaves = (x, w, gate_up, down)
    y = triton_experts(x, idx, w, gate_up, down)
    # held in host memory while the reference runs: weights and two sets of their gradients overflow an 80 GB card
    ours = [t.cpu() for t in (y.detach(), *torch.autograd.grad(y, leaves, grad_out))]
    y = reference.moe_experts_reference(x, idx, w, gate_up, down)
    ref = [y.detach(), *torch.autograd.grad(y, leaves, grad_out)]
    for name, a, b in zip(NAMES, ours, ref):  # relative error, accumulated in chunks (the grads are 15 GB)
        diff = sum(((a[i:i + 16].cuda().float() - b[i:i + 16].float()) ** 2).sum() for i in range(0, len(a), 16))
        norm = sum((b[i:i + 16].float() ** 2).sum() for i in range(0, len(b), 16))
        err = (diff / norm).sqrt().item()
        assert err < 2e-2, f"{name}: relative error {err:.2e} against the bf16 reference"


@pytest.mark.gpu
def test_gpu_inductor_compiles_the_layer_without_graph_breaks():
    x, idx, w, gate_up, down = make_inputs(96, 64, 32, 8, 2, torch.bfloat16)
    grad_out = torch.randn(96, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.bfloat16)
    compiled = torch.compile(triton_experts, fullgraph=True)
    ours = forward_and_grads(compiled, x, idx, w, gate_up, down, grad_out)
    plain = forward_and_grads(triton_experts, x, idx, w, gate_up, down, grad_out)
    for name, a, b in zip(NAMES, ours, plain):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


@pytest.mark.gpu
def test_gpu_layer_never_syncs_and_captures_in_a_cuda_graph():
    from dsmoe.model.moe import MoE

    config = get_preset("deepseek-v3").replace(hidden_size=256, moe_intermediate_size=128, n_routed_experts=32,
                                               num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
                                               aux_loss_alpha=0.0)
    layer = MoE(config, impl="triton").cuda()
    layer.reset_parameters(0.02)
    layer.to(torch.bfloat16).gate.float()
    x = torch.randn(2, 64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()  # warm-up: autotuning benchmarks (and syncs) once per shape
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    static_x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer(static_x[None])  # warm-up of the inference shapes outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x[None])
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.testing.assert_close(static_y, layer(static_x[None]), atol=0, rtol=0)
