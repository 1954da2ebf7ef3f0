"""Self-speculative decoding with the model's own MTP module as the draft (DeepSeek-V3 section 5.4.3).

Per running sequence at position p, with its next input x_p and N drafts d_1..d_N already proposed:
1. verify: the main model runs [x_p, d_1..d_N] at positions p..p+N in one forward over the KV cache;
2. accept (standard speculative sampling, Leviathan et al. 2023 / Chen et al. 2023): draft j is kept with
   probability min(1, p_j(d_j) / q_j(d_j)) (greedy rows: iff it is the main model's argmax) until the first
   rejection at index a; the token at index a is drawn from norm(max(0, p_a - q_a)) (or from p_a when every
   draft was kept), so each emitted token is distributed exactly as plain sampling from the main model would;
   the sequence advances by a + 1 tokens. Rolling the caches back is moving the position: entries past it are
   masked from every later query until overwritten (cache.py);
3. draft: the MTP module runs over the same N + 1 positions with the main model's hidden states h_{p+j} and the
   tokens that follow them (the kept drafts, then the new token at index a), which writes its own cache entries
   for the kept positions; its output at index a drafts the next step's d_1, and further drafts chain the same
   module on its own hidden state (DeepSeek-V3 ships one MTP module; vLLM chains it the same way).
After a prompt's prefill, the MTP module runs over the prompt (h_t with token t+1, the first sampled token
last) and drafts the first d_1. Verify and both MTP passes are CUDA-graph captured per (batch, length) bucket
like plain decode (runner.py); acceptance runs eagerly between them. Noise is counter-based (sampling.py):
drafts, acceptance tests and the emitted tokens each use their own stream keyed by (seed, position).
"""

from __future__ import annotations

import torch

from dsmoe.errors import UserError
from dsmoe.infer.cache import KVCache
from dsmoe.infer.runner import DecodeRunner
from dsmoe.infer.sampling import gumbel_noise, processed_logits, sample

METHODS = ("mtp",)
_DRAFT_SALT = 0x5DEECE66D  # keys the drafts' noise apart from the emitted tokens'
_ACCEPT_SALT = 0x2545F4914F6CDD1D


class _VerifyRunner(DecodeRunner):
    """The main model over N + 1 tokens per row -> (logits (B, S, V), final-normed hidden (B, S, D))."""

    def __init__(self, spec: "Speculator", **kw):
        super().__init__(spec.model, spec.cache, spec.slots, **kw)
        self.spec = spec

    def step(self, B: int, L: int):
        positions = self.spec.positions(self.slots.positions[:B], self.spec.width)
        h = self.model(self.spec.tokens[:B], positions, cache=self.cache.decode(positions, L), return_hidden=True)
        return self.model.logits(h), h


class _DraftRunner(DecodeRunner):
    """The MTP module over `width` tokens per row, from position start[b] on -> (logits, MTP hidden)."""

    def __init__(self, spec: "Speculator", width: int, start: torch.Tensor, **kw):
        super().__init__(spec.model, spec.mtp_cache, spec.slots, **kw)
        self.spec, self.width, self.start = spec, width, start
        D = spec.model.config.hidden_size
        self.ids = torch.zeros(spec.num_slots, width, dtype=torch.int64, device=start.device)
        self.hidden = torch.zeros(spec.num_slots, width, D, dtype=spec.dtype, device=start.device)

    def step(self, B: int, L: int):
        positions = self.spec.positions(self.start[:B], self.width)
        return self.spec.mtp(self.hidden[:B], self.ids[:B], positions, self.cache.decode(positions, L)[0])


