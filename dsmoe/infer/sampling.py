"""Sampling parameters and the batched sampler (one call per decode step for every row of the batch).

Randomness is counter-based: the noise for vocabulary entry v of the token generated at position p of a
request with seed s is a hash of (s, p, v). So a seeded request samples the same tokens whatever else runs
beside it, in whatever batch row, chunked or not, on any step schedule, and the sampler needs no
torch.Generator per request (nothing to keep in step between host and device, nothing a CUDA graph
cannot replay). Sampling is the Gumbel-max trick: argmax(logits / T + G) with G ~ Gumbel(0, 1) is a draw
from softmax(logits / T).

Order of the logits processors (as transformers applies them): repetition penalty -> temperature ->
top-k -> top-p (over the top-k renormalised distribution) -> draw. Reported logprobs are those of the
raw model distribution (log_softmax of the logits before any processing), as vLLM reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsmoe.errors import UserError

MAX_LOGPROBS = 20
_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output
    seed: int | None = None  # None = a fresh random seed per request
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # per generated token: its logprob and the top-n (None = nothing)
    prompt_logprobs: int | None = None  # the same over the prompt tokens (for echo / scoring)
    # speculative decoding (an engine built with speculative="mtp"): None = as the engine is set up, False = no
    # drafts for this request, True = require them; num_speculative_tokens caps this request's drafts per step
    speculative: bool | None = None
    num_speculative_tokens: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise UserError(f"sampling parameter {name}={getattr(self, name)!r}: {why}")

        if self.max_new_tokens < 0:
            bad("max_new_tokens", "must be >= 0")
        if not 0 <= self.temperature <= 100:  # also rejects NaN
            bad("temperature", "must be between 0 (greedy) and 100")
        if self.top_k < 0:
            bad("top_k", "must be >= 0 (0 turns top-k off)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 < self.repetition_penalty <= 100:
            bad("repetition_penalty", "must be > 0 (1 turns it off)")
        if self.num_speculative_tokens is not None and self.num_speculative_tokens < 0:
            bad("num_speculative_tokens", "must be >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not 0 <= n <= MAX_LOGPROBS:
                bad(name, f"must be between 0 and {MAX_LOGPROBS}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filtered(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1)


@dataclass
class TokenLogprobs:
    """Logprob of one chosen token and the top-n alternatives (raw model distribution)."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with good avalanche (xorshift-multiply rounds), on int64 tensors holding
    values < 2^32; multipliers < 2^31 keep every product below 2^63, so no signed overflow anywhere."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x68E31DA5) & _M32
    return x ^ (x >> 16)


def gumbel_noise(seed_B: torch.Tensor, position_B: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0,1) noise (B, V), a pure function of (seed, position, vocabulary index)."""
    h = _mix32((seed_B & _M32) ^ _mix32(((seed_B >> 32) & _M32) ^ _mix32(position_B & _M32)))
    v = torch.arange(vocab, device=seed_B.device, dtype=torch.int64)
    x = _mix32((h[:, None] + v[None, :] * 0x9E3779B1) & _M32)
    x = _mix32(x ^ h[:, None])
    u = ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1), never 0 or 1
    return -torch.log(-torch.log(u))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty_B: torch.Tensor) -> torch.Tensor:
    """CTRL / transformers rule for tokens already seen: positive logits divided by the penalty, negative
    ones multiplied."""
    p = penalty_B[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def processed_logits(logits: torch.Tensor, temperature_B: torch.Tensor, top_k_B: torch.Tensor,
                     top_p_B: torch.Tensor, *, any_filtered: bool) -> torch.Tensor:
    """Temperature, then top-k and top-p as -inf: softmax of the result is the distribution a sampled row
    draws from (speculative decoding compares these distributions of the main and the draft model)."""
    V = logits.shape[-1]
    scaled = logits / temperature_B.clamp_min(1e-6)[:, None]
    if any_filtered:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(V, device=logits.device)[None, :]
        k = torch.where(top_k_B > 0, top_k_B, V)[:, None]
        sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the mass before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p_B[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.empty_like(scaled).scatter_(-1, order, sorted_logits)
    return scaled


def sample(logits: torch.Tensor, temperature_B: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor,
           seed_B: torch.Tensor, position_B: torch.Tensor, *, any_random: bool, any_filtered: bool) -> torch.Tensor:
    """logits (B, V) float -> token ids (B,). Rows with temperature 0 take the argmax. `position_B` is the
    position of the token being generated (it keys the noise). `any_random` / `any_filtered` are host-side
    flags that skip work no row needs."""
    greedy = logits.argmax(dim=-1)
    if not any_random:
        return greedy
    scaled = processed_logits(logits, temperature_B, top_k_B, top_p_B, any_filtered=any_filtered)
    drawn = (scaled + gumbel_noise(seed_B, position_B, logits.shape[-1])).argmax(dim=-1)
    return torch.where(temperature_B == 0, greedy, drawn)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int) -> tuple[torch.Tensor, ...]:
    """(B, V) logits, (B,) chosen ids -> chosen logprob (B,), top-n ids (B, n), top-n logprobs (B, n).
    The chosen value and the top values come from the same tensor, so a greedy choice equals the top-1
    exactly (lm-eval's is_greedy test compares them with ==)."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(-1, tokens[:, None])[:, 0]
    top = logp.topk(top_n, dim=-1) if top_n > 0 else (logp[:, :0], tokens[:, None][:, :0])
    return chosen, top[1], top[0]


def to_token_logprobs(chosen: list[float], top_ids: list[list[int]], top_lps: list[list[float]],
                      tokens: list[int]) -> list[TokenLogprobs]:
    return [TokenLogprobs(t, c, list(zip(ids, lps))) for t, c, ids, lps in zip(tokens, chosen, top_ids, top_lps)]
