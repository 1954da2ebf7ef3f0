"""The DeepSeekMoE 16B path (model_type "deepseek": MHA, Llama-style RoPE halves, softmax top-k in the model
dtype, no renormalisation, no scaling, merged shared experts).

transformers has no class for this model (the hub ships remote code), so the reference here is written
independently from the spec's formulas (deepseek_arch.md sections 2, 4.1, 6.1), reading the weights
straight from a hub-layout safetensors file with per-expert keys.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dsmoe import load_pretrained
from dsmoe.config import ModelConfig

HUB_CONFIG = {
    "model_type": "deepseek", "architectures": ["DeepseekForCausalLM"], "vocab_size": 97, "hidden_size": 48,
    "intermediate_size": 80, "moe_intermediate_size": 24, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 4, "n_routed_experts": 6, "n_shared_experts": 2, "num_experts_per_tok": 2,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": False, "scoring_func": "softmax",
    "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
    "bos_token_id": 100000, "eos_token_id": 100001, "tie_word_embeddings": False, "torch_dtype": "float32",
}


def write_hub_checkpoint(path, cfg=HUB_CONFIG, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, f, fe, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["moe_intermediate_size"], cfg["num_hidden_layers"]
    fs = fe * cfg["n_shared_experts"]

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    t = {"model.embed_tokens.weight": w(cfg["vocab_size"], d), "model.norm.weight": 1 + w(d),
         "lm_head.weight": w(cfg["vocab_size"], d)}
    for i in range(L):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + w(d)
        t[p + "post_attention_layernorm.weight"] = 1 + w(d)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{name}.weight"] = w(d, d)
        if i < cfg["first_k_dense_replace"]:
            t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = w(f, d), w(f, d)
            t[p + "mlp.down_proj.weight"] = w(d, f)
            continue
        t[p + "mlp.gate.weight"] = w(cfg["n_routed_experts"], d) * 5
        for e in range(cfg["n_routed_experts"]):
            t[p + f"mlp.experts.{e}.gate_proj.weight"], t[p + f"mlp.experts.{e}.up_proj.weight"] = w(fe, d), w(fe, d)
            t[p + f"mlp.experts.{e}.down_proj.weight"] = w(d, fe)
        t[p + "mlp.shared_experts.gate_proj.weight"], t[p + "mlp.shared_experts.up_proj.weight"] = w(fs, d), w(fs, d)
        t[p + "mlp.shared_experts.down_proj.weight"] = w(d, fs)
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(cfg))
    return t


def reference_forward(t, cfg, ids):
    """The spec, written out: pre-norm blocks, MHA with rotate_half RoPE, V1 MoE gate."""
    d, H = cfg["hidden_size"], cfg["num_attention_heads"]
    hd, eps, K = d // H, cfg["rms_norm_eps"], cfg["num_experts_per_tok"]
    B, S = ids.shape

    def rms(x, wt):
        return wt * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def swiglu(x, p):
        return F.silu(x @ t[p + "gate_proj.weight"].T) * (x @ t[p + "up_proj.weight"].T) @ t[p + "down_proj.weight"].T

    inv_freq = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(S).float()[:, None] * inv_freq
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x):  # Llama rotate_half: dim i pairs with dim i + hd/2
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = t["model.embed_tokens.weight"][ids]
    mask = torch.full((S, S), float("-inf")).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, t[p + "input_layernorm.weight"])
        q, k, v = (( h @ t[p + f"self_attn.{n}_proj.weight"].T).view(B, S, H, hd).transpose(1, 2) for n in "qkv")
        att = (rope(q) @ rope(k).transpose(-1, -2)) / math.sqrt(hd) + mask
        o = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, S, d)
        x = x + o @ t[p + "self_attn.o_proj.weight"].T
        h = rms(x, t[p + "post_attention_layernorm.weight"])
        if i < cfg["first_k_dense_replace"]:
            x = x + swiglu(h, p + "mlp.")
            continue
        scores = (h @ t[p + "mlp.gate.weight"].T).softmax(-1)
        w, idx = scores.topk(K, dim=-1)  # no renormalisation, no scaling in V1
        routed = torch.zeros_like(h)
        for b in range(B):
            for s in range(S):
                for j in range(K):
                    e = int(idx[b, s, j])
                    routed[b, s] += w[b, s, j] * swiglu(h[b, s], p + f"mlp.experts.{e}.")
        x = x + routed + swiglu(h, p + "mlp.shared_experts.")
    return rms(x, t["model.norm.weight"]) @ t["lm_head.weight"].T


def test_16b_config_maps_to_mha_v1_routing():
    c = ModelConfig.from_hf_dict(HUB_CONFIG)
    assert not c.use_mla and not c.router_fp32 and not c.rope_interleaved
    assert (c.scoring_func, c.topk_method, c.norm_topk_prob, c.routed_scaling_factor) == (
        "softmax", "greedy", False, 1.0)


@pytest.mark.parametrize("impl", ["reference", "grouped"])
def test_16b_logits_match_the_spec_reference(tmp_path, impl):
    write_hub_checkpoint(tmp_path)  # per-expert hub keys, which load_pretrained stacks
    model = load_pretrained(tmp_path, moe_impl=impl).eval()
    ids = torch.randint(0, HUB_CONFIG["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference_forward(load_file(tmp_path / "model.safetensors"), HUB_CONFIG, ids)
        ours = model(ids)
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_16b_router_runs_in_model_dtype(tmp_path):
    """V1's hub code computes the gate logits in the model dtype (bf16), unlike V2/V3 (fp32)."""
    write_hub_checkpoint(tmp_path)
    model = load_pretrained(tmp_path, dtype=torch.bfloat16)
    gate = model.layers[1].mlp.gate
    x = torch.randn(5, HUB_CONFIG["hidden_size"]).bfloat16()
    expected = F.linear(x, gate.weight.bfloat16()).softmax(-1, dtype=torch.float32)
    torch.testing.assert_close(gate(x).scores_TE, expected)