class Speculator:
    def __init__(self, engine, method: str, num_tokens: int):
        model = engine.model
        if method not in METHODS:
            raise UserError(f"--speculative {method!r}: choose one of {', '.join(METHODS)}")
        if not len(model.mtp):
            raise UserError("--speculative mtp needs a model with MTP modules (num_nextn_predict_layers >= 1 in "
                            "config.json): train one with `dsmoe train --mtp-layers 1`, or drop --speculative")
        if num_tokens < 1:
            raise UserError(f"--num-speculative-tokens {num_tokens}: must be >= 1")
        self.model, self.cache, self.slots = model, engine.cache, engine.slots
        self.N, self.width = num_tokens, num_tokens + 1
        self.num_slots, self.device, self.dtype = engine.max_batch, engine.device, engine.cache_dtype
        self.vocab_size = model.config.vocab_size
        self.mtp_cache = KVCache(model.mtp[:1], self.num_slots, self.cache.max_len, self.device, self.dtype)
        z = lambda *shape, dtype=torch.int64: torch.zeros(*shape, dtype=dtype, device=self.device)
        self.offsets = torch.arange(self.width, device=self.device)
        self.tokens = z(self.num_slots, self.width)  # verify input per slot: [x_p, d_1 .. d_N]
        self.draft_probs = z(self.num_slots, self.N, self.vocab_size, dtype=torch.float32)  # q_j for sampled rows
        self.max_drafts = z(self.num_slots)  # per slot: the request's cap (0..N)
        self.chain_start = torch.full((self.num_slots,), self.cache.trash, dtype=torch.int64, device=self.device)
        graphs = dict(cuda_graphs=engine.runner.cuda_graphs)
        self.verify = _VerifyRunner(self, **graphs)
        self.extend = _DraftRunner(self, self.width, engine.slots.positions, **graphs)
        self.chain = _DraftRunner(self, 1, self.chain_start, **graphs) if self.N > 1 else None
        self.caps = [0] * self.num_slots  # host copy of max_drafts
        self.proposed = [0] * self.N  # per draft position, over the run: drafts verified / kept
        self.accepted = [0] * self.N

    # ---------------------------------------------------------------- pieces
    def positions(self, start: torch.Tensor, width: int) -> torch.Tensor:
        """(B,) -> (B, width) positions start..start+width-1; rows parked at the trash position stay there."""
        return (start[:, None] + self.offsets[:width]).clamp_(max=self.cache.trash)

    def mtp(self, h_prev: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, layer_cache):
        model, module = self.model, self.model.mtp[0]
        cos, sin = model.rotary(positions)
        h = module(h_prev, model.embed_tokens(ids), cos, sin, layer_cache)
        return model.logits(module.shared_head.norm(h)), h

    def _draft(self, lo: int, hi: int, logits: torch.Tensor, h: torch.Tensor, next_pos: torch.Tensor,
               flags: dict) -> None:
        """Rows lo..hi-1 (slots): logits (n, V) and MTP hidden (n, D) at each row's position next_pos - 1 ->
        the N drafts for the next verify (tokens[:, 1:]) and their distributions."""
        s = self.slots
        sl = slice(lo, hi)
        for j in range(self.N):
            logits = logits.float()
            seed = s.seed[sl] ^ _DRAFT_SALT
            token = sample(logits, s.temperature[sl], s.top_k[sl], s.top_p[sl], seed, next_pos + j + 1, **flags)
            self.tokens[sl, j + 1] = token
            if flags["any_random"]:
                self.draft_probs[sl, j] = processed_logits(logits, s.temperature[sl], s.top_k[sl], s.top_p[sl],
                                                           any_filtered=flags["any_filtered"]).softmax(-1)
            if j + 1 == self.N:
                return
            # chain: the MTP module again, at the position after, on its own hidden state and this draft
            self.chain_start.fill_(self.cache.trash)
            self.chain_start[sl] = next_pos + j
            self.chain.ids[sl, 0] = token
            self.chain.hidden[sl, 0] = h
            B = self.chain.batch_bucket(hi)
            L = self.chain.length_bucket(min(int(self.chain_start[sl].max()) + 1, self.cache.max_len))
            logits, h = self.chain(B, L)
            logits, h = logits[sl, 0], h[sl, 0]

    # ---------------------------------------------------------------- engine hooks
    def admit(self, slot: int, params) -> None:
        n = self.N if params.num_speculative_tokens is None else params.num_speculative_tokens
        self.caps[slot] = 0 if params.speculative is False else n
        self.max_drafts[slot] = self.caps[slot]

    def prefill(self, req, start: int, end: int, hidden: torch.Tensor, first_token: torch.Tensor | None,
                flags: dict) -> None:
        """After the main model's prefill of prompt[start:end]: the MTP module over the same positions (h_t with
        token t+1), and after the last chunk (first_token given) the first drafts."""
        following = torch.tensor(req.prompt[start + 1: end + 1], dtype=torch.int64, device=self.device)
        if first_token is not None:  # the last chunk: the prompt's last position is followed by the first token
            following = torch.cat([following, first_token.view(1)])
        positions = torch.arange(start, end, device=self.device)
        view = self.mtp_cache.prefill(req.slot, start, end - start)
        logits, h = self.mtp(hidden, following[None], positions, view[0])
        if first_token is None:
            return
        slot, P = req.slot, len(req.prompt)
        self.tokens[slot, 0] = first_token
        self._draft(slot, slot + 1, logits[0, -1:], h[0, -1:], torch.full((1,), P, device=self.device), flags)

    @torch.no_grad()
    def step(self, B: int, L: int, flags: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One verify + accept + draft step for rows 0..B-1 -> (tokens (B, N+1): the kept drafts then the new
        token, counts (B,): how many of them each row emits)."""
        s, N = self.slots, self.N
        logits, h = self.verify(B, L)
        p_pos = self.positions(s.positions[:B], self.width) + 1  # position of the token each index generates
        tokens, kept = self.accept(logits.float(), B, p_pos, flags)
        # the MTP module over the same positions: hidden h_{p+j} with the token after it (kept drafts, then new)
        rows = torch.arange(B, device=self.device)
        ids = self.extend.ids
        ids[:B, :N] = self.tokens[:B, 1:]
        ids[rows, kept] = tokens[rows, kept]
        self.extend.hidden[:B] = h
        mtp_logits, mtp_h = self.extend(B, L)
        live = s.positions[:B] != self.cache.trash
        next_pos = torch.where(live, s.positions[:B] + kept + 1, s.positions[:B])
        self.tokens[:B, 0] = tokens[rows, kept]
        self._draft(0, B, mtp_logits[rows, kept], mtp_h[rows, kept], next_pos, flags)
        s.positions[:B] = next_pos
        return tokens, kept + 1

    def accept(self, logits: torch.Tensor, B: int, p_pos: torch.Tensor, flags: dict):
        """logits (B, N+1, V) of the verify forward -> (tokens (B, N+1), kept (B,) drafts kept per row)."""
        s, N, V = self.slots, self.N, logits.shape[-1]
        drafts = self.tokens[:B, 1:]
        greedy = logits.argmax(-1)  # (B, N+1)
        rows = torch.arange(B, device=self.device)
        ok = drafts == greedy[:, :N]
        temperature = s.temperature[:B]
        if flags["any_random"]:
            rep = lambda x: x.repeat_interleave(self.width)
            p = processed_logits(logits.view(B * self.width, V), rep(temperature), rep(s.top_k[:B]),
                                 rep(s.top_p[:B]), any_filtered=flags["any_filtered"]).softmax(-1)
            p = p.view(B, self.width, V)
            q = self.draft_probs[:B]
            p_d = p[:, :N].gather(-1, drafts[..., None])[..., 0]
            q_d = q.gather(-1, drafts[..., None])[..., 0]
            u = uniform(s.seed[:B, None].expand(B, N) ^ _ACCEPT_SALT, p_pos[:, :N])
            ok = torch.where(temperature[:, None] == 0, ok, u * q_d < p_d)
        ok &= self.offsets[:N] < self.max_drafts[:B, None]
        kept = ok.long().cumprod(-1).sum(-1)  # drafts kept before the first rejection
        new = greedy[rows, kept]
        if flags["any_random"]:
            proposed = kept < self.max_drafts[:B]  # the draft at `kept` was rejected (else none was proposed)
            q_k = torch.where(proposed[:, None], q[rows, kept.clamp(max=N - 1)], 0.0)
            p_k = p[rows, kept]
            residual = (p_k - q_k).clamp_min(0)
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_k)
            drawn = (residual.log() + gumbel_noise(s.seed[:B], p_pos[rows, kept], V)).argmax(-1)
            new = torch.where(temperature == 0, new, drawn)
        tokens = torch.cat([drafts, drafts[:, :1]], dim=1)
        tokens[rows, kept] = new
        return tokens, kept

    def record(self, kept_and_slot: list[tuple[int, int]]) -> None:
        for kept, slot in kept_and_slot:
            for j in range(self.caps[slot]):
                self.proposed[j] += 1
                self.accepted[j] += j < kept

    def stats(self) -> dict:
        rates = [a / p if p else None for a, p in zip(self.accepted, self.proposed)]
        return {"method": "mtp", "num_speculative_tokens": self.N, "proposed": list(self.proposed),
                "accepted": list(self.accepted), "acceptance_rate": rates}


def uniform(seed: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """U(0, 1) keyed by (seed, position), elementwise: from the sampler's Gumbel noise of a one-token vocabulary."""
    g = gumbel_noise(seed.reshape(-1), position.reshape(-1), 1)[:, 0]
    return torch.exp(-torch.exp(-g)).view(position.shape)
