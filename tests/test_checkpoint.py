"""Hub-layout load/save: FP8 dequantisation, shards, MTP layers, fused expert keys, bad inputs."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsmoe import load_pretrained, save_pretrained
from dsmoe.checkpoint.hf import CheckpointError
from dsmoe.kernels.quant import dequantize
from dsmoe.config import ConfigError
from dsmoe.presets import PRESETS
from dsmoe.model.transformer import Transformer, build_model

CFG = PRESETS["tiny"].replace(vocab_size=96, hidden_size=136, intermediate_size=200, moe_intermediate_size=72,
                              num_hidden_layers=2, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                              topk_group=1, kv_lora_rank=40, q_lora_rank=48)
NOT_QUANTIZED = ("embed_tokens", "lm_head", "norm", "layernorm", "mlp.gate.weight", "correction_bias")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(CFG).eval()


def logits(m, seed=0):
    ids = torch.randint(0, CFG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return m(ids)


def test_sharded_round_trip_is_bit_exact(model, tmp_path):
    save_pretrained(model, tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not list(tmp_path.glob(".*.tmp*"))  # atomic writes leave no temporary files
    loaded = load_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # Saving again unsharded removes the old shards and index
    save_pretrained(loaded, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def quantize_fp8(w, block=128):
    rows, cols = w.shape
    sr, sc = -(-rows // block), -(-cols // block)
    scale = torch.zeros(sr, sc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(sr):
        for j in range(sc):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = tile.abs().max().clamp_min(1e-12) / 448
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_block_checkpoint_is_dequantised(model, tmp_path):
    save_pretrained(model, tmp_path / "bf")
    tensors = load_file(tmp_path / "bf" / "model.safetensors")
    fp8, expected = {}, {}
    for key, t in tensors.items():
        if t.dim() == 2 and not any(s in key for s in NOT_QUANTIZED):
            q, s = quantize_fp8(t)
            fp8[key], fp8[key + "_scale_inv"] = q, s
            scale = s.repeat_interleave(128, 0)[:t.shape[0]].repeat_interleave(128, 1)[:, :t.shape[1]]
            expected[key] = q.float() * scale
        else:
            fp8[key] = t
    assert any(t.shape[0] > 128 and t.shape[1] > 128 for t in expected.values())  # partial edge blocks covered
    out = tmp_path / "fp8"
    out.mkdir()
    save_file(fp8, out / "model.safetensors")
    config = json.loads((tmp_path / "bf" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                     "activation_scheme": "dynamic"}
    (out / "config.json").write_text(json.dumps(config))

    loaded = load_pretrained(out, dtype=torch.float32)
    layer = loaded.layers[1]
    torch.testing.assert_close(layer.self_attn.kv_b_proj.weight, expected["model.layers.1.self_attn.kv_b_proj.weight"])
    torch.testing.assert_close(layer.mlp.experts.down_proj[3],
                               expected["model.layers.1.mlp.experts.3.down_proj.weight"])
    assert load_pretrained(out).embed_tokens.weight.dtype == torch.bfloat16  # FP8 checkpoints load as bf16
    # the dequantised model is close to the original (fp8 keeps ~2 significant digits)
    a, b = logits(model), logits(loaded)
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_dequantize_matches_formula():
    w = torch.randn(130, 260)
    q, s = quantize_fp8(w)
    out = dequantize(q, s)
    assert out[129, 259] == q[129, 259].float() * s[1, 2]


def test_mtp_layers_are_skipped_with_a_log_line(model, tmp_path, caplog):
    save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(CFG.hidden_size, 2 * CFG.hidden_size)
    tensors["model.layers.2.enorm.weight"] = torch.ones(CFG.hidden_size)
    save_file(tensors, tmp_path / "model.safetensors")
    with caplog.at_level(logging.INFO):
        loaded = load_pretrained(tmp_path)
    assert "multi-token-prediction" in caplog.text
    torch.testing.assert_close(logits(loaded), logits(model))


def test_transformers5_fused_expert_keys_are_accepted(model, tmp_path):
    save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for i in CFG.moe_layer_ids:
        p = f"model.layers.{i}.mlp.experts."
        E = CFG.n_routed_experts
        gate_up = torch.stack([torch.cat([tensors.pop(f"{p}{e}.gate_proj.weight"),
                                          tensors.pop(f"{p}{e}.up_proj.weight")]) for e in range(E)])
        tensors[p + "gate_up_proj"] = gate_up
        tensors[p + "down_proj"] = torch.stack([tensors.pop(f"{p}{e}.down_proj.weight") for e in range(E)])
    save_file(tensors, tmp_path / "model.safetensors")
    torch.testing.assert_close(logits(load_pretrained(tmp_path)), logits(model))


def test_meta_construction_allocates_nothing_and_init_has_the_papers_std():
    with torch.device("meta"):
        meta = Transformer(PRESETS["deepseek-v3"])  # 671B parameters: only shapes
    assert all(p.is_meta for p in meta.parameters())
    m = build_model(PRESETS["tiny"])
    w = m.layers[2].mlp.experts.gate_up_proj
    assert w.std().item() == pytest.approx(0.006, rel=0.05)
    assert torch.equal(m.layers[2].input_layernorm.weight, torch.ones(PRESETS["tiny"].hidden_size))


# ---- bad inputs: one clear error naming file and key

def test_unknown_model_type(model, tmp_path):
    save_pretrained(model, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((tmp_path / "config.json").read_text()),
                                                      "model_type": "qwen2_moe"}))
    with pytest.raises(ConfigError, match="qwen2_moe"):
        load_pretrained(tmp_path)


def test_missing_shard(model, tmp_path):
    save_pretrained(model, tmp_path, max_shard_size="200KB")
    sorted(tmp_path.glob("model-00002-of-*.safetensors"))[0].unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-.* is missing"):
        load_pretrained(tmp_path)


def test_wrong_shape_names_file_and_key(model, tmp_path):
    save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError,
                       match=r"model\.safetensors: model\.layers\.1\.self_attn\.o_proj\.weight has shape"):
        load_pretrained(tmp_path)


def test_missing_and_unexpected_keys(model, tmp_path):
    save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        load_pretrained(tmp_path)
    tensors["model.layers.1.mlp.experts.2.up_proj.weight"] = torch.zeros(72, 136)
    tensors["model.layers.0.mlp.mystery.bias"] = torch.zeros(3)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected key model.layers.0.mlp.mystery.bias"):
        load_pretrained(tmp_path)


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny"].to_hf_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="never pickle"):
        load_pretrained(tmp_path)
