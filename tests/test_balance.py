import pytest
import torch

from dsmoe.config import PRESETS
from dsmoe.model.balance import (AddAuxiliaryLoss, affinity_probs, communication_balance_loss,
                                 device_balance_loss, expert_balance_loss, max_violation, update_bias)
from dsmoe.model.transformer import build_model


def balanced_routing(T, E, K):
    """Token t picks experts (t*K + j) % E: every expert gets exactly T*K/E picks."""
    idx = (torch.arange(T)[:, None] * K + torch.arange(K)) % E
    return torch.full((T, E), 1.0 / E), idx


@pytest.mark.parametrize("seq_len", [None, 8])
def test_perfect_balance_gives_alpha(seq_len):
    probs, idx = balanced_routing(T=32, E=8, K=2)
    assert expert_balance_loss(probs, idx, alpha=0.01, seq_len=seq_len).item() == pytest.approx(0.01)
    device = torch.arange(8) // 2
    assert device_balance_loss(probs, idx, device, 4, alpha=0.05).item() == pytest.approx(0.05)


def test_hand_computed_imbalance():
    # T=2 tokens, E=2, K=1, both tokens pick expert 0 with probs [0.75, 0.25]:
    # f_0 = E/(K T) * 2 = 2, f_1 = 0; P_0 = 0.75 -> loss = alpha * 2 * 0.75 = 1.5 alpha
    probs = torch.tensor([[0.75, 0.25], [0.75, 0.25]])
    idx = torch.tensor([[0], [0]])
    assert expert_balance_loss(probs, idx, alpha=1.0).item() == pytest.approx(1.5)


def test_sequence_form_averages_per_sequence():
    # sequence 0 all on expert 0, sequence 1 all on expert 1; batch-wise that is balanced, per sequence not
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    idx = torch.tensor([[0], [0], [1], [1]])
    batch = expert_balance_loss(probs, idx, alpha=1.0)
    per_seq = expert_balance_loss(probs, idx, alpha=1.0, seq_len=2)
    assert batch.item() == pytest.approx(1.0)  # f = [1, 1], P = [0.5, 0.5]
    assert per_seq.item() == pytest.approx(1.8)  # each sequence: f = [2, 0], P = [0.9, .1] -> 1.8


def test_communication_loss_counts_a_token_once_per_device():
    probs = torch.full((4, 4), 0.25)
    device = torch.tensor([0, 0, 1, 1])
    idx = torch.tensor([[0, 1]] * 4)  # every token sends both picks to device 0
    # f''_0 = D/(M T) * 4 = 2/(1*4) * 4 = 2 ; P''_0 = 0.5 -> 1.0
    assert communication_balance_loss(probs, idx, device, 2, max_devices=1, alpha=1.0).item() == pytest.approx(1.0)


def test_sigmoid_affinities_are_normalised_over_all_experts():
    s = torch.tensor([[0.2, 0.6, 0.2]])
    torch.testing.assert_close(affinity_probs(s, "sigmoid"), torch.tensor([[0.2, 0.6, 0.2]]))
    torch.testing.assert_close(affinity_probs(s * 2, "sigmoid"), torch.tensor([[0.2, 0.6, 0.2]]))


def test_bias_update_moves_against_the_load():
    bias = torch.zeros(4)
    update_bias(bias, torch.tensor([8, 2, 5, 5]), gamma=0.001)  # mean 5
    torch.testing.assert_close(bias, torch.tensor([-0.001, 0.001, 0.0, 0.0]))


def test_max_violation():
    assert max_violation(torch.tensor([5, 5, 5, 5])).item() == 0
    assert max_violation(torch.tensor([8, 4, 4, 4])).item() == pytest.approx(0.6)


def test_add_auxiliary_loss_feeds_gradient_one():
    x = torch.randn(3, requires_grad=True)
    aux = torch.tensor(0.5, requires_grad=True)
    (AddAuxiliaryLoss.apply(x, aux * 2.0).sum()).backward()
    assert aux.grad.item() == 2.0 and torch.equal(x.grad, torch.ones(3))


def test_model_attaches_aux_loss_to_the_router_gradient():
    cfg = PRESETS["tiny"].replace(vocab_size=64, num_hidden_layers=2, aux_loss_alpha=0.5)
    model = build_model(cfg).train()
    ids = torch.randint(0, 64, (2, 8))
    gate = model.layers[1].mlp.gate.weight

    def router_grad(alpha_on: bool):
        model.zero_grad()
        model.layers[1].mlp.config = cfg.replace(aux_loss_alpha=0.5 if alpha_on else 0.0)
        model(ids).sum().backward()
        return gate.grad.clone()

    with_aux, without = router_grad(True), router_grad(False)
    counts, aux = model.routing_stats()
    assert not torch.allclose(with_aux, without)
    assert counts.shape == (1, cfg.n_routed_experts) and counts.sum() == 2 * 8 * cfg.num_experts_per_tok
