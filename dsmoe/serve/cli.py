"""`dsmoe serve PATH`: the OpenAI-compatible HTTP server (uvicorn) over the continuous-batching engine.

SIGTERM (or Ctrl-C) drains: the listening socket closes, requests that arrive on open connections get 503,
requests in flight run to their end, then the engine stops and the process exits 0.

Slow clients cannot hold the server (or a drain) open: a request's headers must arrive within
--header-timeout seconds of the connection opening (or of the previous response on a kept-alive
connection), its body within --body-timeout seconds of the headers; either answers 408 and closes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from pathlib import Path

import uvicorn  # this module is imported only when `dsmoe serve` runs
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dsmoe.infer.loading import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (cache slots)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="prompt + generated tokens per request (default: min(4096, the model's maximum))")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests waiting for a slot before new ones get 429")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled per step")
    parser.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024, help="request body limit (413 past it)")
    parser.add_argument("--header-timeout", type=float, default=10.0,
                        help="seconds for a request's headers to arrive (408 and close past it)")
    parser.add_argument("--body-timeout", type=float, default=30.0,
                        help="seconds for a request's body to arrive after its headers (408 and close past it)")
    parser.add_argument("--model-name", default=None, help="name clients send as `model` (default: the folder name)")
    parser.add_argument("--drain-timeout", type=float, default=60.0,
                        help="seconds SIGTERM waits for requests in flight before closing them")


def run(args: argparse.Namespace) -> int:
    from dsmoe.infer.async_engine import AsyncEngine
    from dsmoe.infer.engine import Engine
    from dsmoe.infer.loading import check_at_least_one, eos_ids, load_for_inference, speculative_options
    from dsmoe.serve.app import ServerState, create_app
    from dsmoe.serve.protocol import BodyLimits

    check_at_least_one(args, ("max_batch", "max_queue", "prefill_chunk", "max_model_len", "max_body_bytes",
                              "header_timeout", "body_timeout"))
    model, tokenizer, _ = load_for_inference(args)
    eos = eos_ids(model, tokenizer)
    engine = Engine(model, max_batch=args.max_batch, max_model_len=args.max_model_len,
                    prefill_chunk=args.prefill_chunk, eos_token_ids=eos, cuda_graphs=not args.no_cuda_graphs,
                    compile=args.compile, **speculative_options(args))
    if engine.device.type == "cuda":  # else there is nothing to autotune, compile or capture
        started = time.perf_counter()
        engine.warm_up()
        log.info("warmed up every step shape in %.1f s", time.perf_counter() - started)
    name = args.model_name or Path(args.path).resolve().name
    limits = BodyLimits(max_bytes=args.max_body_bytes, timeout_s=args.body_timeout)
    state = ServerState(AsyncEngine(engine, max_waiting=args.max_queue).start(), tokenizer, name, eos,
                        body_limits=limits)
    protocol = type("H11WithHeaderTimeout", (HeaderTimeoutProtocol,), {"header_timeout": args.header_timeout})
    config = uvicorn.Config(create_app(state), host=args.host, port=args.port, log_level="info", http=protocol,
                            timeout_graceful_shutdown=args.drain_timeout)
    server = DrainingServer(config, state)
    log.info("serving %s as '%s' on http://%s:%d/v1 (max batch %d, max model len %d)", args.path, name,
             args.host, args.port, args.max_batch, engine.max_model_len)
    server.run()
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app to refuse new work the moment a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.dsmoe_state = state

    def handle_exit(self, sig, frame) -> None:
        self.dsmoe_state.draining = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            # uvicorn re-raises the signal after shutting down; a drained shutdown is a clean exit (status 0)
            self._captured_signals.clear()


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on receiving a request's headers, which uvicorn lacks (its
    keep-alive timer stops at the first byte, so a client sending a byte a second holds the connection)."""

    header_timeout = 10.0
    RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n%s")
    BODY = (b'{"error": {"message": "the request headers did not arrive in time", "type": "invalid_request_error", '
            b'"param": null, "code": "request_timeout"}}')

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self._awaiting_headers():  # the next request on a kept-alive connection
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)
        super().data_received(data)
        if self._header_timer is not None and not self._awaiting_headers():
            self._header_timer.cancel()
            self._header_timer = None

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _awaiting_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._awaiting_headers() and not self.transport.is_closing():
            self.transport.write(self.RESPONSE % (len(self.BODY), self.BODY))
            self.transport.close()
