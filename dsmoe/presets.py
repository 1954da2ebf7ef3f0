"""Named model shapes (`--preset`): the two that train here (`tiny` on a CPU, `small` on one GPU) and the
published DeepSeek architectures, with their checkpoints' config.json values."""

from __future__ import annotations

from typing import Any

from dsmoe.config import ConfigError, ModelConfig


def _mla_v3_routing(**kw: Any) -> dict[str, Any]:
    return dict(model_type="deepseek_v3", scoring_func="sigmoid", topk_method="noaux_tc",
                norm_topk_prob=True, **kw)


def _trains_here(**kw: Any) -> dict[str, Any]:
    """The presets trained from scratch here: V3's routing, one dense layer first, no query compression, V3's
    sequence-balance weight, routed outputs unscaled."""
    return _mla_v3_routing(first_k_dense_replace=1, q_lora_rank=None, aux_loss_alpha=0.0001,
                           routed_scaling_factor=1.0, **kw)


_YARN_V2 = {"type": "yarn", "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1}
_YARN_V3 = {**_YARN_V2, "mscale": 1.0, "mscale_all_dim": 1.0}  # DeepSeek-V2 (not Lite) and V3

PRESETS: dict[str, ModelConfig] = {
    # Trains on 2 CPU cores in minutes: ~12M params, MLA + V3 aux-free routing over 16 experts.
    "tiny": ModelConfig(**_trains_here(
        vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, n_group=4, topk_group=2, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=1024)),
    # One GPU: ~1.2B total / ~0.2B active, the shape of the training benchmark.
    "small": ModelConfig(**_trains_here(
        vocab_size=32000, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512,
        num_hidden_layers=12, num_attention_heads=16, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, n_group=1, topk_group=1, kv_lora_rank=256,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=4096)),
    "deepseek-moe-16b": ModelConfig(
        model_type="deepseek", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
        scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, router_fp32=False,
        aux_loss_alpha=0.001, kv_lora_rank=None, max_position_embeddings=4096,
        bos_token_id=100000, eos_token_id=100001),
    "deepseek-v2-lite": ModelConfig(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, scoring_func="softmax",
        topk_method="greedy", norm_topk_prob=False, aux_loss_alpha=0.001, q_lora_rank=None,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        rope_scaling=_YARN_V2, max_position_embeddings=163840, bos_token_id=100000, eos_token_id=100001),
    "deepseek-v2": ModelConfig(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
        moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128, n_routed_experts=160,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, scoring_func="softmax",
        topk_method="group_limited_greedy", n_group=8, topk_group=3, norm_topk_prob=False,
        routed_scaling_factor=16.0, aux_loss_alpha=0.003, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        rope_scaling=_YARN_V3,
        max_position_embeddings=163840, bos_token_id=100000, eos_token_id=100001),
    "deepseek-v3": ModelConfig(**_mla_v3_routing(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, first_k_dense_replace=3, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, aux_loss_alpha=0.0001, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_scaling=_YARN_V3,
        max_position_embeddings=163840, num_nextn_predict_layers=1)),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
