"""The torch grouped expert path against the per-expert reference loop: forward and every gradient."""

import pytest
import torch

from dsmoe.presets import PRESETS
from dsmoe.kernels.grouped import moe_experts_grouped
from dsmoe.kernels.ops import moe_experts, resolve_impl
from dsmoe.kernels.reference import moe_experts_reference, permute_reference


def make_inputs(T, D, F, E, K, dtype, empty_experts=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype)
    allowed = torch.tensor([e for e in range(E) if e not in empty_experts])
    idx = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    gate_up = (torch.randn(E, 2 * F, D, generator=g) / D**0.5).to(dtype)
    down = (torch.randn(E, D, F, generator=g) / F**0.5).to(dtype)
    return x, idx, w, gate_up, down


def run_with_grads(fn, x, idx, w, gate_up, down, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, gate_up, down)]
    y = fn(leaves[0], idx, leaves[1], leaves[2], leaves[3])
    grads = torch.autograd.grad(y, leaves, grad_out)
    return [y.detach(), *grads]


SHAPES = [  # T, D, F, E, K, experts that receive no tokens
    (1, 16, 8, 4, 2, ()),  # a single token
    (33, 32, 24, 8, 3, (0, 5)),  # empty experts, including the first
    (64, 48, 40, 6, 1, (5,)),  # k=1, empty last expert
    (50, 24, 16, 7, 7, ()),  # every token uses every expert
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_matches_reference_forward_and_grads(shape, dtype):
    T, D, F, E, K, empty = shape
    x, idx, w, gate_up, down = make_inputs(T, D, F, E, K, dtype, empty)
    assert resolve_impl("grouped", x, gate_up, down) == "grouped"  # the fast path really runs
    grad_out = torch.randn(T, D).to(dtype)
    ours = run_with_grads(moe_experts_grouped, x, idx, w, gate_up, down, grad_out)
    ref = run_with_grads(moe_experts_reference, x, idx, w, gate_up, down, grad_out)
    exact = run_with_grads(moe_experts_reference, *(t.double() if t.is_floating_point() else t
                                                    for t in (x, idx, w, gate_up, down)), grad_out.double())
    names = ["y", "dx", "dw", "dgate_up", "ddown"]
    for name, a, b, e in zip(names, ours, ref, exact):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
        else:  # bf16: the grouped path must be as close to the float64 truth as the reference loop is
            err_ours = (a.double() - e).norm() / e.norm().clamp_min(1e-12)
            err_ref = (b.double() - e).norm() / e.norm().clamp_min(1e-12)
            assert err_ours <= max(2 * err_ref, 1e-2), f"{name}: {err_ours:.2e} vs reference {err_ref:.2e}"
    for e in empty:  # experts without tokens get exactly zero weight gradient
        assert ours[3][e].abs().max() == 0 and ours[4][e].abs().max() == 0


def test_odd_sizes_fall_back_and_stay_correct():
    x, idx, w, gate_up, down = make_inputs(9, 17, 11, 5, 2, torch.float32)
    assert resolve_impl("grouped", x, gate_up, down) == "reference"  # 68-byte rows: grouped_mm can't
    with torch.autocast("cpu", dtype=torch.bfloat16):  # ... but it can once autocast computes them in bf16
        assert resolve_impl("grouped", x[:, :16], gate_up[..., :16], down[..., :8]) == "grouped"


def test_permutation_sorts_rows_by_expert():
    idx = torch.tensor([[2, 0], [1, 2], [2, 1]])
    order, inverse, offsets = permute_reference(idx, num_experts=4)
    assert offsets.tolist() == [1, 3, 6, 6]  # expert 3 is empty
    assert order.tolist() == [1, 2, 5, 0, 3, 4]  # rows sorted by expert, ties in (token, k) order
    assert (order // 2).tolist() == [0, 1, 2, 0, 1, 2]  # their tokens
    assert inverse[order.long()].tolist() == list(range(6))


def test_unknown_impl_is_refused():
    from dsmoe.model.moe import MoE

    x, idx, w, gate_up, down = make_inputs(2, 16, 8, 2, 1, torch.float32)
    with pytest.raises(ValueError, match="reference, grouped"):
        resolve_impl("fast", x, gate_up, down)
    with pytest.raises(ValueError, match="resolved"):
        moe_experts(x, idx, w, gate_up, down, impl="auto")  # the layer resolves; the op runs what it is told
    with pytest.raises(ValueError, match="reference, grouped"):
        MoE(PRESETS["tiny"], impl="fast")


GPU_SHAPES = SHAPES + [(4096, 2048, 1408, 64, 6, (3,))]  # + a V2-Lite layer with an empty expert


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_grouped_matches_reference_bf16_on_cuda(shape):
    T, D, F, E, K, empty = shape
    x, idx, w, gate_up, down = (t.cuda() for t in make_inputs(T, D, F, E, K, torch.bfloat16, empty))
    assert resolve_impl("grouped", x, gate_up, down) == "grouped"
    grad_out = torch.randn(T, D, generator=torch.Generator().manual_seed(1)).cuda().bfloat16()
    ours = run_with_grads(moe_experts_grouped, x, idx, w, gate_up, down, grad_out)
    exact = run_with_grads(moe_experts_reference, *(t.double() if t.is_floating_point() else t
                                                    for t in (x, idx, w, gate_up, down)), grad_out.double())
    for name, a, e in zip(["y", "dx", "dw", "dgate_up", "ddown"], ours, exact):
        err = (a.double() - e).norm() / e.norm().clamp_min(1e-12)
        assert err < 1e-2, f"{name}: relative error {err:.2e}"


@pytest.mark.gpu
def test_grouped_moe_layer_never_syncs_with_the_host():
    from dsmoe.model.moe import MoE

    cfg = PRESETS["small"]
    layer = MoE(cfg, impl="grouped").cuda()
    layer.reset_parameters(0.02)
    layer = layer.bfloat16()
    layer.gate.float()
    x = torch.randn(2, 256, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().square().mean().backward()  # warm-up (lazy init may sync once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_autocast_runs_the_experts_in_the_autocast_dtype():
    """Training keeps fp32 weights under bf16 autocast: the expert GEMMs must run in bf16 (the fast
    grouped path), as F.linear does, while the router stays fp32."""
    from dsmoe.model.moe import MoE

    cfg = PRESETS["tiny"]
    layer = MoE(cfg, impl="grouped")
    layer.reset_parameters(0.05)
    x = torch.randn(2, 8, cfg.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        scores = layer.gate(x.view(-1, cfg.hidden_size)).scores_TE
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(scores, torch.sigmoid(x.view(-1, cfg.hidden_size) @ layer.gate.weight.t()))
    torch.testing.assert_close(y.float(), layer(x), atol=3e-2, rtol=3e-2)


def test_an_fp32_cpu_layer_compiles_on_the_reference_path():
    """torch's fake _grouped_mm wants bf16 (CUDA's rule): compiling an fp32 CPU model with impl auto/grouped
    failed with a TorchRuntimeError; under compile those tensors take the reference path (same maths)."""
    x, idx, w, gate_up, down = make_inputs(33, 32, 24, 8, 3, torch.float32, empty_experts=(0, 5))
    grad_out = torch.randn(33, 32, generator=torch.Generator().manual_seed(1))

    def layer(x, idx, w, gate_up, down):
        return moe_experts(x, idx, w, gate_up, down, resolve_impl("auto", x, gate_up, down))

    compiled = torch.compile(layer, backend="eager")  # dynamo's fake-tensor trace, without inductor's cost
    ours = run_with_grads(compiled, x, idx, w, gate_up, down, grad_out)
    ref = run_with_grads(moe_experts_reference, x, idx, w, gate_up, down, grad_out)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert resolve_impl("auto", x, gate_up, down) == "grouped"  # eager keeps the grouped path


def test_empty_batch():
    _, _, _, gate_up, down = make_inputs(1, 16, 8, 4, 2, torch.float32)
    x, idx, w = torch.zeros(0, 16), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)
    for impl in ("grouped", "reference"):
        assert moe_experts(x, idx, w, gate_up, down, impl=impl).shape == (0, 16)


@pytest.mark.parametrize("K", [1, 3])
def test_gather_rows_backward_sums_each_source_rows_readers(K):
    """Both uses in the grouped path: tokens repeated K times (sorted by expert) and the permutation back."""
    from dsmoe.kernels.grouped import gather_rows

    T, E, D = 13, 4, 6
    _, idx, *_ = make_inputs(T, D, 4, E, K, torch.float32)
    order, inverse, _ = permute_reference(idx, num_experts=E)
    token = order // K
    g = torch.Generator().manual_seed(K)
    src = torch.randn(T, D, dtype=torch.float64, generator=g, requires_grad=True)
    grad = torch.randn(T * K, D, dtype=torch.float64, generator=g)
    gather_rows(src, token, inverse, K).backward(grad)
    expected = torch.zeros(T, D, dtype=torch.float64).index_add_(0, token, grad)
    torch.testing.assert_close(src.grad, expected, rtol=1e-12, atol=1e-12)  # summed in the grad's precision
    rows = torch.randn(T * K, D, dtype=torch.float64, generator=g, requires_grad=True)  # back to (t, k) order
    gather_rows(rows, inverse, order, 1).backward(grad)
    torch.testing.assert_close(rows.grad, torch.zeros_like(grad).index_add_(0, inverse, grad), rtol=0, atol=0)


def test_triton_on_the_cpu_outside_the_interpreter_is_one_clear_error(monkeypatch):
    from dsmoe.errors import UserError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(4, 8)
    with pytest.raises(UserError, match="--moe-impl auto or grouped"):
        resolve_impl("triton", x, torch.randn(2, 6, 8), torch.randn(2, 8, 3))
