"""`generate`: token ids in, token ids out, for a list of prompts batched through the engine."""

from __future__ import annotations

from dsmoe.infer.engine import Engine
from dsmoe.infer.sampling import SamplingParams


def generate(model, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], *,
             max_batch: int | None = None, max_model_len: int | None = None, prefill_chunk: int = 512,
             eos_token_ids: tuple[int, ...] | list[int] = (), cuda_graphs: bool = True,
             overlap: bool | None = None, speculative: str | None = None,
             num_speculative_tokens: int = 1) -> list[list[int]]:
    """New token ids for each prompt (prompt excluded), stopping at eos / stop ids or max_new_tokens.
    All prompts run concurrently in one engine (continuous batching with `max_batch` slots)."""
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    if len(per_prompt) != len(prompts):
        raise ValueError(f"{len(per_prompt)} sampling parameter sets for {len(prompts)} prompts")
    if not prompts:
        return []
    longest = max(len(p) + sp.max_new_tokens for p, sp in zip(prompts, per_prompt))
    engine = Engine(model, max_batch=len(prompts) if max_batch is None else max_batch,
                    max_model_len=longest if max_model_len is None else max_model_len,
                    prefill_chunk=prefill_chunk, eos_token_ids=eos_token_ids, cuda_graphs=cuda_graphs,
                    overlap=overlap, speculative=speculative, num_speculative_tokens=num_speculative_tokens)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, per_prompt)]
    out: dict[str, list[int]] = {rid: [] for rid in ids}
    while engine.has_work():
        for step in engine.step():
            out[step.request_id] += step.token_ids
    return [out[rid] for rid in ids]
