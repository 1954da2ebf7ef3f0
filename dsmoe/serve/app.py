"""The FastAPI app: routes, the OpenAI error shape for every failure, admission, metrics, draining.

Every error a client can cause is an APIError with a 4xx status; anything else is a server bug and
answers 500 without details (the log has them). While draining (after SIGTERM), new requests get 503.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsmoe.data.tokenizer import Tokenizer
from dsmoe.errors import UserError
from dsmoe.infer.async_engine import Admission, AsyncEngine, Overloaded
from dsmoe.serve.metrics import ServerMetrics
from dsmoe.serve.protocol import APIError, BodyLimits, as_api_error

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: Tokenizer
    model_name: str
    eos_ids: tuple[int, ...]
    body_limits: BodyLimits = field(default_factory=BodyLimits)
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: ServerMetrics = field(init=False)

    def __post_init__(self):
        self.metrics = ServerMetrics(self.engine, self.model_name)

    def admit(self, places: int) -> Admission:
        """Places for a request's prompts, taken before any response header is sent (429 past the limit; 400
        for more prompts than the limit itself, which no retry would get admitted)."""
        limit, running = self.engine.max_in_flight, self.engine.engine.max_batch
        if places > limit:
            raise APIError(400, f"this request has {places} prompts but at most {limit} can be admitted at once "
                                f"(--max-batch {running} running + --max-queue {limit - running} waiting): send at "
                                f"most {limit} prompts per request, or start the server with a larger --max-queue",
                           param="prompt")
        try:
            return self.engine.admit(places)
        except Overloaded as e:
            self.metrics.rejected.inc()
            raise as_api_error(e) from None

    def validate(self, prompt_ids: list[int], params) -> None:
        """The engine's own checks of one prompt's request (say, no logprobs under --speculative), made before
        admission so that what it cannot run is a 400 before any header, never a 200 that fails later."""
        try:
            self.engine.validate(prompt_ids, params)
        except UserError as e:
            raise as_api_error(e) from None

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.engine.vocab_size

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model '{name[:100]}' does not exist; this server serves "
                                f"'{self.model_name}'", param="model", code="model_not_found")


class RefuseWhileDraining:
    """503 for new requests once a shutdown began (a plain ASGI middleware: it leaves `receive` alone, so
    handlers still see client disconnects)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.state.draining and scope["path"] not in ("/health", "/metrics"):
            error = APIError(503, "the server is shutting down", code="shutting_down")
            await JSONResponse(error.body(), status_code=503)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(state: ServerState) -> FastAPI:
    from dsmoe.serve.chat import chat_completions
    from dsmoe.serve.completions import completions

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.engine.stop()

    app = FastAPI(title="dsmoe", description="OpenAI-compatible server for DeepSeekMoE models", lifespan=lifespan,
                  redirect_slashes=False)  # a 307 has no error body for a client to read
    app.state.dsmoe = state

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        message = "no such route" if e.status_code == 404 else str(e.detail)
        return error_response(APIError(e.status_code, message))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return error_response(APIError(400, "invalid request"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        return error_response(as_api_error(e))

    app.add_middleware(RefuseWhileDraining, state=state)

    @app.get("/health")
    async def health():
        return {"status": "draining" if state.draining else "ok", **state.engine.stats()}

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "dsmoe",
                "max_model_len": state.max_model_len}

    @app.get("/metrics")
    async def metrics():
        body, content_type = state.metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        state.check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def _completions(request: Request):
        return await completions(request, state)

    @app.post("/v1/chat/completions")
    async def _chat(request: Request):
        return await chat_completions(request, state)

    return app
