"""The chunked output projection + cross-entropy equals its plain reference: value and both gradients, in fp32
and under bf16 autocast, with ignored labels, one token, chunks that do not divide the tokens."""

import pytest
import torch

from dsmoe.train.cross_entropy import IGNORE_INDEX, linear_cross_entropy, linear_cross_entropy_reference


def _inputs(T: int, D: int, V: int, ignore: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 0.3
    labels = torch.randint(0, V, (T,), generator=g)
    labels[torch.rand(T, generator=g) < ignore] = IGNORE_INDEX
    return hidden, weight, labels


def _value_and_grads(fn, hidden, weight, labels, autocast: bool, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(h, w, labels, **kw)
    (loss * 1.7).backward()  # an upstream gradient other than 1
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("T,D,V,chunk,ignore", [(1, 8, 11, None, 0.0), (37, 16, 53, 8, 0.3), (64, 24, 97, 64, 0.0),
                                                (50, 16, 40, 7, 0.9)])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_chunked_equals_reference(T, D, V, chunk, ignore, autocast):
    hidden, weight, labels = _inputs(T, D, V, ignore)
    if (labels == IGNORE_INDEX).all():
        labels[0] = 3
    ref = _value_and_grads(linear_cross_entropy_reference, hidden, weight, labels, autocast)
    got = _value_and_grads(linear_cross_entropy, hidden, weight, labels, autocast, chunk_tokens=chunk)
    # bf16: the GEMMs round to bf16 in both; they differ in where (per chunk vs whole) -> bf16-level tolerance
    tol = dict(atol=1e-5, rtol=1e-5) if not autocast else dict(atol=2e-2, rtol=2e-2)
    for name, r, g in zip(("loss", "grad hidden", "grad weight"), ref, got):
        assert g.dtype == r.dtype, name
        torch.testing.assert_close(g, r, **tol, msg=name)
    assert ref[0] > 0 and ref[1].abs().sum() > 0 and ref[2].abs().sum() > 0


def test_ignored_rows_get_no_gradient_and_all_ignored_gives_zero():
    hidden, weight, labels = _inputs(10, 8, 13, 0.0)
    labels[3:7] = IGNORE_INDEX
    _, grad_h, _ = _value_and_grads(linear_cross_entropy, hidden, weight, labels, False, chunk_tokens=4)
    assert (grad_h[3:7] == 0).all() and (grad_h[:3] != 0).any()
    loss, grad_h, grad_w = _value_and_grads(linear_cross_entropy, hidden, weight, torch.full_like(labels, -100),
                                            False)
    assert loss.item() == 0.0 and not grad_h.any() and not grad_w.any()


def test_bf16_weights_without_autocast():
    hidden, weight, labels = _inputs(33, 16, 29, 0.1)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    ref = _value_and_grads(linear_cross_entropy_reference, hidden, weight, labels, False)
    got = _value_and_grads(linear_cross_entropy, hidden, weight, labels, False, chunk_tokens=10)
    for r, g in zip(ref, got):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g.float(), r.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_chunked_equals_reference_on_the_gpu_at_a_real_vocabulary():
    """bf16 autocast on CUDA at the `small` preset's vocabulary, several chunks (CHUNK_ELEMENTS / 32000 tokens)."""
    hidden, weight, labels = _inputs(5000, 256, 32000, 0.05)
    hidden, weight, labels = hidden.cuda(), weight.cuda() * 0.1, labels.cuda()

    def run(fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(h, w, labels)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    for name, r, g in zip(("loss", "grad hidden", "grad weight"), run(linear_cross_entropy_reference),
                          run(linear_cross_entropy)):
        torch.testing.assert_close(g, r, atol=2e-2, rtol=2e-2, msg=name)
