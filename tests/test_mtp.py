"""Multi-token prediction: the modules and their loss against an independent computation, gradients through the
expert paths, training with --mtp-layers, and V3 checkpoints with MTP layers (round trip, transformers)."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dsmoe import load_pretrained, save_pretrained
from dsmoe.presets import PRESETS
from dsmoe.model.mtp import mtp_loss
from dsmoe.model.transformer import build_model

CFG = PRESETS["tiny"].replace(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                              n_group=2, topk_group=1, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                              v_head_dim=16, num_nextn_predict_layers=2)


def make_model(config=CFG, seed=0, moe_impl="auto"):
    torch.manual_seed(seed)
    model = build_model(config, moe_impl=moe_impl)
    with torch.no_grad():  # larger than the papers' init, so the MTP logits are far from uniform
        for name, p in model.named_parameters():
            if p.dim() > 1 and not name.endswith("gate.weight"):
                p.normal_(0, 0.1)
    return model


def reference_mtp_loss(model, ids):
    """Independent of the model's shifted full-length sequences: depth k runs on the truncated sequence whose
    position t pairs h^{k-1}_t with Emb(x_{t+k}), never padded, with the block written out."""
    inputs = ids[:, :-1]
    S = inputs.shape[1]
    h = model(inputs, return_hidden=True)
    losses = []
    for k, module in enumerate(model.mtp, 1):
        n = S - k
        cos, sin = model.rotary(torch.arange(n))
        x = module.eh_proj(torch.cat([module.enorm(model.embed_tokens(inputs[:, k:])), module.hnorm(h[:, :n])], -1))
        h = x + module.self_attn(module.input_layernorm(x), cos, sin)
        h = h + module.mlp(module.post_attention_layernorm(h))
        logits = module.shared_head.norm(h) @ model.lm_head.weight.t()
        losses.append(F.cross_entropy(logits.flatten(0, 1), ids[:, k + 1:].flatten()))
    return sum(losses) / len(losses)


def test_mtp_loss_equals_an_independent_computation():
    model = make_model()
    ids = torch.randint(0, CFG.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    logits, mtp_logits = model(ids[:, :-1], with_mtp=True)
    assert len(mtp_logits) == 2 and all(m.shape == logits.shape for m in mtp_logits)
    torch.testing.assert_close(logits, model(ids[:, :-1]))  # the main model is unchanged by the MTP modules
    ours = mtp_loss(mtp_logits, ids[:, 1:])
    torch.testing.assert_close(ours, reference_mtp_loss(model, ids), rtol=1e-5, atol=1e-5)
    assert ours.item() > 1.0


def test_mtp_loss_ignores_masked_targets_and_rejects_short_sequences():
    logits = [torch.randn(1, 4, 5), torch.randn(1, 4, 5)]
    targets = torch.tensor([[1, 2, -100, 3]])
    expected = (F.cross_entropy(logits[0][0, :3], torch.tensor([2, -100, 3]))
                + F.cross_entropy(logits[1][0, :2], torch.tensor([-100, 3]))) / 2
    torch.testing.assert_close(mtp_loss(logits, targets), expected)
    with pytest.raises(ValueError, match="no target"):
        mtp_loss(logits, targets[:, :2])


def test_self_distilled_mtp_loss_is_the_soft_cross_entropy_against_the_model_ahead():
    """mtp_targets "model": depth k at position t learns the main model's distribution at t+k (which predicts the
    same token), over the positions the token loss counts (ignored labels, other packed segments left out); no
    gradient reaches the teacher; a teacher certain of the text's tokens gives the token loss."""
    g = torch.Generator().manual_seed(0)
    B, S, V = 2, 7, 11
    mtp_logits = [torch.randn(B, S, V, generator=g, requires_grad=True) for _ in range(2)]
    teacher = torch.randn(B, S, V, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, S), generator=g)
    targets[0, 4] = -100
    segments = torch.tensor([[0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1]])
    got = mtp_loss(mtp_logits, targets, segment_ids=segments, teacher_logits=teacher)
    per_depth = []
    for k, logits in enumerate(mtp_logits, 1):
        terms = [-(teacher[b, t + k].softmax(-1) * logits[b, t].log_softmax(-1)).sum()
                 for b in range(B) for t in range(S - k)
                 if targets[b, t + k] != -100 and segments[b, t] == segments[b, t + k]]
        per_depth.append(torch.stack(terms).mean())
    torch.testing.assert_close(got, torch.stack(per_depth).mean())
    got.backward()
    assert teacher.grad is None and all(m.grad is not None for m in mtp_logits)
    certain = torch.full((B, S, V), -1e4).scatter(-1, targets.clamp_min(0)[..., None], 0.0)
    torch.testing.assert_close(mtp_loss(mtp_logits, targets, segment_ids=segments, teacher_logits=certain),
                               mtp_loss(mtp_logits, targets, segment_ids=segments))


