"""Likelihood of chosen tokens of token sequences, batched: the one scoring path of classification by
verbalisers, chat loss and the lm-eval model.

Requests are sorted by length (longest first) so a batch holds sequences of similar length and little
padding; each batch is right-padded (causal attention: padding after a sequence cannot change its logits,
and MoE routing is per token) and its log-softmax is taken in fp32. Results come back in request order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScoreRequest:
    ids: list[int]  # the whole sequence
    first: int  # score the tokens ids[first:] (each given the ones before it); >= 1
    mask: tuple[bool, ...] | None = None  # optional: which of ids[first:] count (chat: assistant tokens only)


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of log p(token | tokens before) over the scored tokens
    tokens: int  # how many tokens were scored
    greedy: bool  # every scored token is the argmax of its distribution


def continuation_request(context: list[int], continuation: list[int]) -> ScoreRequest:
    return ScoreRequest(context + continuation, len(context))


def token_budget_batches(order: list[int], lengths: list[int], batch_size: int, max_tokens: int | None):
    """Consecutive runs of `order` of at most batch_size sequences and (padded) max_tokens tokens."""
    batch: list[int] = []
    for i in order:
        widest = max([lengths[j] for j in batch] + [lengths[i]])
        if batch and (len(batch) >= batch_size or (max_tokens and widest * (len(batch) + 1) > max_tokens)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.no_grad()
def score_requests(model, requests: list[ScoreRequest], *, batch_size: int = 16,
                   max_tokens: int | None = 16384, hidden_states=None) -> list[Score]:
    """Scores of every request, in request order. batch_size 1 scores them one at a time (the baseline the
    bench compares against); max_tokens bounds the padded tokens of one forward; hidden_states: the forward
    to use, ids (b, w) -> hidden (b, w, D) (default: the model's eager forward; dsmoe.infer.graphs.HiddenStates
    replays CUDA graphs)."""
    if hidden_states is None:
        def hidden_states(ids):
            return model(ids, return_hidden=True)

    for r in requests:
        if not 1 <= r.first <= len(r.ids):
            raise ValueError(f"score request with first={r.first} for {len(r.ids)} tokens")
    device = next(model.parameters()).device
    lengths = [len(r.ids) for r in requests]
    order = sorted(range(len(requests)), key=lambda i: -lengths[i])
    results: list[Score | None] = [None] * len(requests)
    for batch in token_budget_batches(order, lengths, batch_size, max_tokens):
        width = max(lengths[i] for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : lengths[i]] = torch.tensor(requests[i].ids)
        ids = ids.to(device)
        # logits of the last token predict nothing; the first scored position is min(first) - 1
        start = min(requests[i].first for i in batch) - 1
        logits = model.logits(hidden_states(ids[:, :-1])[:, start:])
        logp = torch.log_softmax(logits.float(), dim=-1)
        targets = ids[:, start + 1:]
        chosen = logp.gather(-1, targets[..., None])[..., 0]
        greedy = logp.argmax(-1) == targets
        chosen, greedy = chosen.cpu(), greedy.cpu()
        for row, i in enumerate(batch):
            r = requests[i]
            lo, hi = r.first - 1 - start, lengths[i] - 1 - start
            keep = torch.ones(hi - lo, dtype=torch.bool) if r.mask is None else torch.tensor(r.mask, dtype=torch.bool)
            results[i] = Score(float(chosen[row, lo:hi][keep].double().sum()), int(keep.sum()),
                               bool(greedy[row, lo:hi][keep].all()))
    return results
