"""The engine on its own thread, with an asyncio face for servers.

One thread owns the Engine (and the GPU): it takes new requests and cancellations from a queue, runs
steps while there is work, and hands each output to the asyncio loop of the request that asked. A
consumer that stops iterating (a client that went away) cancels its request, which frees the slot at
the next step. Admission control is here too: `admit` reserves places before a request is answered at all
(a server calls it before sending any header), and past `max_running + max_waiting` places it raises
Overloaded (the server answers 429) instead of queueing without bound. It runs on the asyncio loop's thread
with no await between the check and the count, so concurrent requests cannot both take the last place.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator

from dsmoe.infer.engine import Engine, StepOutput
from dsmoe.infer.sampling import SamplingParams

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """Too many requests in flight; retry later."""


class EngineFailed(Exception):
    """The engine raised while running this request (a server-side failure, not the request's fault)."""


class Admission:
    """`places` requests counted in flight from admission until `release` (idempotent): a server holds it
    until its response has ended, so the count covers requests whose headers are sent but whose generation
    has not started yet."""

    def __init__(self, engine: "AsyncEngine", places: int):
        self._engine, self.places = engine, places

    def release(self) -> None:
        self._engine.in_flight -= self.places
        self.places = 0


class AsyncEngine:
    def __init__(self, engine: Engine, max_waiting: int = 256):
        self.engine = engine
        self.max_in_flight = engine.max_batch + max_waiting
        self.in_flight = 0  # admitted places; touched only on the asyncio loop's thread
        self.cancelled = 0  # requests closed before the engine finished them: a client gone, or a stop string matched
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, object] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="dsmoe-engine", daemon=True)

    def start(self) -> "AsyncEngine":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        return {"running": self.engine.num_running(), "waiting": self.engine.num_waiting(),
                "in_flight": self.in_flight, "cancelled": self.cancelled}

    def admit(self, places: int = 1) -> Admission:
        """Reserve `places` requests (call on the asyncio loop's thread); raises Overloaded past the limit."""
        if self.in_flight + places > self.max_in_flight:
            raise Overloaded(f"{self.in_flight} requests are in flight, the limit is {self.max_in_flight}")
        self.in_flight += places
        return Admission(self, places)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises UserError (RequestError naming the parameter where one is at fault) for a request the engine
        cannot run. `generate` checks too, but only once iterated: a server calls this before admitting."""
        self.engine.validate(prompt_ids, params)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StepOutput]:
        """Outputs of one request until it finishes (admission, if wanted, is the caller's: `admit`). Raises
        UserError (bad request: checked before anything is queued) or EngineFailed. Closing the iterator
        early cancels the request."""
        self.validate(prompt_ids, params)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        rid = uuid.uuid4().hex

        def sink(item) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(outputs.put_nowait, item)

        finished = False
        self._submit(("add", rid, prompt_ids, params, sink))
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.cancelled += 1
                self._submit(("cancel", rid))

    def _submit(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        while True:
            self._apply_commands()
            if not self.engine.has_work():
                if self._stopping:
                    return
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # keep serving: fail the requests in flight, start clean
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(EngineFailed(f"the engine failed: {type(e).__name__}"))
                continue
            for out in outputs:
                sink = self._sinks.get(out.request_id)
                if sink is not None:
                    if out.finish_reason is not None:
                        del self._sinks[out.request_id]
                    sink(out)

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, rid, prompt_ids, params, sink = command
                try:
                    self.engine.add_request(prompt_ids, params, request_id=rid)
                    self._sinks[rid] = sink
                except Exception as e:  # validated before, so only a race with a config change lands here
                    sink(e)
            else:
                self._sinks.pop(command[1], None)
                self.engine.cancel(command[1])

    def _fail_all(self, error: Exception) -> None:
        for rid, sink in list(self._sinks.items()):
            sink(error)
        self._sinks.clear()
        self.engine.abort_all()
