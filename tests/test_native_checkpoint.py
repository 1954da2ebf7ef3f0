"""Training checkpoints: exact round trip of model, optimizer and RNG states; atomic saves; keep-last-K."""

import random

import numpy as np
import pytest
import torch

from dsmoe.checkpoint import native
from dsmoe.config import PRESETS
from dsmoe.errors import UserError
from dsmoe.model.transformer import build_model

CFG = PRESETS["tiny"].replace(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                              num_hidden_layers=2, num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                              n_group=2, topk_group=1, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                              v_head_dim=8)


def trained_pair(seed=0, steps=2):
    torch.manual_seed(seed)
    model = build_model(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(steps):
        model(torch.randint(0, 64, (2, 8))).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    model.update_expert_bias(torch.arange(8).view(2, 4), 0.01)  # a non-zero aux-free bias to carry over
    return model, opt


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    model, opt = trained_pair()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = native.save_checkpoint(tmp_path, 7, model, opt, {"tokens_seen": 99})
    expected = (random.random(), np.random.rand(), torch.rand(()))

    fresh, fresh_opt = trained_pair(seed=5, steps=1)
    state = native.load_checkpoint(path, fresh, fresh_opt)
    assert state["step"] == 7 and state["tokens_seen"] == 99
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(value, fresh_opt.state[q][key]), key
    assert fresh_opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert (random.random(), np.random.rand(), torch.rand(())) == expected
    # the next optimizer step is identical too
    x = torch.randint(0, 64, (2, 8))
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m(x).float().square().mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    assert native.load_model(path).state_dict().keys() == model.state_dict().keys()


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = trained_pair()
    native.save_checkpoint(tmp_path, 10, model, opt, {})
    real_save = native.save_file

    def crash_on_optimizer(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)  # a real partial write, then the crash
        if "optimizer" in str(path):
            raise OSError("disk full")

    monkeypatch.setattr(native, "save_file", crash_on_optimizer)
    with pytest.raises(OSError, match="disk full"):
        native.save_checkpoint(tmp_path, 20, model, opt, {})
    monkeypatch.undo()
    assert native.latest_checkpoint(tmp_path).name == "step_10"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10"]  # no partial step_20, no temporary folder
    fresh, fresh_opt = trained_pair(seed=9, steps=1)
    assert native.load_checkpoint(tmp_path / "step_10", fresh, fresh_opt)["step"] == 10


def test_keep_last_k_and_resaving_a_step(tmp_path):
    model, opt = trained_pair(steps=1)
    for step in (1, 2, 3, 10):
        native.save_checkpoint(tmp_path, step, model, opt, {}, keep=2)
    assert [p.name for p in native.list_checkpoints(tmp_path)] == ["step_3", "step_10"]  # numeric order
    native.save_checkpoint(tmp_path, 10, model, opt, {"again": True}, keep=2)
    assert native.read_state(tmp_path / "step_10")["again"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_3"]


def test_not_a_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "state.json").write_text('{"format": "something else"}')
    with pytest.raises(UserError, match="not a dsmoe training checkpoint"):
        native.read_state(tmp_path)
