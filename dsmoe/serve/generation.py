"""Running choices for the HTTP handlers: text deltas with stop strings, several prompts at once, SSE framing
with the admission held until the stream ends, and cancellation when the client goes away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import StreamingResponse

from dsmoe.data.tokenizer import Tokenizer
from dsmoe.infer.async_engine import Admission, AsyncEngine
from dsmoe.infer.sampling import SamplingParams, TokenLogprobs
from dsmoe.infer.text import TextStream
from dsmoe.serve.metrics import ServerMetrics
from dsmoe.serve.protocol import as_api_error


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs]
    text_offset: int  # characters of generated text before this delta
    prompt_logprobs: list[TokenLogprobs | None] | None
    finish_reason: str | None


async def run_choice(engine: AsyncEngine, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
                     stop: list[str], metrics: ServerMetrics) -> AsyncIterator[Delta]:
    """One prompt's generation as text deltas; a stop string ends it with finish_reason "stop"."""
    stream = TextStream(tokenizer, prompt_ids, stop)
    emitted, finish = 0, None
    timer = metrics.start(len(prompt_ids))
    try:
        async with aclosing(engine.generate(prompt_ids, params)) as outputs:
            async for out in outputs:
                timer.tokens(len(out.token_ids))
                text = stream.push(out.token_ids, final=out.finish_reason is not None)
                finish = "stop" if stream.stopped else out.finish_reason  # a stop string on the last token too
                yield Delta(text, out.token_ids, out.logprobs or [], emitted, out.prompt_logprobs, finish)
                emitted += len(text)
                if finish:
                    return  # leaving `aclosing` cancels the engine request if it is still running (a stop string)
    finally:
        timer.finished(finish or "abort")  # a client gone or the engine failed: vLLM's "abort"


async def merge(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
    """Interleave several choices' deltas as they come, tagged with the choice index. Closing the merged
    iterator (or an error in one choice) cancels them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Delta]) -> None:
        try:
            async with aclosing(stream):
                async for delta in stream:
                    await queue.put((index, delta))
        except Exception as e:
            await queue.put((index, e))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnected(request: Request, work):
    """Await `work` (a coroutine), cancelling it if the client disconnects first (-> None)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return None
    finally:
        if not task.done():
            task.cancel()


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def event_stream(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """SSE body: the chunks, an error chunk if generation fails midway, and always `data: [DONE]`."""
    try:
        async with aclosing(chunks):
            async for chunk in chunks:
                yield chunk
    except Exception as e:  # headers are sent already: report in-band, as vLLM does
        yield sse(as_api_error(e).body())
    yield sse("[DONE]")


class AdmittedStream(StreamingResponse):
    """An SSE response holding its requests' admission until the response has ended, however it ends (the
    last byte sent, the client gone, or the body never started). It closes its body itself: starlette leaves a
    body cut off mid-send (suspended at a `yield`) to garbage collection, and closing it is what cancels the
    engine requests."""

    def __init__(self, chunks: AsyncIterator[str], admission: Admission):
        super().__init__(event_stream(chunks), media_type="text/event-stream")
        self.admission = admission

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self.admission.release()
