"""KV-cached forwards equal the full forward: expanded (chunked) prefill and weight-absorbed MLA decode, for the
DeepSeekMoE 16B (MHA, here with GQA too), V2-Lite, V2 and V3 architectures, in fp32."""

import pytest
import torch

from dsmoe.presets import get_preset
from dsmoe.infer.cache import KVCache
from dsmoe.model.transformer import build_model

pytestmark = pytest.mark.usefixtures("single_thread")

SHRINK = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, max_position_embeddings=128,
              initializer_range=0.05, bos_token_id=0, eos_token_id=1)
MLA = dict(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)
CONFIGS = {
    "16b-mha": get_preset("deepseek-moe-16b").replace(**SHRINK, num_key_value_heads=4),
    "16b-gqa": get_preset("deepseek-moe-16b").replace(**SHRINK, num_key_value_heads=2),
    "v2-lite": get_preset("deepseek-v2-lite").replace(**SHRINK, **MLA),
    "v2": get_preset("deepseek-v2").replace(**SHRINK, **MLA, q_lora_rank=48, n_group=4, topk_group=2),
    "v3": get_preset("deepseek-v3").replace(**SHRINK, **MLA, q_lora_rank=48, n_group=4, topk_group=2,
                                            first_k_dense_replace=1),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_logits_equal_full_forward(name):
    """Two sequences: one prefilled in chunks (3 + 4 tokens), one in one go, into slots 2 and 0 with slot 1
    free (its row writes to the trash position); then decoded together at different positions."""
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = build_model(cfg, dtype=torch.float32).eval()
    ids = torch.randint(cfg.vocab_size, (2, 18))
    prompt_lens, slots, chunks = [7, 4], [2, 0], [[3, 4], [4]]
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.layers, num_slots=3, max_len=24, device="cpu", dtype=torch.float32)
        for b in range(2):
            start = 0
            for n in chunks[b]:
                out = model(ids[b: b + 1, start: start + n], torch.arange(start, start + n),
                            cache=cache.prefill(slots[b], start, n))
                torch.testing.assert_close(out[0], full[b, start: start + n], atol=2e-5, rtol=1e-4)
                start += n
        positions = torch.tensor([prompt_lens[1], cache.trash, prompt_lens[0]])
        for _ in range(10):
            inputs = torch.stack([ids[1, positions[0]], torch.tensor(0), ids[0, positions[2]]])[:, None]
            length = int(max(positions[0], positions[2])) + 1
            out = model(inputs, positions[:, None], cache=cache.decode(positions, length), last_only=True)[:, 0]
            torch.testing.assert_close(out[0], full[1, positions[0]], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(out[2], full[0, positions[2]], atol=2e-5, rtol=1e-4)
            positions = positions + torch.tensor([1, 0, 1])
    assert full.abs().max() > 0.5  # logits are not all ~0: the comparison can fail


def test_absorbed_decode_equals_expanded_attention():
    """The absorption identity on one MLA layer, against explicit expanded K/V attention with a mask."""
    cfg = CONFIGS["v3"]
    torch.manual_seed(1)
    attn = build_model(cfg, dtype=torch.float32).layers[0].self_attn
    B, L, H = 3, 9, cfg.num_attention_heads
    x = torch.randn(B, L, cfg.hidden_size)
    cos, sin = torch.randn(L, cfg.qk_rope_head_dim // 2), torch.randn(L, cfg.qk_rope_head_dim // 2)
    q_nope, q_pe, latent, k_pe = attn.project(x, cos, sin)
    k, v = attn.expand_kv(latent, k_pe)
    positions = torch.tensor([8, 3, 5])  # each row's query is its token at this position
    masked = torch.arange(L)[None, :] > positions[:, None]
    rows = torch.arange(B)
    qn, qp = q_nope[rows, :, positions][:, :, None], q_pe[rows, :, positions][:, :, None]
    kv = torch.cat([latent, k_pe[:, 0]], dim=-1)
    out = attn.absorbed_decode(qn, qp, kv, masked)
    q = torch.cat([qn, qp], dim=-1)
    scores = (q @ k.transpose(-1, -2)) * attn.softmax_scale
    expected = (scores.masked_fill(masked[:, None, None], float("-inf")).softmax(-1) @ v).transpose(1, 2)
    torch.testing.assert_close(out, expected.reshape(B, 1, H * cfg.v_head_dim), atol=1e-5, rtol=1e-5)


def meta_layers(preset: str):
    from dsmoe.model.transformer import Transformer

    with torch.device("meta"):
        return Transformer(get_preset(preset)).layers


def test_cache_stores_what_each_attention_asks_for_per_token():
    cache = KVCache(meta_layers("deepseek-v2-lite"), num_slots=1, max_len=2, device="meta", dtype=torch.bfloat16)
    assert cache.bytes_per_token() == 27 * 576 * 2  # 27 layers of latent 512 + rope key 64: spec section 6.2
    v3 = KVCache(meta_layers("deepseek-v3"), num_slots=1, max_len=2, device="meta", dtype=torch.bfloat16)
    assert v3.bytes_per_token() == 61 * 576 * 2
    mha = KVCache(meta_layers("deepseek-moe-16b"), num_slots=1, max_len=2, device="meta", dtype=torch.bfloat16)
    assert mha.bytes_per_token() == 28 * 2 * 2048 * 2  # K and V, 16 heads x 128, per layer


def test_cache_refuses_tokens_it_cannot_place():
    cfg = CONFIGS["v2-lite"]
    model = build_model(cfg, dtype=torch.float32).eval()
    cache = KVCache(model.layers, num_slots=1, max_len=4, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="exceeds the cache length"):
        cache.prefill(0, 0, 5)
    with pytest.raises(ValueError, match="slot"):
        cache.prefill(1, 0, 1)
    with pytest.raises(ValueError, match="distinct"):
        cache.prefill([0, 0], 0, 1)
    with pytest.raises(ValueError, match="does not fit"):
        cache.decode(torch.zeros(2, dtype=torch.long), 4)
    with pytest.raises(RuntimeError):  # a view for 2 tokens cannot take 3
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache.prefill(0, 0, 2))


@pytest.mark.parametrize("name", ["16b-gqa", "v2-lite"])
def test_several_tokens_per_row_decode_like_the_full_forward(name):
    """Speculative verification's shape: S = 3 new tokens per row in one decode forward, rows at different
    positions, each token attending to its own prefix only."""
    cfg = CONFIGS[name]
    torch.manual_seed(2)
    model = build_model(cfg, dtype=torch.float32).eval()
    ids = torch.randint(cfg.vocab_size, (2, 12))
    prompt_lens = [6, 4]
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.layers, num_slots=2, max_len=16, device="cpu", dtype=torch.float32)
        for b, n in enumerate(prompt_lens):
            model(ids[b: b + 1, :n], torch.arange(n), cache=cache.prefill(b, 0, n))
        positions = torch.tensor(prompt_lens)[:, None] + torch.arange(3)
        inputs = torch.stack([ids[b, positions[b]] for b in range(2)])
        out = model(inputs, positions, cache=cache.decode(positions, 16))
    for b in range(2):
        torch.testing.assert_close(out[b], full[b, positions[b]], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["16b-gqa", "v2-lite"])
