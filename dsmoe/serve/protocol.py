"""OpenAI wire format: request models, parameter checks, and the error every failure is reported as.

Requests are parsed strictly (a string is not a number, "yes" is not a boolean) but fields the OpenAI API
does not define are ignored, as vLLM does, so real clients that send extras keep working. OpenAI
parameters dsmoe does not implement are refused with a 400 naming them rather than silently ignored.
Error messages never quote the request body back (a huge input must not come back in the answer).
Text that no tokenizer can take (a lone UTF-16 surrogate such as "\\ud800", which JSON can spell, or a NUL
character) is refused with a 400 naming the field rather than replaced, so nothing is silently changed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect, Request

from dsmoe.errors import UserError
from dsmoe.infer.async_engine import EngineFailed, Overloaded

MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_STOP = 4  # stop strings, as OpenAI allows
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024
INT64 = 2**63


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with this HTTP status."""

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
             408: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
             422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, _clip(message, 600), param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def as_api_error(e: Exception) -> APIError:
    """The status a failure inside request handling maps to."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, UserError):
        return APIError(400, str(e), param=getattr(e, "param", None))
    if isinstance(e, Overloaded):
        return APIError(429, f"the server is busy ({e}); retry later", code="overloaded",
                        headers={"Retry-After": "1"})
    if isinstance(e, EngineFailed):
        return APIError(500, str(e))
    logging.getLogger(__name__).exception("unexpected error while handling a request", exc_info=e)
    return APIError(500, "internal server error")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class SamplingFields(OpenAIModel):
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=2 * INT64)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None
    # extensions with vLLM's names (the openai client sends them through extra_body)
    top_k: int | None = Field(None, ge=-1, lt=INT64)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    ignore_eos: bool = False


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = None
    suffix: str | None = None


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None


def check_text(data: Any) -> None:
    """400 naming the first string (value or key, anywhere in the body) that holds a lone surrogate or NUL."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            stack += [(key, path) for key in value] + [(v, f"{path}.{_clip(k, 40)}") for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, f"{path}.{i}") for i, v in enumerate(value)]
        elif isinstance(value, str):
            problem = "a NUL character" if "\x00" in value else None
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                problem = "a lone UTF-16 surrogate (such as \\ud800)"
            if problem:
                field = path.lstrip(".")
                raise APIError(400, f"invalid '{field}': the text contains {problem}; send valid Unicode "
                                    "without NUL characters", param=field.split(".")[0], code="invalid_text")


def parse_body(raw: bytes, model: type[OpenAIModel]) -> OpenAIModel:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    check_text(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise APIError(400, _describe(e), param=_loc(e.errors()[0]["loc"][:1])) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None


@dataclass(frozen=True)
class BodyLimits:
    """How much of a request body the server reads, and for how long. Past `max_bytes` the answer is 413,
    but only after reading (and dropping) up to `drain_bytes` more, so that clients which send the whole
    body before reading the answer (urllib, requests, the openai client) read the 413 instead of a
    connection reset; a client that sent `Expect: 100-continue` never sends the body and gets it at once."""
    max_bytes: int = 2 * 1024 * 1024
    timeout_s: float = 30.0  # the whole body, from the end of the headers (slow senders get 408)
    drain_bytes: int = 64 * 1024 * 1024


async def read_json_body(request: Request, limits: BodyLimits) -> bytes:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, "the request body must be JSON sent with Content-Type: application/json")
    try:
        async with asyncio.timeout(limits.timeout_s):
            return await _read_capped(request, limits)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {limits.timeout_s:g} s",
                       code="request_timeout", headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending the request") from None


