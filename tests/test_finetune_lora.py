"""LoRA: exact start, merge, per-expert factors through every expert path, and PEFT's format."""

import pytest
import torch

from dsmoe.finetune.lora import ALL_TARGETS, LoRASpec, apply_lora, lora_factors, merge_lora
from dsmoe.kernels import ops
from dsmoe.model.transformer import build_model
from triton_guard import require_triton

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def tiny_model(tiny_config):
    def build(seed=0, **changes):
        torch.manual_seed(seed)
        return build_model(tiny_config(64).replace(**changes), dtype=torch.float32)
    return build


def randomize_factors(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, delta in lora_factors(model):
            delta.lora_B.copy_(torch.randn(delta.lora_B.shape, generator=g) * 0.2)


IDS = torch.randint(2, 64, (2, 13), generator=torch.Generator().manual_seed(3))


def test_zero_initialised_lora_leaves_logits_unchanged_and_trains_only_factors(tiny_model):
    model = tiny_model().eval()
    with torch.no_grad():
        before = model(IDS)
    adapted = apply_lora(model, LoRASpec(rank=4, alpha=8, targets=ALL_TARGETS))
    assert any(p.endswith("mlp.experts.gate_up_proj") for p in adapted)
    assert any(p.endswith("self_attn.kv_b_proj.weight") for p in adapted)
    assert any(p.endswith("shared_experts.down_proj.weight") for p in adapted)
    with torch.no_grad():
        assert torch.equal(model(IDS), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapted_originals = {n for n in trainable if n.endswith(".original")}
    assert not adapted_originals, "adapted base weights must be frozen"


def test_merged_equals_unmerged_and_nonzero_factors_change_the_output(tiny_model):
    model = tiny_model().eval()
    with torch.no_grad():
        base = model(IDS)
    apply_lora(model, LoRASpec(rank=3, alpha=6, targets=ALL_TARGETS))
    randomize_factors(model)
    with torch.no_grad():
        unmerged = model(IDS)
        assert (unmerged - base).abs().max() > 1e-2  # the test could not fail with inert factors
        merge_lora(model)
        merged = model(IDS)
    assert not list(lora_factors(model))
    assert all(not n.endswith(".original") for n in model.state_dict())
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_expert_delta_is_per_expert_in_expert_major_factors(tiny_model):
    model = tiny_model()
    apply_lora(model, LoRASpec(rank=2, alpha=2, targets=("experts",)))
    randomize_factors(model)
    experts = model.moe_layers()[0].experts
    delta = experts.parametrizations.gate_up_proj[0]
    E, r = delta.num_experts, delta.rank
    for e in (0, E - 1):  # expert e: A rows e*r..(e+1)*r, B columns e*r..(e+1)*r (PEFT's files: e, e+E, ...)
        A = delta.lora_A[e * r:(e + 1) * r]
        B = delta.lora_B[:, e * r:(e + 1) * r]
        torch.testing.assert_close(delta.delta()[e], B @ A * delta.scaling)


def _expert_grads(impl, x, idx, w, gate_up, down, factors):
    from dsmoe.finetune.lora import LoRADelta

    params = [t.clone().requires_grad_(True) for t in factors]
    d_gu, d_down = LoRADelta(gate_up, 2, 1.5), LoRADelta(down, 2, 1.5)
    with torch.no_grad():
        for d, (a, b) in zip((d_gu, d_down), (params[:2], params[2:])):
            d.lora_A.copy_(a)
            d.lora_B.copy_(b)
    x = x.clone().requires_grad_(True)
    y = ops.moe_experts(x, idx, w, d_gu(gate_up), d_down(down), impl)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)))
    return y, [x.grad, d_gu.lora_A.grad, d_gu.lora_B.grad, d_down.lora_A.grad, d_down.lora_B.grad]


@pytest.mark.parametrize("impl", ["grouped", "triton"])
def test_expert_lora_gradients_match_the_reference_path(impl):
    if impl == "triton":
        require_triton()
    g = torch.Generator().manual_seed(0)
    T, D, F, E, K, r = 7, 16, 8, 5, 2, 2
    x = torch.randn(T, D, generator=g)
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(T)])  # expert E-1 gets no token
    w = torch.rand(T, K, generator=g)
    gate_up, down = torch.randn(E, 2 * F, D, generator=g) * 0.3, torch.randn(E, D, F, generator=g) * 0.3
    factors = [torch.randn(E * r, D, generator=g), torch.randn(2 * F, E * r, generator=g),
               torch.randn(E * r, F, generator=g), torch.randn(D, E * r, generator=g)]
    y_ref, g_ref = _expert_grads("reference", x, idx, w, gate_up, down, factors)
    y, grads = _expert_grads(impl, x, idx, w, gate_up, down, factors)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, g_ref):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert g_ref[1].view(E, r, D)[E - 1].abs().max() == 0  # no token, no gradient for that expert's factors


def test_bad_targets_are_one_clear_error():
    from dsmoe.errors import UserError

    with pytest.raises(UserError, match="--lora-targets 'routers'"):
        LoRASpec.parse(4, None, ["routers"])
    with pytest.raises(UserError, match="--lora-rank 0"):
        LoRASpec.parse(0, None, None)
