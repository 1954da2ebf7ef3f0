"""POST /v1/chat/completions: messages through the model's chat template (sandboxed), streamed or not."""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from dsmoe.data.tokenizer import Tokenizer
from dsmoe.infer.chat_template import render_chat, stop_strings_for
from dsmoe.infer.sampling import TokenLogprobs
from dsmoe.serve.generation import AdmittedStream, run_choice, sse, until_disconnected
from dsmoe.serve.protocol import (APIError, ChatRequest, check_supported, parse_request, sampling_params,
                                  stop_strings)


def chat_prompt(req: ChatRequest, tokenizer: Tokenizer) -> list[int]:
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]
    template = tokenizer.chat_template
    text = render_chat(messages, template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    # a model's own template writes its special tokens (BOS) itself, as transformers' apply_chat_template assumes
    ids = tokenizer.encode(text, add_special_tokens=template is None)
    if not ids:
        raise APIError(400, "the conversation renders to an empty prompt", param="messages")
    return ids


def _logprob_entry(tokenizer: Tokenizer, token_id: int, logprob: float) -> dict:
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    return {"token": text, "logprob": logprob, "bytes": list(tokenizer.token_bytes(token_id))}


def _logprobs(tokenizer: Tokenizer, entries: list[TokenLogprobs]) -> list[dict]:
    return [{**_logprob_entry(tokenizer, e.token_id, e.logprob),
             "top_logprobs": [_logprob_entry(tokenizer, t, lp) for t, lp in e.top]} for e in entries]


async def chat_completions(request: Request, state) -> Response:
    req = await parse_request(request, ChatRequest, state.body_limits)
    state.check_model(req.model)
    check_supported(req)
    tokenizer = state.tokenizer
    stops = stop_strings(req) + list(stop_strings_for(tokenizer.chat_template))
    prompt_ids = await run_in_threadpool(chat_prompt, req, tokenizer)  # a long prompt must not stall the loop
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is None:  # the rest of the context; a prompt that fills it is the messages' fault
        if len(prompt_ids) >= state.max_model_len:
            raise APIError(400, f"this model's maximum context length is {state.max_model_len} tokens, but the "
                                f"messages take {len(prompt_ids)}: shorten them", param="messages",
                           code="context_length_exceeded")
        max_tokens = state.max_model_len - len(prompt_ids)
    params = sampling_params(req, max_tokens=max_tokens, prompt_len=len(prompt_ids),
                             max_model_len=state.max_model_len, vocab_size=state.vocab_size,
                             logprobs=(req.top_logprobs or 0) if req.logprobs else None)
    state.validate(prompt_ids, params)
    choice = run_choice(state.engine, tokenizer, prompt_ids, params, stops, state.metrics)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
    admission = state.admit(1)  # nothing that can fail between here and the response taking it over
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = _stream(head, choice, tokenizer, req.logprobs, len(prompt_ids), include_usage)
        return AdmittedStream(body, admission)
    try:
        result = await until_disconnected(request, _collect(choice))
    finally:
        admission.release()
    if result is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    text, finish, entries, count = result
    message = {"role": "assistant", "content": text}
    return JSONResponse({
        **head, "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": finish,
                     "logprobs": {"content": _logprobs(tokenizer, entries)} if req.logprobs else None}],
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": count,
                  "total_tokens": len(prompt_ids) + count},
    })


async def _collect(choice):
    text, finish, entries, count = "", None, [], 0
    async with aclosing(choice):
        async for delta in choice:
            text += delta.text
            entries += delta.logprobs
            count += len(delta.token_ids)
            finish = delta.finish_reason or finish
    return text, finish, entries, count


async def _stream(head, choice, tokenizer: Tokenizer, logprobs: bool, prompt_tokens: int, include_usage: bool):
    head = {**head, "object": "chat.completion.chunk"}

    def chunk(delta: dict, finish: str | None = None, lp: list | None = None) -> str:
        return sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                         "logprobs": {"content": lp} if lp is not None else None}]})

    yield chunk({"role": "assistant", "content": ""})
    count = 0
    async with aclosing(choice):
        async for delta in choice:
            count += len(delta.token_ids)
            lp = _logprobs(tokenizer, delta.logprobs) if logprobs else None
            if delta.text or lp:
                yield chunk({"content": delta.text}, lp=lp)
            if delta.finish_reason:
                yield chunk({}, delta.finish_reason)
    if include_usage:
        yield sse({**head, "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": count,
                                                   "total_tokens": prompt_tokens + count}})
