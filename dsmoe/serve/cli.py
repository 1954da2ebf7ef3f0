"""`dsmoe serve PATH`: the OpenAI-compatible HTTP server (uvicorn) over the continuous-batching engine.

SIGTERM (or Ctrl-C) drains: the listening socket closes, requests that arrive on open connections get 503,
requests in flight run to their end, then the engine stops and the process exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

import uvicorn  # this module is imported only when `dsmoe serve` runs

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dsmoe.infer.loading import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (cache slots)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="prompt + generated tokens per request (default: min(4096, the model's maximum))")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests waiting for a slot before new ones get 429")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled per step")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step (faster decode; each batch/length bucket compiles once)")
    parser.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024, help="request body limit (413 past it)")
    parser.add_argument("--model-name", default=None, help="name clients send as `model` (default: the folder name)")
    parser.add_argument("--drain-timeout", type=float, default=60.0,
                        help="seconds SIGTERM waits for requests in flight before closing them")


def run(args: argparse.Namespace) -> int:
    from dsmoe.errors import UserError
    from dsmoe.infer.async_engine import AsyncEngine
    from dsmoe.infer.engine import Engine
    from dsmoe.infer.loading import eos_ids, load_for_inference
    from dsmoe.serve.app import ServerState, create_app

    for name in ("max_batch", "max_queue", "prefill_chunk", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    model, tokenizer, _ = load_for_inference(args)
    eos = eos_ids(model, tokenizer)
    engine = Engine(model, max_batch=args.max_batch, max_model_len=args.max_model_len,
                    prefill_chunk=args.prefill_chunk, eos_token_ids=eos, cuda_graphs=not args.no_cuda_graphs,
                    compile=args.compile)
    name = args.model_name or Path(args.path).resolve().name
    state = ServerState(AsyncEngine(engine, max_waiting=args.max_queue).start(), tokenizer, name, eos,
                        max_body_bytes=args.max_body_bytes)
    config = uvicorn.Config(create_app(state), host=args.host, port=args.port, log_level="info",
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
