"""Where speculative decoding's drafts come from (speculative.py verifies them).

- `MTPDrafter` (--speculative mtp): the model's own MTP module (DeepSeek-V3 section 5.4.3). After a prompt's
  prefill it runs over the prompt (h_t with token t+1, the first sampled token last) and drafts d_1; after each
  verify it runs over the same N + 1 positions with the main model's hidden states h_{p+j} and the tokens that
  follow them (the kept drafts, then the new token), which writes its own cache entries for the kept positions;
  its output at the last kept index drafts the next d_1, and further drafts chain the same module on its own
  hidden state (DeepSeek-V3 ships one MTP module; vLLM chains it the same way). Both passes are part of the
  speculative step's CUDA graph; drafts are sampled with each request's parameters, and their distributions q_j
  kept for the acceptance test.
- `PromptLookupDrafter` (--speculative ngram): no draft model (prompt lookup decoding, Saxena 2023; vLLM's
  "ngram"). The last n tokens of a sequence (prompt + output; n from --prompt-lookup-max down to
  --prompt-lookup-min) are looked up at their most recent earlier occurrence that N tokens follow (else the most
  recent one), and the tokens that followed it there are the drafts. Pays where output copies its input:
  summaries, answers quoting a document, code edits. A draft is certain (q is a point mass), so a sampled row
  keeps it with probability p(d) and otherwise draws from p with d removed: the acceptance rule of
  speculative.py, unchanged. The lookup runs on the host over each sequence's tokens (kept as int32 bytes,
  searched by bytes.rfind), before the step is launched.
"""

from __future__ import annotations

from array import array

import torch

from dsmoe.errors import UserError
from dsmoe.infer.sampling import processed_logits, sample

_DRAFT_SALT = 0x5DEECE66D  # keys the drafts' noise apart from the emitted tokens'


class MTPDrafter:
    on_host = False  # drafts are made on the device, within the speculative step
    batched_prefill = False  # its prefill follows each request's own forward over the prompt's hidden states

    def __init__(self, spec):
        from dsmoe.infer.cache import KVCache

        model = spec.model
        if not len(model.mtp):
            raise UserError("--speculative mtp needs a model with MTP modules (num_nextn_predict_layers >= 1 in "
                            "config.json): train one with `dsmoe train --mtp-layers 1`, use --speculative ngram, "
                            "or drop --speculative")
        self.spec, self.model = spec, model
        self.cache = KVCache(model.mtp[:1], spec.num_slots, spec.cache.max_len, spec.device, spec.dtype)
        D, n, z = model.config.hidden_size, spec.num_slots, lambda *shape: torch.zeros(*shape, device=spec.device)
        # inputs of the MTP passes (intermediates of the step: rewritten from its inputs each time)
        self.ids, self.hidden = z(n, spec.width).long(), z(n, spec.width, D).to(spec.dtype)
        # staging: the next step's drafts and their distributions, as the device step computes them
        self.next_drafts = z(n, spec.N).long()
        self.next_probs = torch.zeros_like(spec.draft_probs)
        self.chain_start = torch.full((n,), spec.cache.trash, dtype=torch.int64, device=spec.device)

    def mtp(self, h_prev: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, layer_cache):
        model, module = self.model, self.model.mtp[0]
        cos, sin = model.rotary(positions)
        h = module(h_prev, model.embed_tokens(ids), cos, sin, layer_cache)
        return model.logits(module.shared_head.norm(h)), h

    def _run(self, B: int, L: int, start: torch.Tensor, width: int):
        """The MTP module over `width` tokens of rows 0..B-1 from position start[b] on (ids and hidden as staged)."""
        positions = self.spec.positions(start[:B], width)
        return self.mtp(self.hidden[:B, :width], self.ids[:B, :width], positions, self.cache.decode(positions, L)[0])

    def prefill(self, req, start: int, end: int, hidden: torch.Tensor, first_token: torch.Tensor | None,
                flags: dict) -> None:
        """After the main model's prefill of prompt[start:end]: the MTP module over the same positions (h_t with
        token t+1), and after the last chunk (first_token given) the first drafts."""
        spec = self.spec
        following = torch.tensor(req.prompt[start + 1: end + 1], dtype=torch.int64, device=spec.device)
        if first_token is not None:  # the last chunk: the prompt's last position is followed by the first token
            following = torch.cat([following, first_token.view(1)])
        positions = torch.arange(start, end, device=spec.device)
        view = self.cache.prefill(req.slot, start, end - start)
        logits, h = self.mtp(hidden, following[None], positions, view[0])
        if first_token is not None:
            slot, P = req.slot, len(req.prompt)
            L = min(P + spec.width + spec.N, spec.cache.max_len)  # eager: no bucket
            self._draft(slot, slot + 1, L, logits[0, -1:], h[0, -1:], torch.full((1,), P, device=spec.device),
                        flags)
            self.commit(slot, flags)

    def commit(self, rows: slice | int, flags: dict) -> None:
        """The staged drafts (and, for sampled rows, their distributions) become the next verify's."""
        self.spec.tokens[rows, 1:] = self.next_drafts[rows]
        if flags["any_random"]:
            self.spec.draft_probs[rows] = self.next_probs[rows]

    def after_verify(self, B: int, L: int, h: torch.Tensor, tokens: torch.Tensor, kept: torch.Tensor,
                     next_pos: torch.Tensor, flags: dict) -> None:
        """The MTP module over the verified positions: hidden h_{p+j} with the token after it (kept drafts, then
        the new token); its output at the last kept index drafts the next step."""
        spec, N = self.spec, self.spec.N
        rows = torch.arange(B, device=spec.device)
        self.ids[:B, :N] = spec.tokens[:B, 1:]
        self.ids[rows, kept] = tokens[rows, kept]
        self.hidden[:B] = h
        mtp_logits, mtp_h = self._run(B, L, spec.slots.positions, spec.width)
        self._draft(0, B, L, mtp_logits[rows, kept], mtp_h[rows, kept], next_pos, flags)

    def _draft(self, lo: int, hi: int, L: int, logits: torch.Tensor, h: torch.Tensor, next_pos: torch.Tensor,
               flags: dict) -> None:
        """Rows lo..hi-1 (slots): logits (n, V) and MTP hidden (n, D) at each row's position next_pos - 1 ->
        the N drafts of the next step and their distributions, staged (next_drafts / next_probs). L bounds
        the positions the chain reaches (next_pos + N - 2)."""
        spec, s = self.spec, self.spec.slots
        sl = slice(lo, hi)
        for j in range(spec.N):
            logits = logits.float()
            seed = s.seed[sl] ^ _DRAFT_SALT
            token = sample(logits, s.temperature[sl], s.top_k[sl], s.top_p[sl], seed, next_pos + j + 1, **flags)
            self.next_drafts[sl, j] = token
            if flags["any_random"]:
                self.next_probs[sl, j] = processed_logits(logits, s.temperature[sl], s.top_k[sl], s.top_p[sl],
                                                          any_filtered=flags["any_filtered"]).softmax(-1)
            if j + 1 == spec.N:
                return
            # chain: the MTP module again, at the position after, on its own hidden state and this draft
            self.chain_start.fill_(spec.cache.trash)
            self.chain_start[sl] = next_pos + j
            self.ids[sl, 0] = token
            self.hidden[sl, 0] = h
            logits, h = self._run(hi, L, self.chain_start, 1)
            logits, h = logits[sl, 0], h[sl, 0]


class PromptLookupDrafter:
    on_host = True  # drafts come from the host's copy of each sequence, before the step is launched
    batched_prefill = True

    def __init__(self, spec, min_ngram: int, max_ngram: int):
        if not 1 <= min_ngram <= max_ngram:
            raise UserError(f"--prompt-lookup-min {min_ngram} / --prompt-lookup-max {max_ngram}: need "
                            "1 <= min <= max")
        self.spec, self.min_ngram, self.max_ngram = spec, min_ngram, max_ngram
        self.history: dict[int, tuple[object, bytearray]] = {}  # slot -> (request, its tokens as int32 bytes)

    def prefill(self, *args) -> None:
        """Nothing to run: the first drafts are looked up when the first decode step is launched."""

    def after_verify(self, *args) -> None:
        """Nothing to run: the next drafts are looked up on the host once the step's tokens are read back."""

    def commit(self, *args) -> None:
        """Nothing staged: propose() writes the drafts before the step."""

    def propose(self, live: list, flags: dict) -> list[int]:
        """Drafts for the rows of `live` (requests whose tokens the host has up to the last one) written into the
        verify input and the per-slot draft caps -> drafts offered per slot."""
        spec = self.spec
        B = max(r.slot for r in live) + 1
        drafts = [[0] * spec.N for _ in range(B)]
        offered = [0] * spec.num_slots
        for req in live:
            found = self.lookup(req)[: spec.caps[req.slot]]
            drafts[req.slot][: len(found)] = found
            offered[req.slot] = len(found)
        ids = torch.tensor(drafts, dtype=torch.int64)
        spec.tokens[:B, 1:] = ids.to(spec.device)
        spec.max_drafts.copy_(torch.tensor(offered))
        if flags["any_random"]:  # a certain draft: q is one-hot at it
            q = spec.draft_probs[:B].zero_()
            q.scatter_(-1, spec.tokens[:B, 1:, None], 1.0)
        return offered

    def lookup(self, req) -> list[int]:
        """The tokens that followed the most recent earlier occurrence of the sequence's last n tokens (the
        longest n that occurs), up to N of them. Occurrences that N tokens follow come first: in a repeating
        stretch the latest occurrence overlaps the end and would offer only one period."""
        tokens = self._history(req)
        width, N = 4, self.spec.N  # int32 bytes per token
        length = len(tokens) // width
        for ahead in (N, 1):  # tokens that must follow the occurrence
            for n in range(min(self.max_ngram, length - ahead), self.min_ngram - 1, -1):
                at = self._find(tokens, bytes(tokens[-n * width:]), len(tokens) - ahead * width)
                if at >= 0:
                    first = at // width + n
                    return array("i", tokens[first * width: (first + N) * width]).tolist()
        return []

    @staticmethod
    def _find(tokens: bytearray, pattern: bytes, end: int) -> int:
        """The last token-aligned occurrence of pattern within tokens[:end], or -1."""
        while (at := tokens.rfind(pattern, 0, end)) >= 0:
            if at % 4 == 0:
                return at
            end = at + len(pattern) - 1  # a match across token boundaries: look further back
        return -1

    def _history(self, req) -> bytearray:
        owner, tokens = self.history.get(req.slot, (None, None))
        if owner is not req:
            tokens = bytearray(array("i", req.prompt).tobytes())
            self.history[req.slot] = (req, tokens)
        known = len(tokens) // 4 - len(req.prompt)
        tokens += array("i", req.output[known:]).tobytes()
        return tokens