async def _read_capped(request: Request, limits: BodyLimits) -> bytes:
    too_large = APIError(413, f"the request body is larger than the server's limit of {limits.max_bytes} bytes",
                         code="request_too_large", headers={"Connection": "close"})
    stream = request.stream()
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_bytes:
        if request.headers.get("expect", "").lower() != "100-continue":
            await _drain(stream, limits.drain_bytes)
        raise too_large
    chunks, size = [], 0
    async for chunk in stream:  # counted as it arrives: a body without Content-Length too
        size += len(chunk)
        if size > limits.max_bytes:
            await _drain(stream, limits.drain_bytes)
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(stream, limit: int) -> None:
    """Read and drop the rest of a refused body, up to `limit` bytes (then the connection is closed)."""
    dropped = 0
    async for chunk in stream:
        dropped += len(chunk)
        if dropped > limit:
            return


async def parse_request(request: Request, model: type[OpenAIModel], limits: BodyLimits) -> OpenAIModel:
    return parse_body(await read_json_body(request, limits), model)


def _loc(loc: tuple) -> str:
    return ".".join(_clip(str(part), 40) for part in loc)


def _describe(e: ValidationError) -> str:
    errors = e.errors(include_input=False, include_url=False)
    # a union (prompt, stop, content) reports one error per alternative; the first says enough
    first = errors[0]
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"invalid '{_loc(first['loc'])}': {first['msg']}{more}"


def check_supported(req: SamplingFields) -> None:
    """400 naming every OpenAI parameter that is set to something dsmoe does not implement."""
    refused = []
    if req.n not in (None, 1):
        refused.append(("n", "dsmoe returns one choice per prompt; send the request again for more"))
    if getattr(req, "best_of", None) not in (None, 1):
        refused.append(("best_of", "not implemented"))
    if req.logit_bias:
        refused.append(("logit_bias", "not implemented"))
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0):
            refused.append((name, "not implemented; repetition_penalty is"))
    if getattr(req, "suffix", None):
        refused.append(("suffix", "insertion is not implemented"))
    if isinstance(req, ChatRequest):
        if req.tools or req.functions:
            refused.append(("tools", "tool calling is not implemented"))
        if req.tool_choice not in (None, "none", "auto") or req.function_call not in (None, "none", "auto"):
            refused.append(("tool_choice", "tool calling is not implemented"))
        if req.response_format and req.response_format.get("type") != "text":
            refused.append(("response_format", "only {'type': 'text'} is implemented"))
    if refused:
        names = ", ".join(name for name, _ in refused)
        why = "; ".join(f"{name}: {reason}" for name, reason in refused)
        raise APIError(400, f"unsupported parameter(s) {names} ({why})", param=refused[0][0],
                       code="unsupported_parameter")


def stop_strings(req: SamplingFields) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop strings are allowed, got {len(stops)}", param="stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop strings must be 1 to {MAX_STOP_CHARS} characters long", param="stop")
    return stops


def sampling_params(req: SamplingFields, *, max_tokens: int, prompt_len: int, max_model_len: int,
                    vocab_size: int, logprobs: int | None = None, prompt_logprobs: int | None = None):
    """The engine's SamplingParams for a request, after the checks the engine cannot phrase in API terms."""
    from dsmoe.infer.sampling import SamplingParams

    if prompt_len + max_tokens > max_model_len:
        raise APIError(400, f"this model's maximum context length is {max_model_len} tokens, but the prompt has "
                            f"{prompt_len} tokens and max_tokens is {max_tokens} ({prompt_len + max_tokens} in "
                            "all): shorten the prompt or lower max_tokens", param="max_tokens",
                       code="context_length_exceeded")
    stop_ids = tuple(req.stop_token_ids or ())
    if any(not 0 <= t < vocab_size for t in stop_ids):
        raise APIError(400, f"stop_token_ids must be token ids in 0..{vocab_size - 1}", param="stop_token_ids")
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_k=max(req.top_k or 0, 0),
        top_p=1.0 if req.top_p is None else req.top_p,
        repetition_penalty=req.repetition_penalty or 1.0,
        seed=req.seed,
        stop_token_ids=stop_ids,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )
