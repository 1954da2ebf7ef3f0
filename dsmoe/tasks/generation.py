"""Generation of many prompts at once through the continuous-batching engine, each ending at a stop
string (checked on the decoded text, as `dsmoe generate` and the server do) or after max_new_tokens."""

from __future__ import annotations

from dsmoe.infer import Engine, SamplingParams
from dsmoe.infer.loading import eos_ids
from dsmoe.infer.text import TextStream


def generate_texts(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, stop: list[str],
                   max_batch: int = 16, cuda_graphs: bool = True, temperature: float = 0.0,
                   seed: int = 0, engine: Engine | None = None) -> list[str]:
    """The generated text of each prompt (prompt excluded, stop string and what follows it dropped).
    max_batch engine slots run concurrently; 1 generates one prompt at a time. Greedy unless temperature > 0
    (then seeded per prompt, so a rerun gives the same text). An idle `engine` passed in is reused (its
    CUDA graphs are captured once for every call; see make_engine); else one is built for these prompts."""
    if not prompts:
        return []
    if engine is None:
        longest = max(len(p) for p in prompts) + max_new_tokens
        engine = make_engine(model, tokenizer, max_batch=max_batch, max_model_len=longest, cuda_graphs=cuda_graphs)
    streams, texts = {}, {}
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i)
        rid = engine.add_request(prompt, params, request_id=str(i))
        streams[rid], texts[rid] = TextStream(tokenizer, prompt, stop), []
    while engine.has_work():
        for out in engine.step():
            stream = streams[out.request_id]
            texts[out.request_id].append(stream.push(out.token_ids, final=out.finish_reason is not None))
            if stream.stopped and out.finish_reason is None:
                engine.cancel(out.request_id)
    return ["".join(texts[str(i)]) for i in range(len(prompts))]


def make_engine(model, tokenizer, *, max_batch: int, max_model_len: int | None = None,
                cuda_graphs: bool = True) -> Engine:
    return Engine(model, max_batch=max_batch, max_model_len=max_model_len, eos_token_ids=eos_ids(model, tokenizer),
                  cuda_graphs=cuda_graphs)
