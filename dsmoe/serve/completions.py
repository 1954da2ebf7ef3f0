"""POST /v1/completions (the OpenAI legacy API): prompts as text or token ids, echo, logprobs, streaming.

With `echo` and `logprobs`, the logprobs object covers the prompt tokens first (the first token has no
logprob: null, and null top_logprobs), then the generated ones, exactly as OpenAI's legacy completions do.
That is how lm-eval's `local-completions` model scores likelihood tasks: token-id prompts, echo: true,
logprobs: 1, max_tokens: 1, reading token_logprobs[ctxlen:-1].
"""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from dsmoe.data.tokenizer import Tokenizer
from dsmoe.infer.sampling import TokenLogprobs
from dsmoe.infer.text import IncrementalDecoder
from dsmoe.serve.generation import AdmittedStream, Delta, merge, run_choice, sse, until_disconnected
from dsmoe.serve.protocol import (MAX_PROMPTS, APIError, CompletionRequest, check_supported, parse_request,
                                  sampling_params, stop_strings)


def prompt_inputs(prompt, tokenizer: Tokenizer, vocab_size: int) -> list[tuple[list[int], str | None]]:
    """The four legacy prompt forms -> [(token ids, original text or None)]."""
    if isinstance(prompt, str):
        items = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "prompt is empty", param="prompt")
    if len(items) > MAX_PROMPTS:
        raise APIError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(items)}", param="prompt")
    out = []
    for item in items:
        ids = tokenizer.encode(item) if isinstance(item, str) else list(item)
        if not ids:
            raise APIError(400, "prompt is empty: give at least one token", param="prompt")
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            shown = str(bad) if len(str(bad)) <= 24 else str(bad)[:20] + "..."
            raise APIError(400, f"prompt token id {shown} is outside the vocabulary (0..{vocab_size - 1})",
                           param="prompt")
        out.append((ids, item if isinstance(item, str) else None))
    return out


class LegacyLogprobs:
    """The {tokens, token_logprobs, top_logprobs, text_offset} object of one choice."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def top(self, entry: TokenLogprobs) -> dict[str, float]:
        out: dict[str, float] = {}
        for token_id, lp in entry.top:
            key = self.piece(token_id)
            out[key] = max(lp, out.get(key, float("-inf")))
        return out

    def add_prompt(self, ids: list[int], logprobs: list[TokenLogprobs | None]) -> None:
        decoder, offset = IncrementalDecoder(self.tokenizer), 0
        for token_id, entry in zip(ids, logprobs):
            self.tokens.append(self.piece(token_id))
            self.token_logprobs.append(None if entry is None else entry.logprob)
            self.top_logprobs.append(None if entry is None else self.top(entry))
            self.text_offset.append(offset)
            offset += len(decoder.push([token_id]))

    def add_generated(self, delta: Delta, base_offset: int) -> None:
        for entry in delta.logprobs:
            self.tokens.append(self.piece(entry.token_id))
            self.token_logprobs.append(entry.logprob)
            self.top_logprobs.append(self.top(entry))
            self.text_offset.append(base_offset + delta.text_offset)

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


async def completions(request: Request, state) -> Response:
    req = await parse_request(request, CompletionRequest, state.body_limits)
    state.check_model(req.model)
    check_supported(req)
    stops = stop_strings(req)
    inputs = await run_in_threadpool(prompt_inputs, req.prompt, state.tokenizer, state.vocab_size)  # off the loop
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    echo_logprobs = req.logprobs if req.echo else None
    params = [sampling_params(req, max_tokens=max_tokens, prompt_len=len(ids), max_model_len=state.max_model_len,
                              vocab_size=state.vocab_size, logprobs=req.logprobs, prompt_logprobs=echo_logprobs)
              for ids, _ in inputs]
    for (ids, _), p in zip(inputs, params):
        state.validate(ids, p)
    echo_texts = [(text if text is not None else state.tokenizer.decode(ids)) if req.echo else ""
                  for ids, text in inputs]
    streams = [run_choice(state.engine, state.tokenizer, ids, p, stops, state.metrics)
               for (ids, _), p in zip(inputs, params)]
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name}
    prompt_tokens = sum(len(ids) for ids, _ in inputs)
    admission = state.admit(len(inputs))  # nothing that can fail between here and the response taking it over
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = _stream(head, streams, inputs, echo_texts, req, state.tokenizer, prompt_tokens, include_usage)
        return AdmittedStream(body, admission)
    try:
        choices = await until_disconnected(request, _collect(streams, inputs, echo_texts, req, state.tokenizer))
    finally:
        admission.release()
    if choices is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    completion_tokens = sum(c.pop("_tokens") for c in choices)
    return JSONResponse({**head, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)})


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _collect(streams, inputs, echo_texts, req: CompletionRequest, tokenizer: Tokenizer) -> list[dict]:
    texts = list(echo_texts)
    finish = [None] * len(streams)
    counts = [0] * len(streams)
    logprobs = [LegacyLogprobs(tokenizer) if req.logprobs is not None else None for _ in streams]
    async with aclosing(merge(streams)) as deltas:  # closing it cancels every prompt's request
        async for i, delta in deltas:
            lp = logprobs[i]
            if lp is not None:
                if delta.prompt_logprobs is not None and req.echo:
                    lp.add_prompt(inputs[i][0], delta.prompt_logprobs)
                lp.add_generated(delta, len(echo_texts[i]))
            texts[i] += delta.text
            counts[i] += len(delta.token_ids)
            finish[i] = delta.finish_reason or finish[i]
    return [{"index": i, "text": texts[i], "logprobs": None if logprobs[i] is None else logprobs[i].as_dict(),
             "finish_reason": finish[i], "_tokens": counts[i]} for i in range(len(streams))]


async def _stream(head, streams, inputs, echo_texts, req: CompletionRequest, tokenizer: Tokenizer,
                  prompt_tokens: int, include_usage: bool):
    started = [False] * len(streams)
    completion_tokens = 0
    async with aclosing(merge(streams)) as deltas:  # closing the response body cancels every prompt's request
        async for i, delta in deltas:
            text, lp = delta.text, None
            if req.logprobs is not None:
                lp = LegacyLogprobs(tokenizer)
                if not started[i] and req.echo and delta.prompt_logprobs is not None:
                    lp.add_prompt(inputs[i][0], delta.prompt_logprobs)
                lp.add_generated(delta, len(echo_texts[i]))
                lp = lp.as_dict()
            if not started[i]:
                text = echo_texts[i] + text
                started[i] = True
            completion_tokens += len(delta.token_ids)
            yield sse({**head, "choices": [{"index": i, "text": text, "logprobs": lp,
                                            "finish_reason": delta.finish_reason}]})
    if include_usage:
        yield sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
