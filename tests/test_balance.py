import pytest
import torch

from dsmoe.presets import PRESETS
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


def test_sequence_form_over_packed_rows_averages_per_example():
    """Rows of 6 tokens holding examples of 2+3 tokens (and one pad) and 6 tokens: the loss is the mean of the
    three examples' losses, each computed alone; the pad counts in none."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(12, 5, generator=g).softmax(-1)
    idx = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(12)])
    segments = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    active = (segments >= 0).reshape(-1, 1).expand(12, 2)
    packed = expert_balance_loss(probs, idx, 1.0, seq_len=6, active_TK=active, segment_ids=segments)
    alone = [expert_balance_loss(probs[s], idx[s], 1.0, seq_len=None) for s in (slice(0, 2), slice(2, 5), slice(6, 12))]
    assert packed.item() == pytest.approx(sum(a.item() for a in alone) / 3, rel=1e-6)


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


@pytest.mark.parametrize("seq_aux, device_alpha, comm_alpha", [(False, 0.0, 0.0), (True, 0.0, 0.0),
                                                               (False, 0.3, 0.2)])
def test_padding_is_left_out_of_the_routing_statistics(seq_aux, device_alpha, comm_alpha):
    """A right-padded batch with token_mask: the real tokens' outputs, the expert counts and the balance losses
    equal those of the sequences run alone (padding is computed but never counted)."""
    cfg = PRESETS["tiny"].replace(vocab_size=64, num_hidden_layers=2, aux_loss_alpha=0.1, seq_aux=seq_aux,
                                  device_aux_loss_alpha=device_alpha, comm_aux_loss_alpha=comm_alpha, n_group=2,
                                  topk_group=2)
    torch.manual_seed(0)
    model = build_model(cfg, dtype=torch.float32).train()
    lengths = [5, 8]
    ids = torch.randint(0, 64, (2, 8))
    real = torch.arange(8)[None, :] < torch.tensor(lengths)[:, None]
    padded = model(ids, token_mask=real)
    counts, aux = model.routing_stats()
    alone_counts, alone_aux = [], []
    for row, n in enumerate(lengths):
        alone = model(ids[row:row + 1, :n])
        torch.testing.assert_close(padded[row, :n], alone[0])
        c, a = model.routing_stats()
        alone_counts.append(c)
        alone_aux.append(a)
    assert torch.equal(counts, alone_counts[0] + alone_counts[1])
    assert counts.sum() == sum(lengths) * cfg.num_experts_per_tok
    if seq_aux:  # per sequence, then averaged: the mean of the two sequences' losses
        torch.testing.assert_close(aux, (alone_aux[0] + alone_aux[1]) / 2)
    model(ids[:1, :5], token_mask=torch.ones(1, 5, dtype=torch.bool))  # an all-real mask changes nothing
    torch.testing.assert_close(model.routing_stats()[1], alone_aux[0])


def test_fine_tuning_batches_count_only_their_real_tokens():
    """The SFT loss (next_token_loss with Batch.token_mask) and the classifier pass the padding mask down, so
    the counts behind MaxVio and the aux-free bias update see real tokens only (MTP modules included)."""
    from dsmoe.finetune.classifier import classifier_from_base
    from dsmoe.train.loss import Batch, next_token_loss

    cfg = PRESETS["tiny"].replace(vocab_size=64, num_hidden_layers=2, num_nextn_predict_layers=1)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    ids = torch.randint(0, 64, (2, 8))
    real = torch.arange(8)[None, :] < torch.tensor([[3], [6]])
    next_token_loss(model, Batch(ids, ids, real), mtp_weight=0.3)
    K = cfg.num_experts_per_tok
    main_counts, mtp_counts = (m.expert_counts.sum().item() for m in (model.layers[1].mlp, model.mtp[0].mlp))
    assert main_counts == 9 * K and mtp_counts == (2 + 5) * K  # depth 1 sees token t+1: one fewer per row
    classifier = classifier_from_base(build_model(cfg.replace(num_nextn_predict_layers=0)), ["a", "b"])
    classifier.classify(ids, torch.tensor([3, 6]))
    assert [m.expert_counts.sum().item() for m in classifier.moe_layers()] == [9 * K]
