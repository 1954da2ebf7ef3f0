"""The continuous-batching engine: token ids in, token ids out.

Each running sequence owns a slot of a static KV cache. Every `step()`:
1. admits waiting requests into free slots and prefills prompt chunks, up to `prefill_chunk` tokens per
   step (a long prompt spreads over several steps, so running sequences keep decoding meanwhile; prompts that
   fit the step whole share one right-padded forward, rows x longest counted against the budget); the last
   chunk of a prompt samples its first token on the device;
2. launches one decode step for every running sequence: rows 0..B-1 of the batch are slots 0..B-1, each
   reading its next input token and position from device buffers the previous step (or the prefill) wrote,
   so consecutive steps need no round trip through the host; the step samples its next tokens inside its
   CUDA graph (DecodeRunner.sampling) unless a request needs the logits (logprobs, repetition penalty);
3. reads back the tokens of the step *before* the one just launched (one step in flight): the host checks
   stop tokens and lengths while the device computes. A sequence that stops is dropped from the next
   launch; the one extra token the in-flight step computed for it is discarded.
With `speculative="mtp"` or `"ngram"` step 2 is a speculative step instead (speculative.py): drafts (of the MTP
module, or looked up in the sequence itself) are verified in one forward and each sequence advances by 1..N+1
tokens. With MTP drafts the step is all on the device, so one stays in flight as in plain decoding; the host
then knows each sequence's length only within bounds (at least one token per step, at most N+1), which is
enough to stop launching and to size the attention; prompt lookup reads every step back before the next.
Requests join and leave at any step; `cancel()` ends one at once. Stop *strings* need text, so they are
checked by the caller (dsmoe.infer.text), which cancels the request when one appears.
"""

from __future__ import annotations

import itertools
import random
from collections import deque

import torch

from dsmoe.errors import RequestError, UserError
from dsmoe.infer.cache import KVCache
from dsmoe.infer.records import Launched, Request, SlotState, StepOutput
from dsmoe.infer.runner import DecodeRunner
from dsmoe.infer.speculative import Speculator
from dsmoe.infer.sampling import (SamplingParams, TokenLogprobs, apply_repetition_penalty, sample,
                                  to_token_logprobs, token_logprobs)


