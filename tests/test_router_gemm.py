"""Router logits from split bf16 GEMMs against the fp32 GEMM they replace (spec: router_logits_reference).

On the CPU `mm_fp32` multiplies the same bf16 parts in fp32, so these tests check the splitting maths;
the cuBLAS call itself is covered by the GPU tests (marked `gpu`)."""

import pytest
import torch

from dsmoe.kernels import ops
from dsmoe.kernels import router_gemm as rg
from dsmoe.kernels.reference import router_logits_reference


def _inputs(T=37, D=96, E=24, weight_dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g).to(device, torch.bfloat16)
    w = (torch.randn(E, D, generator=g) * 0.05).to(device, weight_dtype)
    return x, w


def test_three_bf16_parts_sum_to_the_fp32_tensor():
    t = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 1e-3
    parts = rg.split_bf16(t, 3)
    assert all(p.dtype == torch.bfloat16 for p in parts)
    assert torch.equal(sum(p.float() for p in parts), t)  # exact
    assert not torch.equal(parts[0].float(), t)  # and one part alone is not


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_split_forward_and_gradients_match_the_fp32_gemm(weight_dtype):
    x, w = _inputs(weight_dtype=weight_dtype)
    d_logits = torch.randn(x.shape[0], w.shape[0], generator=torch.Generator().manual_seed(2))
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = router_logits_reference(xr, wr)
    ref.backward(d_logits)
    logits = rg.logits_forward(x, w)
    d_x, d_w = rg.logits_backward(d_logits, x, w)
    assert logits.dtype == torch.float32 and d_x.dtype == x.dtype and d_w.dtype == w.dtype
    torch.testing.assert_close(logits, ref.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(d_w, wr.grad, atol=1e-6, rtol=1e-5)
    # d x is the fp32 product rounded to bf16, like the reference's: at most one bf16 step apart
    ulp = torch.exp2(torch.floor(torch.log2(xr.grad.float().abs().clamp_min(1e-30))) - 7)
    assert ((d_x.float() - xr.grad.float()).abs() <= ulp).all()


@pytest.mark.gpu
def test_gpu_router_takes_the_split_gemm_for_many_bf16_tokens_of_fast_paths_only(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "split_router_logits", lambda x, w: calls.append(x.dtype) or rg.split_router_logits(x, w))
    x, w = _inputs(T=ops.SPLIT_ROUTER_MIN_TOKENS, device="cuda")
    for impl in ("grouped", "triton", "reference"):
        ops.router_logits(x, w, impl)
    ops.router_logits(x.float(), w, "triton")
    assert calls == [torch.bfloat16, torch.bfloat16]  # not for the reference impl, not for fp32 activations
    decode = ops.router_logits(x[:6], w, "triton")  # a decode step's tokens: the fp32 GEMM
    assert len(calls) == 2
    torch.testing.assert_close(decode, router_logits_reference(x[:6], w), atol=0, rtol=0)


@pytest.mark.gpu
def test_gpu_split_logits_match_fp32_and_compile():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x, w = _inputs(T=4096, D=2048, E=256, device="cuda")
    x.requires_grad_()
    w.requires_grad_()
    d_logits = torch.randn(4096, 256, device="cuda")
    ref = router_logits_reference(x.double(), w.double())
    ref.backward(d_logits.double())
    exact = [ref.detach(), x.grad.double(), w.grad.double()]
    x.grad = w.grad = None
    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    for fn in (rg.split_router_logits, torch.compile(rg.split_router_logits, fullgraph=True)):
        out = fn(x, w)
        out.backward(d_logits)
        # fp32 accumulation over D=2048 terms is ~sqrt(D) * 2^-24 = 3e-6 from float64, either way
        assert rel(out, exact[0]) < 1e-5 and rel(router_logits_reference(x, w), exact[0]) < 1e-5
        assert rel(w.grad, exact[2]) < 1e-5
        assert rel(x.grad, exact[1]) < 4e-3  # rounded to bf16
        x.grad = w.grad = None
    bf16_router = torch.nn.functional.linear(x.detach(), w.detach().to(torch.bfloat16))
    assert rel(bf16_router, exact[0]) > 1e-3  # what a bf16 router would lose: the test tells them apart
