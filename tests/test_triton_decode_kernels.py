"""The fused inference kernels (RMSNorm, rotary, MLA decode attention) against their references: fp32 through Triton's CPU interpreter
(tests/conftest.py selects it), bf16 on a GPU, and the dispatch in ops (fused only for inference on CUDA)."""

import pytest
import torch

from dsmoe.kernels import ops
from dsmoe.kernels.reference import mla_decode_attention_reference, rms_norm_reference, rotary_reference
from triton_guard import DEVICE, require_triton

require_triton(module_level=True)
from dsmoe.kernels.triton_norm import rms_norm_triton  # noqa: E402
from dsmoe.kernels.triton_mla_decode import mla_decode_triton  # noqa: E402
from dsmoe.kernels.triton_rotary import rotary_triton  # noqa: E402


def inputs(shape, dtype=torch.float32, weight_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 3).to(DEVICE, dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(DEVICE, weight_dtype or dtype)
    return x, w


@pytest.mark.parametrize("shape", [(1, 16), (3, 5, 37), (4, 300), (2, 1, 64)], ids=str)
def test_fused_rms_norm_matches_the_reference_fp32(shape):
    x, w = inputs(shape)
    out = rms_norm_triton(x, w, 1e-6)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, rms_norm_reference(x, w, 1e-6), atol=1e-6, rtol=1e-5)