@pytest.mark.parametrize("slots", [[2, 0, 3], [1, 2, 3]], ids=["scattered", "consecutive"])
def test_prefill_of_several_slots_equals_one_by_one(name, slots):
    """Prompts of 5, 1 and 7 tokens right-padded to 7 in one forward, row i into slots[i] (an index tensor, or a
    slice when consecutive): each row's real positions give the full forward's logits and leave the cache
    exactly as prefilling that prompt alone would."""
    cfg = CONFIGS[name]
    torch.manual_seed(3)
    model = build_model(cfg, dtype=torch.float32).eval()
    lengths = [5, 1, 7]
    ids = torch.randint(cfg.vocab_size, (3, 7))
    alone, together = (KVCache(model.layers, num_slots=4, max_len=8, device="cpu", dtype=torch.float32)
                       for _ in range(2))
    with torch.no_grad():
        out = model(ids, torch.arange(7), cache=together.prefill(slots, 0, 7))
        for b, n in enumerate(lengths):
            model(ids[b: b + 1, :n], torch.arange(n), cache=alone.prefill(slots[b], 0, n))
            torch.testing.assert_close(out[b, :n], model(ids[b: b + 1, :n])[0], atol=2e-5, rtol=1e-4)
    for layer_alone, layer_together, dim in zip(alone.layers, together.layers, alone.seq_dims):
        for buf_alone, buf_together in zip(layer_alone, layer_together):
            for slot, n in zip(slots, lengths):
                want, got = (buf[slot].narrow(dim - 1, 0, n) for buf in (buf_alone, buf_together))
                assert want.abs().max() > 0
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
