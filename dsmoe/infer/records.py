"""The engine's records: a request and what a step returns for it, a launched step whose tokens are still on
their way to the host, and the per-slot device buffers the decode step reads."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsmoe.infer.sampling import SamplingParams, TokenLogprobs


@dataclass
class StepOutput:
    request_id: str
    token_ids: list[int]  # new tokens (zero or one per step; up to N+1 with speculative decoding)
    logprobs: list[TokenLogprobs] | None  # one per new token when the request asked for logprobs
    prompt_logprobs: list[TokenLogprobs | None] | None  # once, in the request's first output; [0] is None
    finish_reason: str | None  # None while running, then "stop" (a stop token) or "length"


@dataclass
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    launched: int = 0  # generated tokens whose computation has been launched (speculative: a lower bound)
    next_pos: int = 0  # position of the next decode input token (an upper bound while speculative steps are in flight)
    in_flight: int = 0  # speculative steps launched and not yet read back
    output: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finished: str | None = None
    reported_prompt: bool = False
    stop_ids: frozenset[int] = frozenset()


@dataclass
class Launched:
    """A step whose tokens are still on their way to the host."""

    rows: list[tuple[int, Request]]  # (row of the token tensor, request)
    tokens: torch.Tensor  # host copy
    logprobs: tuple[torch.Tensor, ...] | None
    event: torch.cuda.Event | None
    counts: torch.Tensor | None = None  # speculative steps: tokens emitted per row (tokens is then (B, N+1))


class SlotState:
    """Per-slot device buffers: the next decode input and the sampling parameters of the slot's request."""

    def __init__(self, num_slots: int, trash: int, device: torch.device):
        def full(value, dtype):
            return torch.full((num_slots,), value, dtype=dtype, device=device)

        self.input_ids = full(0, torch.int64)
        self.positions = full(trash, torch.int64)
        self.temperature = full(0.0, torch.float32)
        self.top_k = full(0, torch.int64)
        self.top_p = full(1.0, torch.float32)
        self.penalty = full(1.0, torch.float32)
        self.seed = full(0, torch.int64)
        self.seen: torch.Tensor | None = None  # (slots, V) bool, allocated once a request uses a penalty