def test_fused_rms_norm_takes_strided_rows_and_refuses_a_wrong_weight():
    x, w = inputs((6, 40))
    torch.testing.assert_close(rms_norm_triton(x[::2], w, 1e-5), rms_norm_reference(x[::2], w, 1e-5),
                               atol=1e-6, rtol=1e-5)
    wide, _ = inputs((2, 3, 48))  # MLA's latent: the first 40 of each 48-wide row
    torch.testing.assert_close(rms_norm_triton(wide[..., :40], w, 1e-5), rms_norm_reference(wide[..., :40], w, 1e-5),
                               atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        rms_norm_triton(x, w[:8], 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("D,weight_dtype", [(2048, torch.bfloat16), (7168, torch.bfloat16), (513, torch.float32)])
def test_gpu_bf16_fused_rms_norm_within_one_rounding_of_the_reference(D, weight_dtype):
    x, w = inputs((64, D), torch.bfloat16, weight_dtype)
    ours, ref = rms_norm_triton(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)
    assert ours.dtype == ref.dtype
    exact = rms_norm_reference(x.double(), w.double(), 1e-6)
    # both round the same fp32 value; summation order may move it across one rounding boundary
    assert (ours.double() - ref.double()).abs().max() <= 2 * (ref.double() - exact).abs().max() + 1e-6
    assert (ours != ref).float().mean() < 0.01


@pytest.mark.gpu
def test_gpu_ops_fuses_only_when_no_gradient_is_wanted(monkeypatch):
    import dsmoe.kernels.triton_norm as tn

    calls = []
    monkeypatch.setattr(tn, "rms_norm_triton", lambda *a: calls.append(1) or rms_norm_triton(*a))
    x, w = inputs((4, 64), torch.bfloat16)
    with torch.no_grad():
        ops.rms_norm(x, w.requires_grad_(), 1e-6)
    ops.rms_norm(x, w, 1e-6).float().sum().backward()  # training: the reference, with its gradient
    assert calls == [1] and w.grad is not None


def rotary_inputs(B, H, S, R, per_row: bool, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(B, S, H, R + 16, generator=g).to(DEVICE, dtype)
    x = wide[..., 16:].transpose(1, 2)  # as attention makes it: a last-dim slice of (B, S, H, .), heads second
    angles = torch.rand(*((B, S) if per_row else (S,)), R // 2, generator=g) * 6
    return x, angles.cos().to(DEVICE), angles.sin().to(DEVICE)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("B,H,S,R,per_row", [(1, 1, 1, 8, False), (2, 3, 5, 8, True), (3, 1, 2, 64, False)],
                         ids=str)
def test_fused_rotary_matches_the_reference_fp32(B, H, S, R, per_row, interleaved):
    x, cos, sin = rotary_inputs(B, H, S, R, per_row)
    out = rotary_triton(x, cos, sin, interleaved)
    torch.testing.assert_close(out, rotary_reference(x, cos, sin, interleaved), atol=1e-6, rtol=1e-6)


def test_fused_rotary_broadcasts_one_row_of_positions_over_the_batch():
    """transformers' position_ids convention, (1, S): every sequence reads the same cos/sin row."""
    x, cos, sin = rotary_inputs(3, 2, 5, 8, True)
    cos, sin = cos[:1], sin[:1]
    torch.testing.assert_close(rotary_triton(x, cos, sin, False), rotary_reference(x, cos, sin, False),
                               atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        rotary_triton(x[:2], *rotary_inputs(3, 2, 5, 8, True)[1:], False)  # 3 rows of positions for 2 sequences


def test_fused_rotary_refuses_cos_of_another_width():
    x, cos, sin = rotary_inputs(1, 2, 3, 8, False)
    with pytest.raises(ValueError, match="do not fit"):
        rotary_triton(x, cos[:, :2], sin[:, :2], True)


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [True, False])
def test_gpu_bf16_fused_rotary_within_one_rounding_of_the_reference(interleaved):
    x, cos, sin = rotary_inputs(32, 16, 1, 64, True, torch.bfloat16)
    ours, ref = rotary_triton(x, cos, sin, interleaved), rotary_reference(x, cos, sin, interleaved)
    exact = rotary_reference(x.double(), cos.double(), sin.double(), interleaved)
    assert (ours.double() - ref.double()).abs().max() <= 2 * (ref.double() - exact).abs().max() + 1e-6


@pytest.mark.gpu
def test_gpu_ops_rotary_fuses_only_without_gradients(monkeypatch):
    import dsmoe.kernels.triton_rotary as tr

    calls = []
    monkeypatch.setattr(tr, "rotary_triton", lambda *a: calls.append(1) or rotary_triton(*a))
    x, cos, sin = rotary_inputs(2, 4, 3, 16, True)
    with torch.no_grad():
        fused = ops.apply_rotary(x, cos, sin, True)
    plain = ops.apply_rotary(x.requires_grad_(), cos, sin, True)
    assert calls == [1] and plain.grad_fn is not None
    torch.testing.assert_close(fused, plain.detach(), atol=1e-6, rtol=1e-6)


def mla_inputs(B, H, S, C, R, L, positions, dtype=torch.float32, per_draft=True, seed=0):
    """Queries as the absorbed decode makes them (strided views of larger tensors), a strided cache window, and
    the decode mask of each row's positions (S drafts at positions p..p+S-1, or one (B, L) mask)."""
    g = torch.Generator().manual_seed(seed)
    q_lat = torch.randn(H, B, S, C, generator=g).to(DEVICE, dtype).transpose(0, 1)
    q_pe = torch.randn(B, S, H, R + 4, generator=g).to(DEVICE, dtype)[..., 4:].transpose(1, 2)
    cache = torch.randn(B + 1, L + 7, C + R, generator=g).to(DEVICE, dtype)  # slots of a longer cache
    kv = cache[:B, :L]
    first = torch.tensor(positions, device=DEVICE)
    query_positions = first[:, None] + torch.arange(S if per_draft else 1, device=DEVICE)
    hidden = torch.arange(L, device=DEVICE) > query_positions[..., None]
    return q_lat, q_pe, kv, hidden if per_draft else hidden[:, 0], (C + R) ** -0.5


def test_mla_decode_op_schema_and_fake_agree_with_the_kernel():
    """torch.compile plans the decode step with the fake implementation: its shape, dtype and layout must be the
    kernel's (head-major output), and the op must not mutate its inputs."""
    q_lat, q_pe, kv, hidden, scale = mla_inputs(2, 3, 2, 40, 8, 50, [10, 47])
    torch.library.opcheck(torch.ops.dsmoe.mla_decode.default, (q_lat, q_pe, kv, hidden, scale),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("B,H,S,C,R,L,positions,splits", [
    (1, 16, 1, 32, 16, 70, [69], None),  # one row block, positions over several tiles, default splits
    (1, 16, 1, 32, 16, 70, [40], 1),  # one program over every tile: the online softmax, written directly
    (2, 4, 2, 160, 16, 200, [150, 199], 2),  # several tiles in each of two splits, merged 128 columns at a time
    (2, 3, 3, 40, 8, 50, [0, 47], 3),  # drafts, odd widths, a row at its first position, combined splits
    (3, 5, 4, 24, 8, 33, [2, 9, 29], 4),  # rows past 16 (two row blocks), splits holding no visible position
    (2, 9, 4, 24, 8, 40, [5, 30], 1),  # three row blocks, one of them partly filled
    (2, 2, 1, 16, 16, 1, [0, 0], None),  # a cache of one position
], ids=str)
def test_mla_decode_kernel_matches_the_reference_fp32(B, H, S, C, R, L, positions, splits):
    q_lat, q_pe, kv, hidden, scale = mla_inputs(B, H, S, C, R, L, positions)
    out = mla_decode_triton(q_lat, q_pe, kv, hidden, scale, splits=splits)
    assert out.shape == (H, B, S, C) and out.is_contiguous()
    torch.testing.assert_close(out, mla_decode_attention_reference(q_lat, q_pe, kv, hidden, scale),
                               atol=1e-5, rtol=1e-5)


def test_mla_decode_kernel_over_an_empty_cache_gives_zeros():
    q_lat, q_pe, kv, hidden, scale = mla_inputs(2, 2, 1, 16, 16, 0, [0, 0])
    assert torch.equal(mla_decode_triton(q_lat, q_pe, kv, hidden, scale), torch.zeros(2, 2, 1, 16, device=DEVICE))


def test_mla_decode_kernel_reads_one_mask_for_every_draft_and_ignores_hidden_positions():
    q_lat, q_pe, kv, hidden, scale = mla_inputs(2, 4, 2, 32, 16, 40, [10, 30], per_draft=False)
    out = mla_decode_triton(q_lat, q_pe, kv, hidden, scale, splits=2)
    torch.testing.assert_close(out, mla_decode_attention_reference(q_lat, q_pe, kv, hidden, scale),
                               atol=1e-5, rtol=1e-5)
    kv[0, 11:] = float("nan")  # row 0 attends to positions 0..10 only: what lies past them is never read
    torch.testing.assert_close(mla_decode_triton(q_lat, q_pe, kv, hidden, scale, splits=2)[:, :1], out[:, :1])


def test_mla_decode_kernel_refuses_what_does_not_fit_and_reads_a_strided_mask():
    q_lat, q_pe, kv, hidden, scale = mla_inputs(1, 2, 3, 32, 16, 8, [3])
    with pytest.raises(ValueError, match="do not fit"):
        mla_decode_triton(q_lat, q_pe, kv[..., :40], hidden, scale)
    with pytest.raises(ValueError, match="do not fit"):  # 2 mask rows for 3 drafts
        mla_decode_triton(q_lat, q_pe, kv, hidden[:, :2], scale)
    with pytest.raises(ValueError, match="mask is bool"):  # a 0/1 integer mask would be read as bytes
        mla_decode_triton(q_lat, q_pe, kv, hidden.int(), scale)
    strided = hidden.transpose(1, 2).contiguous().transpose(1, 2)  # the same mask, positions not adjacent
    torch.testing.assert_close(mla_decode_triton(q_lat, q_pe, kv, strided, scale),
                               mla_decode_attention_reference(q_lat, q_pe, kv, hidden, scale), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("B,S,L", [(1, 1, 128), (32, 1, 128), (4, 3, 4096)], ids=str)
def test_gpu_bf16_mla_decode_kernel_within_bf16_of_the_reference(B, S, L):
    """V2-Lite's widths (16 heads, C 512, R 64) in bf16, against float64 maths: no further than the reference."""
    q_lat, q_pe, kv, hidden, scale = mla_inputs(B, 16, S, 512, 64, L, [L - S] * B, torch.bfloat16)
    ours, ref = mla_decode_triton(q_lat, q_pe, kv, hidden, scale), \
        mla_decode_attention_reference(q_lat, q_pe, kv, hidden, scale)
    exact = mla_decode_attention_reference(q_lat.double(), q_pe.double(), kv.double(), hidden, scale)
    assert (ours.double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max() + 1e-3


@pytest.mark.gpu
def test_gpu_ops_mla_decode_takes_the_kernel_only_without_gradients(monkeypatch):
    import dsmoe.kernels.triton_mla_decode as tm

    calls = []
    monkeypatch.setattr(tm, "mla_decode_triton", lambda *a: calls.append(1) or mla_decode_triton(*a))
    q_lat, q_pe, kv, hidden, scale = mla_inputs(2, 16, 1, 64, 16, 100, [50, 99], torch.bfloat16)
    with torch.no_grad():
        fused = ops.mla_decode_attention(q_lat, q_pe, kv, hidden, scale)
    compiled = torch.compile(ops.mla_decode_attention, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q_lat, q_pe, kv, hidden, scale), fused)
    assert len(calls) >= 2  # eager, and inside the compiled graph (the custom op runs it)
    seen = len(calls)
    plain = ops.mla_decode_attention(q_lat.requires_grad_(), q_pe, kv, hidden, scale)
    assert plain.grad_fn is not None and len(calls) == seen  # a gradient wanted: the reference, not the kernel
    torch.testing.assert_close(fused, plain.detach(), atol=2e-2, rtol=2e-2)