class Engine:
    def __init__(self, model, *, max_batch: int = 8, max_model_len: int | None = None, prefill_chunk: int = 512,
                 eos_token_ids: tuple[int, ...] | list[int] = (), cuda_graphs: bool = True,
                 overlap: bool | None = None, compile: bool = False, speculative: str | None = None,
                 num_speculative_tokens: int = 1, prompt_lookup: tuple[int, int] = (2, 4)):
        """overlap: keep one decode step in flight while the host reads the previous one (default: on CUDA,
        where host and device run concurrently; on the CPU it only exercises the same bookkeeping).
        compile: run the decode step's blocks through torch.compile (see runner.py).
        speculative: up to num_speculative_tokens drafts per step, verified by the model (speculative.py): "mtp"
        drafts with the model's MTP module, "ngram" by prompt lookup with n-grams of prompt_lookup = (min, max)
        tokens (drafters.py; no overlap: the lookup reads every token)."""
        config = model.config
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.vocab_size = config.vocab_size
        self.max_batch = max_batch
        if prefill_chunk < 1 or max_batch < 1:
            raise UserError("max_batch and prefill_chunk must be >= 1")
        if max_model_len is not None and not max_model_len >= 1:
            raise UserError(f"max_model_len must be >= 1 (--max-model-len), got {max_model_len}")
        self.max_model_len = min(config.max_position_embeddings, 4096) if max_model_len is None else max_model_len
        if self.max_model_len > config.max_position_embeddings:
            raise UserError(f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                            f"{config.max_position_embeddings}; pass a smaller one")
        self.prefill_chunk = prefill_chunk
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids if t is not None)
        self.cache_dtype = dtype = model.embed_tokens.weight.dtype
        drafts = num_speculative_tokens if speculative else 0  # a verify may write that far past the last token
        self.cache = KVCache(model.layers, max_batch, self.max_model_len + drafts, self.device, dtype)
        self.slots = SlotState(max_batch, self.cache.trash, self.device)
        self.runner = DecodeRunner(model, self.cache, self.slots,
                                   cuda_graphs=cuda_graphs and self.device.type == "cuda", compile=compile)
        self.spec = Speculator(self, speculative, num_speculative_tokens, prompt_lookup) if speculative else None
        # prompt lookup needs every token on the host before it drafts: no step in flight then
        self.overlap = ((self.device.type == "cuda" if overlap is None else overlap)
                        and (self.spec is None or not self.spec.drafter.on_host))
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request, prefilled and decoding
        self.prefilling: Request | None = None
        self.free_slots = list(range(max_batch))
        self.pending: deque[Launched] = deque()
        self.ready: list[StepOutput] = []  # outputs produced without a device round trip
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()

    # ------------------------------------------------------------------ public API
    def warm_up(self) -> None:
        """Autotune and compile the step shapes before the first request (see DecodeRunner.warm_up)."""
        if self.has_work():
            raise UserError("warm up an engine before it takes requests: the warm-up writes free slots' cache")
        self.runner.warm_up(self.prefill_chunk)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; raises UserError for a prompt the model cannot take (empty, ids outside the
        vocabulary, prompt + max_new_tokens past max_model_len)."""
        self.validate(prompt_ids, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise UserError(f"request id {rid!r} is already in use")
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        req = Request(rid, [int(t) for t in prompt_ids], params, seed % (1 << 63), stop_ids=frozenset(stop))
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        self.requests[rid] = req
        self.waiting.append(req)
        return rid

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if len(prompt_ids) == 0:
            raise UserError("the prompt is empty: give at least one token")
        bad = next((t for t in prompt_ids if not 0 <= int(t) < self.vocab_size), None)
        if bad is not None:
            raise UserError(f"prompt token id {int(bad)} is outside the vocabulary (0..{self.vocab_size - 1})")
        self._validate_speculative(params)
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.max_model_len:
            raise UserError(f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens "
                            f"({params.max_new_tokens}) is {total}, more than max_model_len "
                            f"({self.max_model_len}); shorten the prompt or ask for fewer tokens")

    def _validate_speculative(self, params: SamplingParams) -> None:
        if self.spec is None:
            if params.speculative:
                raise RequestError("this request asks for speculative decoding but the engine runs without it: "
                                   "start it with --speculative mtp or ngram", param="speculative")
            return
        if params.num_speculative_tokens is not None and params.num_speculative_tokens > self.spec.N:
            raise RequestError(f"num_speculative_tokens={params.num_speculative_tokens} is more than the engine's "
                               f"{self.spec.N} (--num-speculative-tokens)", param="num_speculative_tokens")
        refused = "logprobs" if params.logprobs is not None else (
            "repetition_penalty" if params.repetition_penalty != 1 else None)
        if refused:
            raise RequestError("logprobs and repetition_penalty are not available from an engine running speculative "
                               "decoding: drop them, or use an engine (server) started without --speculative",
                               param=refused)

    def speculation_stats(self) -> dict | None:
        """Drafts verified and kept per draft position since the engine started (None without speculation)."""
        return None if self.spec is None else self.spec.stats()

    def cancel(self, request_id: str) -> None:
        """End a request now (no further output is produced for it); unknown or finished ids are ignored."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        self._finish(req, "cancelled")

    def abort_all(self) -> None:
        """Cancel every request and drop results in flight (after a failed step: start from a clean state)."""
        for rid in list(self.requests):
            self.cancel(rid)
        self.pending.clear()
        self.ready.clear()

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self.pending or self.ready)

    def num_running(self) -> int:
        return len(self.running) + (self.prefilling is not None)

    def num_waiting(self) -> int:
        return len(self.waiting)

    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        self._prefill_step()
        if self.spec is not None and self.spec.drafter.on_host:  # prompt lookup reads every token up to the last
            self.ready += self._process_pending(keep=0)
        launched = self._launch_decode()
        outputs, self.ready = self.ready, []
        return outputs + self._process_pending(keep=1 if launched and self.overlap else 0)

    def _process_pending(self, keep: int) -> list[StepOutput]:
        """Read back launched steps, oldest first, until `keep` remain in flight."""
        outputs = []
        while len(self.pending) > keep:
            outputs += self._process(self.pending.popleft())
        return outputs

    # ------------------------------------------------------------------ prefill
    def _prefill_step(self) -> None:
        """Up to prefill_chunk prompt tokens this step, counted as the forward computes them (rows x longest
        prompt when several prompts share one forward), so the budget bounds the time decode waits."""
        budget = self.prefill_chunk
        while budget > 0:
            group = [] if self.prefilling else self._admit_whole_prompts(budget)
            if group:
                self._prefill(group, [len(r.prompt) for r in group])
                budget -= len(group) * max(len(r.prompt) for r in group)
                continue
            req = self.prefilling or self._admit()
            if req is None:
                return
            n = min(budget, len(req.prompt) - req.prefilled)
            self._prefill([req], [req.prefilled + n])
            budget -= n

    def _admit_whole_prompts(self, budget: int) -> list[Request]:
        """The waiting requests, in order, whose whole prompts fit one forward within the budget: rows x the
        longest prompt, right-padded. An eager prefill forward is bound by kernel launches, not by its tokens,
        so one forward for all of them costs about what one costs alone."""
        group, longest = [], 0
        while self.waiting and self.free_slots and self._batchable(self.waiting[0]):
            with_next = max(longest, len(self.waiting[0].prompt))
            if (len(group) + 1) * with_next > budget:
                break
            group.append(self._admit())
            longest = with_next
        return group

    def _batchable(self, req: Request) -> bool:
        """Whether a request's prefill may share a forward with others'. These are prefilled alone, in chunks:
        with MTP drafts (the MTP module's prefill follows each request's own forward over its hidden
        states), with prompt_logprobs (every position's logits, gathered per request), and with max_new_tokens=0
        (it samples nothing: a scoring request)."""
        return ((self.spec is None or self.spec.drafter.batched_prefill) and req.params.prompt_logprobs is None
                and req.params.max_new_tokens > 0)

    def _admit(self) -> Request | None:
        if not self.waiting or not self.free_slots:
            return None
        req = self.waiting.popleft()
        slot = self.free_slots.pop(0)
        req.slot = slot
        p, s = req.params, self.slots
        s.temperature[slot] = p.temperature
        s.top_k[slot] = p.top_k
        s.top_p[slot] = p.top_p
        s.penalty[slot] = p.repetition_penalty
        s.seed[slot] = req.seed
        if self.spec is not None:
            self.spec.admit(slot, p)
        if p.repetition_penalty != 1 and s.seen is None:
            s.seen = torch.zeros(self.max_batch, self.vocab_size, dtype=torch.bool, device=self.device)
        if s.seen is not None:
            s.seen[slot] = False
            if p.repetition_penalty != 1:
                s.seen[slot, torch.tensor(req.prompt, device=self.device)] = True
        return req

    def _prefill(self, reqs: list[Request], ends: list[int]) -> None:
        """One forward over prompt[prefilled:end] of each request, rows right-padded to the longest: a chunk of
        one request's prompt, or several whole prompts from position 0. A request whose whole prompt is now in
        the cache samples its first token from its last prompt position."""
        req, start = reqs[0], reqs[0].prefilled  # several requests only ever come together from position 0
        lengths = [end - start for end in ends]
        S = max(lengths)
        ids = torch.tensor([r.prompt[start:end] + [0] * (S - n) for r, end, n in zip(reqs, ends, lengths)],
                           device=self.device)
        # final-normed hidden states: the MTP module reads every position, the others only each row's last real one
        hidden = self.runner.prefill(ids, [r.slot for r in reqs], start, return_hidden=True)
        want_prompt = req.params.prompt_logprobs is not None  # such a request is prefilled alone (_batchable)
        if want_prompt:
            logits = self.model.logits(hidden[0])
        else:
            last = torch.tensor(lengths, device=self.device) - 1
            logits = self.model.logits(hidden[torch.arange(len(reqs), device=self.device), last])
        end, P = ends[0], len(req.prompt)
        if want_prompt:
            targets = req.prompt[start + 1: min(end + 1, P)]
            if targets:
                t = torch.tensor(targets, device=self.device)
                lp = token_logprobs(logits[: len(targets)], t, req.params.prompt_logprobs)
                req.prompt_logprobs += _host_logprobs(lp, targets)
            logits = logits[-1:]
        if self.spec is not None and end < P:
            self.spec.prefill(reqs, start, end, hidden, None, self._flags(reqs))
        for r, e in zip(reqs, ends):
            r.prefilled = e
        self.prefilling = req if end < P else None  # only a lone request's chunk leaves part of a prompt
        if end < P:
            return
        if req.params.max_new_tokens == 0:  # alone too
            self.ready.append(StepOutput(req.id, [], None, req.prompt_logprobs, "length"))
            req.reported_prompt = True
            self._finish(req, "length")
            return
        rows = self.cache.index([r.slot for r in reqs])
        positions = torch.tensor([len(r.prompt) for r in reqs], device=self.device)
        tokens, lp = self._sample(logits, rows, reqs, positions)
        if self.spec is not None:
            self.spec.prefill(reqs, start, end, hidden, tokens, self._flags(reqs))
        self.slots.input_ids[rows] = tokens
        self.slots.positions[rows] = positions
        for r in reqs:
            r.launched, r.next_pos = 1, len(r.prompt)
            self.running[r.slot] = r
        self.pending.append(self._launched(list(enumerate(reqs)), tokens, lp))

    # ------------------------------------------------------------------ decode
    def _launch_decode(self) -> bool:
        live = []
        for req in self.running.values():
            if req.launched < req.params.max_new_tokens:
                live.append(req)
            elif req.next_pos != self.cache.trash:  # all its tokens are launched: park its row
                self.slots.positions[req.slot] = self.cache.trash
                req.next_pos = self.cache.trash
        if not live:
            return False
        B = self.runner.batch_bucket(max(r.slot for r in live) + 1)
        if self.spec is not None:
            # next_pos is an upper bound while steps are in flight; the chain of MTP drafts reaches N - 1 further
            width = self.spec.width
            L = self.runner.length_bucket(min(max(r.next_pos for r in live) + width + self.spec.N,
                                              self.cache.max_len))
            tokens, counts = self.spec.step(B, L, live, self._flags(live))
            for req in live:  # bounds until the step is read back: at least one token, at most `width`
                req.in_flight += 1
                req.launched += 1
                req.next_pos += width
            self.pending.append(self._launched([(r.slot, r) for r in live], tokens, None, counts))
            return True
        L = self.runner.length_bucket(max(r.next_pos for r in live) + 1)
        s = self.slots
        next_positions = s.positions[:B] + 1
        if any(r.params.logprobs is not None or r.params.repetition_penalty != 1 for r in live):
            tokens, lp = self._sample(self.runner(B, L), slice(0, B), live, next_positions)  # logits needed here
        else:
            tokens, lp = self.runner.sampling(self._flags(live))(B, L), None
        s.input_ids[:B] = tokens
        s.positions[:B] = next_positions.clamp_(max=self.cache.trash)
        for req in live:
            req.launched += 1
            req.next_pos += 1
        self.pending.append(self._launched([(r.slot, r) for r in live], tokens, lp))
        return True

    def _sample(self, logits: torch.Tensor, rows: slice | torch.Tensor, reqs: list[Request], positions: torch.Tensor):
        """logits (n, V) of the slots `rows` (a slice or an index tensor, as cache.index gives them) -> tokens (n,)
        drawn with each slot's parameters, and their logprobs when a request asked for them."""
        s = self.slots
        raw = logits.float()
        logits = raw
        if s.seen is not None and any(r.params.repetition_penalty != 1 for r in reqs):
            logits = apply_repetition_penalty(raw, s.seen[rows], s.penalty[rows])
        tokens = sample(logits, s.temperature[rows], s.top_k[rows], s.top_p[rows], s.seed[rows], positions,
                        **self._flags(reqs))
        if s.seen is not None:
            s.seen[self.cache.rows[rows], tokens] = True
        wanted = [r.params.logprobs for r in reqs if r.params.logprobs is not None]
        lp = token_logprobs(raw, tokens, max(wanted)) if wanted else None
        return tokens, lp

    @staticmethod
    def _flags(reqs: list[Request]) -> dict:
        """Host-side switches that let the sampler skip work no row needs."""
        return {"any_random": any(not r.params.greedy for r in reqs),
                "any_filtered": any(r.params.filtered for r in reqs)}

    def _launched(self, rows, tokens: torch.Tensor, lp, counts: torch.Tensor | None = None) -> Launched:
        if self.device.type != "cuda":
            return Launched(rows, tokens, lp, None, counts)
        extra = (counts,) if counts is not None else ()
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                for t in (tokens, *(lp or ()), *extra)]
        event = torch.cuda.Event()
        event.record()
        n_lp = len(lp or ())
        return Launched(rows, host[0], tuple(host[1:1 + n_lp]) if lp else None, event,
                         host[-1] if counts is not None else None)

    def _process(self, launched: Launched) -> list[StepOutput]:
        if launched.event is not None:
            launched.event.synchronize()
        tokens = launched.tokens.tolist()
        lp = [x.tolist() for x in launched.logprobs] if launched.logprobs else None
        counts = launched.counts.tolist() if launched.counts is not None else None
        if counts is not None:
            self.spec.record([(counts[row] - 1, req.slot) for row, req in launched.rows if not req.finished])
        outputs = []
        for row, req in launched.rows:
            if req.finished:
                continue  # stopped or cancelled while this step was in flight
            new = tokens[row][: counts[row]] if counts is not None else [tokens[row]]
            emitted, reason = [], None
            for token in new:
                emitted.append(token)
                req.output.append(token)
                reason = "stop" if token in req.stop_ids else \
                    "length" if len(req.output) >= req.params.max_new_tokens else None
                if reason:
                    break
            logprobs = None
            if req.params.logprobs is not None:
                n = req.params.logprobs
                logprobs = [TokenLogprobs(emitted[0], lp[0][row], list(zip(lp[1][row][:n], lp[2][row][:n])))]
            if counts is not None:  # speculative: the host learns here how far the sequence advanced
                req.in_flight -= 1
                req.launched = len(req.output) + req.in_flight
                req.next_pos = len(req.prompt) + len(req.output) - 1 + req.in_flight * self.spec.width
            prompt_lp = None if req.reported_prompt else req.prompt_logprobs
            req.reported_prompt = True
            outputs.append(StepOutput(req.id, emitted, logprobs, prompt_lp, reason))
            if reason:
                self._finish(req, reason)
        return outputs

    def _finish(self, req: Request, reason: str) -> None:
        req.finished = reason
        self.requests.pop(req.id, None)
        if self.prefilling is req:
            self.prefilling = None
        if req.slot is not None:
            self.running.pop(req.slot, None)
            self.slots.positions[req.slot] = self.cache.trash
            self.free_slots.append(req.slot)
            self.free_slots.sort()
            req.slot = None


def _host_logprobs(lp: tuple[torch.Tensor, ...], targets: list[int]) -> list[TokenLogprobs]:
    chosen, top_ids, top_lps = (x.tolist() for x in lp)
    return to_token_logprobs(chosen, top_ids, top_lps, targets)
