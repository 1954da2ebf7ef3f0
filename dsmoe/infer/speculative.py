"""Speculative decoding: drafts (drafters.py: the model's MTP module, or prompt lookup) verified by the model.

Per running sequence at position p, with its next input x_p and up to N drafts d_1..d_N proposed:
1. verify: the main model runs [x_p, d_1..d_N] at positions p..p+N in one forward over the KV cache;
2. accept (standard speculative sampling, Leviathan et al. 2023 / Chen et al. 2023): draft j is kept with
   probability min(1, p_j(d_j) / q_j(d_j)) (greedy rows: iff it is the main model's argmax) until the first
   rejection at index a; the token at index a is drawn from norm(max(0, p_a - q_a)) (or from p_a when every
   draft was kept), so each emitted token is distributed exactly as plain sampling from the main model would;
   the sequence advances by a + 1 tokens. Rolling the caches back is moving the position: entries past it are
   masked from every later query until overwritten (cache.py). A row offered fewer than N drafts (its request's
   cap, or a lookup that found fewer) has the rest masked out of the acceptance;
3. draft the next step: the MTP module on the device right away, or prompt lookup on the host once the step's
   tokens are read back (the engine reads every speculative step back at once).
Verify is CUDA-graph captured per (batch, length) bucket like plain decode (runner.py); acceptance runs eagerly.
Noise is counter-based (sampling.py): drafts, acceptance tests and the emitted tokens each use their own stream
keyed by (seed, position).
"""

from __future__ import annotations

import torch

from dsmoe.errors import UserError
from dsmoe.infer.drafters import MTPDrafter, PromptLookupDrafter
from dsmoe.infer.runner import DecodeRunner
from dsmoe.infer.sampling import gumbel_noise, processed_logits

METHODS = ("mtp", "ngram")
_ACCEPT_SALT = 0x2545F4914F6CDD1D


class _StepRunner(DecodeRunner):
    """The device part of a speculative step (verify, accept, the next drafts) at one verify width and one set of
    sampling switches: one CUDA graph per (batch, length) bucket. It only writes the KV caches (the same entries
    with the same values each time) and staging buffers, never its own inputs, so the capture's warm-up runs
    leave the engine's state as it was; Speculator.commit applies the result."""

    def __init__(self, spec: "Speculator", width: int, flags: dict, runner: DecodeRunner):
        super().__init__(spec.model, spec.cache, spec.slots, like=runner)
        self.spec, self.width, self.flags = spec, width, flags

    def step(self, B: int, L: int):
        return self.spec.compute(B, L, self.width, self.flags)


