"""Server lifecycle: a client that disconnects frees its slot, a full queue answers 429, SIGTERM drains the
requests in flight and exits 0."""

import asyncio
import json
import signal
import time
from contextlib import ExitStack
from types import SimpleNamespace

import httpx
import pytest
from starlette.requests import ClientDisconnect

from dsmoe.infer.async_engine import Admission
from dsmoe.serve import chat, completions
from dsmoe.serve.generation import AdmittedStream, Delta
from dsmoe.serve.protocol import ChatRequest, CompletionRequest

# 500 decode steps of the tiny model take about a second or more on a CPU: long enough to act mid-way
LONG = {"model": "tiny", "prompt": "def ", "max_tokens": 500, "temperature": 0, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server(model_dir, serve, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with serve(model_dir, log, "--max-batch", "2", "--max-queue", "1", "--max-model-len", "512") as s:
        yield s


def data_lines(response):
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[len("data: "):]


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def aborted(server) -> float:
    """dsmoe:request_success_total{finished_reason="abort"} as /metrics shows it (0 before the first)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("dsmoe:request_success_total{") and 'finished_reason="abort"' in line)


def test_streaming_client_disconnect_cancels_its_request(server):
    before, aborted_before = server.stats()["cancelled"], aborted(server)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=LONG) as r:
            lines = data_lines(r)
            next(lines), next(lines)
            assert server.stats()["running"] == 1
    wait_for(lambda: server.stats()["cancelled"] == before + 1)
    stats = server.wait_idle(timeout=5)
    assert stats["running"] == 0
    wait_for(lambda: aborted(server) == aborted_before + 1)  # counted as vLLM counts it


def test_streaming_client_disconnect_cancels_every_prompt_of_its_request(server):
    before = server.stats()["cancelled"]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "prompt": ["def ", "class "]}) as r:
            lines = data_lines(r)
            next(lines), next(lines), next(lines)
            assert server.stats()["running"] == 2
    wait_for(lambda: server.stats()["cancelled"] == before + 2)
    assert server.wait_idle(timeout=5)["running"] == 0


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_a_response_cut_off_while_sending_closes_its_choices_before_it_returns(endpoint):
    """A client gone while a chunk is being sent (the body suspended at a `yield`, not waiting for a token): the
    response closes its body, and with it every prompt's generation (which cancels the engine request), before it
    returns, rather than whenever garbage collection gets to the generators."""
    closed = []

    async def choice(i: int):
        try:
            while True:
                yield Delta("x", [1], [], 0, None, None)
                await asyncio.sleep(0)
        finally:
            closed.append(i)

    if endpoint == "completions":
        req = CompletionRequest.model_validate({"prompt": ["a", "b"]})
        body = completions._stream({}, [choice(0), choice(1)], [([1], None)] * 2, ["", ""], req, None, 2, False)
    else:
        req = ChatRequest.model_validate({"messages": [{"role": "user", "content": "a"}]})
        body = chat._stream({}, choice(0), None, False, 1, False)
    engine = SimpleNamespace(in_flight=2)
    response = AdmittedStream(body, Admission(engine, 2))
    sent = []

    async def send(message):
        sent.append(message)
        if len(sent) == 4:
            raise OSError("connection reset")  # uvicorn (ASGI 2.4) raising from a send to a closed connection

    async def receive():
        await asyncio.sleep(60)

    async def cut_off():
        with pytest.raises(ClientDisconnect):
            await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)
        return sorted(closed)

    assert asyncio.run(cut_off()) == ([0, 1] if endpoint == "completions" else [0])
    assert engine.in_flight == 0


def test_non_streaming_client_disconnect_cancels_its_request(server):
    before = server.stats()["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**LONG, "stream": False}, timeout=0.3)
    wait_for(lambda: server.stats()["cancelled"] == before + 1)
    server.wait_idle(timeout=5)


def test_full_queue_answers_429(server):
    with ExitStack() as stack, httpx.Client(base_url=server.url, timeout=30) as http:
        for _ in range(3):  # 2 slots + 1 queue place
            r = stack.enter_context(http.stream("POST", "/v1/completions", json=LONG))
            assert r.status_code == 200
        wait_for(lambda: server.stats()["in_flight"] == 3)
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded"
        assert http.get("/health").json()["status"] == "ok"
    server.wait_idle()


def test_more_prompts_than_can_ever_be_admitted_is_a_400_naming_the_limit(server):
    """4 prompts at once never fit 2 slots + 1 queue place: retrying (429) would never help."""
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": ["a", "b", "c", "d"],
                                                         "max_tokens": 1}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "prompt" and "at most 3" in error["message"] and "--max-queue" in error["message"]
    assert server.stats()["in_flight"] == 0


def test_sigterm_drains_requests_in_flight_and_exits(server):
    request = {**LONG, "max_tokens": 60, "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=server.url, timeout=60) as http, http.stream("POST", "/v1/completions",
                                                                             json=request) as r:
        lines = data_lines(r)
        next(lines)
        server.proc.send_signal(signal.SIGTERM)
        rest = list(lines)
        time.sleep(0.3)
        try:
            refused = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, timeout=5).status_code == 503
        except httpx.TransportError:
            refused = True
    assert rest[-1] == "[DONE]"
    chunks = [json.loads(line) for line in rest[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 60
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert refused
    assert server.proc.wait(timeout=30) == 0
