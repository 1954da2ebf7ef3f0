"""Sampler invariants: greedy = argmax, top-k / top-p support, draws follow softmax(logits / T), seeded draws
repeat and do not depend on the batch row, repetition penalty, logprobs."""

import math

import pytest
import torch

from dsmoe.errors import UserError
from dsmoe.infer.sampling import SamplingParams, apply_repetition_penalty, gumbel_noise, sample, token_logprobs

pytestmark = pytest.mark.usefixtures("single_thread")

V = 12


def draw(logits, *, temperature=1.0, top_k=0, top_p=1.0, seeds=None, positions=None, filtered=None):
    B = logits.shape[0]
    seeds = torch.arange(B) if seeds is None else seeds
    positions = torch.zeros(B, dtype=torch.long) if positions is None else positions
    t = torch.full((B,), float(temperature))
    return sample(logits, t, torch.full((B,), top_k), torch.full((B,), float(top_p)), seeds, positions,
                  any_random=temperature > 0, any_filtered=(top_k > 0 or top_p < 1) if filtered is None else filtered)


def test_greedy_is_argmax():
    logits = torch.randn(7, V)
    assert torch.equal(draw(logits, temperature=0), logits.argmax(-1))
    # greedy rows stay greedy beside sampled rows
    t = torch.tensor([0.0, 1.0] * 3 + [0.0])
    zeros = torch.zeros(7, dtype=torch.long)
    out = sample(logits, t, zeros, torch.ones(7), torch.arange(7), zeros, any_random=True, any_filtered=False)
    assert torch.equal(out[t == 0], logits.argmax(-1)[t == 0])


def test_top_k_and_top_p_support():
    torch.manual_seed(0)
    logits = torch.randn(1, V).expand(2000, V).contiguous()
    order = logits[0].argsort(descending=True)
    got = draw(logits, top_k=3, seeds=torch.arange(2000))
    assert set(got.tolist()) == set(order[:3].tolist())  # only the top 3, and all of them appear
    probs = logits[0].softmax(-1)[order]
    nucleus = int((probs.cumsum(0) < 0.6).sum()) + 1  # smallest prefix whose mass reaches 0.6
    got = draw(logits, top_p=0.6, seeds=torch.arange(2000))
    assert set(got.tolist()) == set(order[:nucleus].tolist())
    got = draw(logits, top_k=2, top_p=0.999, seeds=torch.arange(2000))  # top-p after top-k
    assert set(got.tolist()) == set(order[:2].tolist())


def test_draws_follow_the_tempered_softmax():
    torch.manual_seed(1)
    logits = torch.randn(1, V) * 2
    n = 20000
    for temperature in (1.0, 0.5):
        got = draw(logits.expand(n, V).contiguous(), temperature=temperature, seeds=torch.full((n,), 7),
                   positions=torch.arange(n))
        freq = torch.bincount(got, minlength=V).float() / n
        expected = (logits[0] / temperature).softmax(-1)
        assert (freq - expected).abs().max() < 4 * math.sqrt(0.25 / n)


def test_seeded_draws_repeat_and_ignore_the_row():
    logits = torch.randn(1, 50).expand(64, 50).contiguous()
    seeds, positions = torch.randint(0, 2**62, (64,)), torch.randint(0, 1000, (64,))
    a = draw(logits, seeds=seeds, positions=positions)
    perm = torch.randperm(64)
    b = draw(logits[perm], seeds=seeds[perm], positions=positions[perm])
    assert torch.equal(a[perm], b)
    assert len(set(a.tolist())) > 10  # different (seed, position) pairs give different draws
    noise = gumbel_noise(seeds, positions, 50)
    assert torch.isfinite(noise).all() and torch.equal(noise, gumbel_noise(seeds, positions, 50))


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_token_logprobs_match_log_softmax():
    logits = torch.randn(3, V)
    tokens = logits.argmax(-1)
    chosen, top_ids, top_lps = token_logprobs(logits, tokens, 2)
    ref = logits.log_softmax(-1)
    torch.testing.assert_close(chosen, ref.gather(1, tokens[:, None])[:, 0])
    assert torch.equal(top_ids[:, 0], tokens) and torch.equal(top_lps[:, 0], chosen)  # == exactly (lm-eval)
    assert (top_lps[:, 0] >= top_lps[:, 1]).all()


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0.0),
                                 dict(top_k=-1), dict(max_new_tokens=-1), dict(repetition_penalty=0.0),
                                 dict(logprobs=21)])
def test_invalid_parameters_are_user_errors(bad):
    with pytest.raises(UserError, match=next(iter(bad))):
        SamplingParams(**bad)