@pytest.mark.parametrize("impl", ["grouped", "triton"])
def test_mtp_gradients_match_the_reference_expert_path(impl):
    if impl == "grouped" and not hasattr(F, "grouped_mm"):
        pytest.skip("torch without grouped_mm")
    if impl == "triton":
        pytest.importorskip("triton")
    config = CFG.replace(num_nextn_predict_layers=1)
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    grads = {}
    for which in ("reference", impl):
        model = make_model(config, moe_impl=which)
        logits, mtp_logits = model(ids[:, :-1], with_mtp=True)
        (0.3 * mtp_loss(mtp_logits, ids[:, 1:]) + F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
         ).backward(torch.tensor(1.0))
        grads[which] = {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("mtp.")}
    assert grads["reference"]["mtp.0.eh_proj.weight"].abs().sum() > 0
    for name, g in grads["reference"].items():
        torch.testing.assert_close(grads[impl][name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_mtp_modules_join_the_moe_statistics_and_checkpointing():
    model = make_model()
    assert len(model.moe_layers()) == len(CFG.moe_layer_ids) == 1 + 2  # layer 1 and both MTP blocks
    assert CFG.moe_layer_ids == [1, 2, 3]
    assert model.blocks()[-1] is model.mtp[1]


# ---------------------------------------------------------------- training

def test_training_logs_the_mtp_loss_and_the_run_loads(tmp_path):
    from test_train import micro_config, records
    from dsmoe.train.trainer import Trainer

    run = tmp_path / "run"
    Trainer(micro_config(steps=8, mtp_layers=1, mtp_loss_weight=0.3, activation_checkpointing=True,
                         eval_interval=8, checkpoint_interval=8), run, cache_dir=tmp_path / "cache",
            progress=False).train()
    mtp = records(run, "mtp_loss")
    assert sorted(mtp) == list(range(1, 9)) and mtp[8] < mtp[1]
    assert json.loads((run / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert "model.layers.2.eh_proj.weight" in load_file(run / "model.safetensors")
    assert len(load_pretrained(run).mtp) == 1


# ---------------------------------------------------------------- checkpoints

def test_round_trip_with_mtp_layers_is_bit_exact_in_the_v3_layout(tmp_path):
    model = make_model()
    save_pretrained(model, tmp_path)
    keys = load_file(tmp_path / "model.safetensors")
    for k in (2, 3):  # the MTP modules are layers num_hidden_layers + k
        for name in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "self_attn.kv_a_proj_with_mqa",
                     "mlp.gate", "mlp.experts.3.down_proj", "input_layernorm"):
            assert f"model.layers.{k}.{name}.weight" in keys, (k, name)
        assert torch.equal(keys[f"model.layers.{k}.embed_tokens.weight"], keys["model.embed_tokens.weight"])
        assert torch.equal(keys[f"model.layers.{k}.shared_head.head.weight"], keys["lm_head.weight"])
    loaded = load_pretrained(tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_transformers_loads_a_folder_with_mtp_layers_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = make_model().eval()
    save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, CFG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-4)
    # and the other way: transformers writes no MTP layers, so dsmoe loads its folder without them
    hf.save_pretrained(tmp_path / "from_hf")
    again = load_pretrained(tmp_path / "from_hf")
    assert len(again.mtp) == 0
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_two_ranks_expert_parallel_train_mtp_as_one_process(tmp_path):
    """torchrun's path (FSDP2 + EP 2 on gloo) with an MTP module: the same lm and MTP losses as one process."""
    from test_train_distributed import CONFIG, SHAKESPEARE, _train_two_ranks, records

    from dsmoe.distributed.testing import run_distributed
    from dsmoe.train.config import TrainConfig
    from dsmoe.train.trainer import Trainer

    data = tmp_path / "data.txt"
    data.write_text(open(SHAKESPEARE).read()[:30_000])
    config = {**CONFIG, "data": [str(data)], "steps": 2, "eval_interval": 2, "checkpoint_interval": 2,
              "mtp_layers": 1}
    run_distributed(_train_two_ranks, 2, config, str(tmp_path / "run"), str(tmp_path / "cache"), None, False)
    reference = Trainer(TrainConfig(**{**config, "grad_accum": 2}), tmp_path / "reference",
                        cache_dir=tmp_path / "cache", progress=False)
    reference.train()
    for key in ("lm_loss", "mtp_loss"):
        assert records(tmp_path / "run", key) == pytest.approx(records(tmp_path / "reference", key), rel=1e-5), key
    assert len(load_pretrained(tmp_path / "run").mtp) == 1