class Speculator:
    def __init__(self, engine, method: str, num_tokens: int, prompt_lookup: tuple[int, int] = (2, 4)):
        """prompt_lookup: (min, max) n-gram length of the ngram method."""
        if method not in METHODS:
            raise UserError(f"--speculative {method!r}: choose one of {', '.join(METHODS)}")
        if num_tokens < 1:
            raise UserError(f"--num-speculative-tokens {num_tokens}: must be >= 1")
        self.method = method
        self.model, self.cache, self.slots = engine.model, engine.cache, engine.slots
        self.N, self.width = num_tokens, num_tokens + 1
        self.num_slots, self.device, self.dtype = engine.max_batch, engine.device, engine.cache_dtype
        self.vocab_size = engine.model.config.vocab_size
        z = lambda *shape, dtype=torch.int64: torch.zeros(*shape, dtype=dtype, device=self.device)
        self.offsets = torch.arange(self.width, device=self.device)
        self.tokens = z(self.num_slots, self.width)  # verify input per slot: [x_p, d_1 .. d_N]
        self.draft_probs = z(self.num_slots, self.N, self.vocab_size, dtype=torch.float32)  # q_j for sampled rows
        self.max_drafts = z(self.num_slots)  # per slot: the drafts offered this step (0..N)
        self.runner = engine.runner
        self.runners: dict[tuple[int, bool, bool], _StepRunner] = {}
        self.drafter = MTPDrafter(self) if method == "mtp" else PromptLookupDrafter(self, *prompt_lookup)
        self.caps = [0] * self.num_slots  # per slot: its request's cap on drafts per step
        self.offered = [0] * self.num_slots  # per slot: drafts offered in the latest step (host copy of max_drafts)
        self.proposed = [0] * self.N  # per draft position, over the run: drafts verified / kept
        self.accepted = [0] * self.N
        self.row_steps = self.advanced = 0  # over the run: rows verified, tokens they advanced by

    def positions(self, start: torch.Tensor, width: int) -> torch.Tensor:
        """(B,) -> (B, width) positions start..start+width-1; rows parked at the trash position stay there."""
        return (start[:, None] + self.offsets[:width]).clamp_(max=self.cache.trash)

    # ---------------------------------------------------------------- engine hooks
    def admit(self, slot: int, params) -> None:
        n = self.N if params.num_speculative_tokens is None else params.num_speculative_tokens
        self.caps[slot] = self.offered[slot] = 0 if params.speculative is False else n
        self.max_drafts[slot] = self.caps[slot]

    def prefill(self, reqs: list, start: int, end: int, hidden: torch.Tensor, first_tokens: torch.Tensor | None,
                flags: dict) -> None:
        """After the main model's prefill of prompt[start:end] of `reqs` (one request but for prompt lookup, whose
        prefills batch): the drafter's part, and after the last chunk (first_tokens given) the verify input."""
        if first_tokens is not None:
            self.tokens[[r.slot for r in reqs], 0] = first_tokens
        self.drafter.prefill(reqs[0], start, end, hidden, first_tokens, flags)

    @torch.no_grad()
    def step(self, B: int, L: int, live: list, flags: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft-verify-accept step for rows 0..B-1 (`live`: their requests) -> (tokens (B, width): the kept
        drafts then the new token, counts (B,): how many of them each row emits). Nothing is read back: with MTP
        drafts the next step may be launched before this one's tokens reach the host."""
        width = self.width
        if self.drafter.on_host:
            self.offered = self.drafter.propose(live, flags)
            width = 1 + max(self.offered)
        key = (width, flags["any_random"], flags["any_filtered"])
        if key not in self.runners:
            self.runners[key] = _StepRunner(self, width, dict(flags), self.runner)
        tokens, counts, next_pos, next_input = self.runners[key](B, L)
        self.commit(slice(0, B), next_pos, next_input, flags)
        return tokens, counts

    def compute(self, B: int, L: int, width: int, flags: dict):
        """The device step (see _StepRunner) -> (tokens (B, width), counts (B,), next positions (B,), next inputs
        (B,)); the drafter stages the next drafts."""
        s = self.slots
        positions = self.positions(s.positions[:B], width)
        h = self.model(self.tokens[:B, :width], positions, cache=self.cache.decode(positions, L), return_hidden=True)
        tokens, kept = self.accept(self.model.logits(h).float(), B, positions + 1, flags)
        rows = torch.arange(B, device=self.device)
        live_rows = s.positions[:B] != self.cache.trash
        next_pos = torch.where(live_rows, s.positions[:B] + kept + 1, s.positions[:B])
        next_input = tokens[rows, kept]
        self.drafter.after_verify(B, L, h, tokens, kept, next_pos, flags)
        return tokens, kept + 1, next_pos, next_input

    def commit(self, rows: slice, next_pos: torch.Tensor, next_input: torch.Tensor, flags: dict) -> None:
        """Make the device step's results the slots' state: positions, next inputs, the drafts it staged."""
        self.slots.positions[rows] = next_pos
        self.tokens[rows, 0] = next_input
        self.drafter.commit(rows, flags)

    def accept(self, logits: torch.Tensor, B: int, p_pos: torch.Tensor, flags: dict):
        """logits (B, n+1, V) of the verify forward over n drafts -> (tokens (B, n+1), kept (B,) drafts kept per
        row)."""
        s, (_, width, V) = self.slots, logits.shape
        N = width - 1
        drafts = self.tokens[:B, 1:width]
        greedy = logits.argmax(-1)  # (B, N+1)
        rows = torch.arange(B, device=self.device)
        ok = drafts == greedy[:, :N]
        temperature = s.temperature[:B]
        if flags["any_random"]:
            rep = lambda x: x.repeat_interleave(width)
            p = processed_logits(logits.reshape(B * width, V), rep(temperature), rep(s.top_k[:B]),
                                 rep(s.top_p[:B]), any_filtered=flags["any_filtered"]).softmax(-1)
            p = p.view(B, width, V)
            q = self.draft_probs[:B, :N]
            p_d = p[:, :N].gather(-1, drafts[..., None])[..., 0]
            q_d = q.gather(-1, drafts[..., None])[..., 0]
            u = uniform(s.seed[:B, None].expand(B, N) ^ _ACCEPT_SALT, p_pos[:, :N])
            ok = torch.where(temperature[:, None] == 0, ok, u * q_d < p_d)
        ok &= self.offsets[:N] < self.max_drafts[:B, None]
        kept = ok.long().cumprod(-1).sum(-1)  # drafts kept before the first rejection
        new = greedy[rows, kept]
        if flags["any_random"]:
            proposed = kept < self.max_drafts[:B]  # the draft at `kept` was rejected (else none was proposed)
            q_k = torch.where(proposed[:, None], q[rows, kept.clamp(max=N - 1)], 0.0) if N else 0.0
            p_k = p[rows, kept]
            residual = (p_k - q_k).clamp_min(0)
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_k)
            drawn = (residual.log() + gumbel_noise(s.seed[:B], p_pos[rows, kept], V)).argmax(-1)
            new = torch.where(temperature == 0, new, drawn)
        tokens = torch.cat([drafts, new[:, None]], dim=1)
        tokens[rows, kept] = new
        return tokens, kept

    def record(self, kept_and_slot: list[tuple[int, int]]) -> None:
        for kept, slot in kept_and_slot:
            self.row_steps += 1
            self.advanced += kept + 1
            for j in range(self.offered[slot]):
                self.proposed[j] += 1
                self.accepted[j] += j < kept

    def stats(self) -> dict:
        rates = [a / p if p else None for a, p in zip(self.accepted, self.proposed)]
        return {"method": self.method, "num_speculative_tokens": self.N, "proposed": list(self.proposed),
                "accepted": list(self.accepted), "acceptance_rate": rates,
                "tokens_per_step": self.advanced / self.row_steps if self.row_steps else None}


def uniform(seed: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """U(0, 1) keyed by (seed, position), elementwise: from the sampler's Gumbel noise of a one-token vocabulary."""
    g = gumbel_noise(seed.reshape(-1), position.reshape(-1), 1)[:, 0]
    return torch.exp(-torch.exp(-g)).view(position.shape)
