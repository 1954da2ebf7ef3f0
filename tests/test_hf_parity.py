"""Parity with transformers' DeepseekV2/V3ForCausalLM on tiny random models, fp32, both directions:
transformers save_pretrained -> dsmoe load_pretrained, and dsmoe save_pretrained -> transformers from_pretrained.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM,  # noqa: E402
                          DeepseekV3Config, DeepseekV3ForCausalLM)

from dsmoe import load_pretrained, save_pretrained  # noqa: E402

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 32,
        "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}
BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, first_k_dense_replace=1,
            kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            max_position_embeddings=512, tie_word_embeddings=False)

CASES = {
    "v2_greedy": (DeepseekV2Config, DeepseekV2ForCausalLM,
                  dict(n_routed_experts=8, num_experts_per_tok=2, topk_method="greedy")),
    "v2_group_limited_scaled": (DeepseekV2Config, DeepseekV2ForCausalLM,
                                dict(n_routed_experts=16, num_experts_per_tok=3, topk_method="group_limited_greedy",
                                     n_group=4, topk_group=2, routed_scaling_factor=16.0, q_lora_rank=24)),
    "v2_lite_yarn": (DeepseekV2Config, DeepseekV2ForCausalLM,
                     dict(n_routed_experts=8, num_experts_per_tok=2, rope_parameters=YARN)),
    "v3_noaux_groups_bias": (DeepseekV3Config, DeepseekV3ForCausalLM,
                             dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                                  routed_scaling_factor=2.5, q_lora_rank=24)),
    "v3_yarn_dense2": (DeepseekV3Config, DeepseekV3ForCausalLM,
                       dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                            first_k_dense_replace=2, num_hidden_layers=4, rope_parameters={**YARN, "mscale": 1.0,
                                                                                           "mscale_all_dim": 1.0})),
}


def make_hf_model(name: str):
    config_cls, model_cls, extra = CASES[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**BASE, **extra})).eval()
    with torch.no_grad():
        # Larger weights than transformers' init so routing is decisive and logits are O(1).
        for n, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3)  # a nonzero bias that changes which experts are selected
    return model


def assert_logits_close(reference: torch.Tensor, ours: torch.Tensor) -> None:
    scale = reference.abs().max().item()
    assert scale > 0.5, "degenerate logits would make this test meaningless"
    diff = (reference - ours).abs().max().item()
    assert diff <= 1e-4 * max(1.0, scale), f"max abs diff {diff} for logits of scale {scale}"


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_to_dsmoe_and_back(case, tmp_path):
    hf_model = make_hf_model(case)
    hf_model.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, BASE["vocab_size"], (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(ids).logits

    ours = load_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert_logits_close(expected, ours(ids))

    save_pretrained(ours, tmp_path / "ours", max_shard_size="60KB")
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    hub_keys = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.2.mlp.experts.0.gate_proj.weight" in hub_keys  # per-expert hub layout
    reloaded = type(hf_model).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert_logits_close(expected, reloaded(ids).logits)


def test_routing_is_exercised_by_the_cases():
    """The group-limited and biased cases must actually change the selected experts versus plain top-k,
    otherwise the parity tests above would not cover those code paths."""
    from dsmoe.model.router import route

    torch.manual_seed(0)
    logits = torch.randn(64, 16) * 3
    bias = torch.randn(16) * 0.3
    plain = route(logits, top_k=4, scoring_func="sigmoid", topk_method="greedy").topk_idx_TK
    grouped = route(logits, top_k=4, scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
                    bias_E=bias).topk_idx_TK
    assert (plain.sort(-1).values != grouped.sort(-1).values).any()
