"""Limits that hold under concurrency and against hostile clients: admission decided before any response
byte, text no tokenizer takes, slow headers and bodies (408), oversized bodies whose 413 plain clients read."""

import asyncio
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import httpx
import openai
import pytest

MAX_BATCH, MAX_QUEUE, TIMEOUT = 2, 2, 1.0
LONG = {"model": "tiny", "prompt": "def ", "max_tokens": 120, "temperature": 0, "ignore_eos": True, "stream": True}
BIG = json.dumps({"model": "tiny", "prompt": "A" * 12_000_000}).encode()  # 12 MB, the default limit is 2 MiB


@pytest.fixture(scope="module")
def server(model_dir, serve, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with serve(model_dir, log, "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE),
                        "--max-model-len", "512", "--header-timeout", str(TIMEOUT),
                        "--body-timeout", str(TIMEOUT)) as s:
        yield s


def test_admission_is_decided_before_any_response_byte(server):
    extra = 3
    results = []

    async def one(client):
        async with client.stream("POST", "/v1/completions", json=LONG) as r:
            if r.status_code != 200:
                await r.aread()
                results.append((r.status_code, r.headers.get("retry-after"), r.json()["error"]["code"]))
                return
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            results.append((200, lines[-1], any('"error"' in line for line in lines)))

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            await asyncio.gather(*(one(client) for _ in range(MAX_BATCH + MAX_QUEUE + extra)))

    asyncio.run(all_at_once())
    served = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] != 200]
    assert len(served) == MAX_BATCH + MAX_QUEUE and all(r[1:] == ("data: [DONE]", False) for r in served)
    assert refused == [(429, "1", "overloaded")] * extra  # refused before the headers, never inside a stream
    server.wait_idle()


TEXT_FIELDS = [  # (endpoint, body with X where the bad text goes, the field the error names)
    ("/v1/completions", {"prompt": "X"}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "X"]}, "prompt.1"),
    ("/v1/completions", {"prompt": "ok", "stop": ["X"]}, "stop.0"),
    ("/v1/completions", {"prompt": "ok", "model": "X"}, "model"),
    ("/v1/completions", {"prompt": "ok", "user": "X"}, "user"),
    ("/v1/completions", {"prompt": "ok", "suffix": "X"}, "suffix"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "X"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "X"}]}]},
     "messages.0.content.0.text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ok", "name": "X"}]}, "messages.0.name"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ok"}], "stop": "X"}, "stop"),
]


@pytest.mark.parametrize("bad", ["\ud800", "ab\udfffcd", "a\x00b"], ids=["lone high surrogate", "lone low", "NUL"])
@pytest.mark.parametrize("path,template,field", TEXT_FIELDS, ids=[f[2] for f in TEXT_FIELDS])
def test_bad_text_in_any_field_is_a_400_naming_it(server, path, template, field, bad):
    body = json.dumps(template).replace('"X"', json.dumps(bad))  # json.dumps spells them as \ud800, \u0000
    r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_text" and error["param"] == field.split(".")[0]
    assert f"'{field}'" in error["message"]


def read_answer(sock: socket.socket) -> bytes:
    sock.settimeout(20 * TIMEOUT)  # generous: a server without the deadline never answers at all
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slow_headers_get_408_and_the_connection_closes(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # ...and the rest never comes
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


def test_slow_body_gets_408_and_the_connection_closes(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


def test_a_kept_alive_connection_still_works_within_the_deadlines(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:  # one connection, two requests
        for _ in range(2):
            time.sleep(TIMEOUT * 1.5)  # idle longer than the header deadline: the keep-alive timer rules here
            r = http.post("/v1/completions", json={"model": "tiny", "prompt": "def ", "max_tokens": 2})
            assert r.status_code == 200


def test_oversized_body_413_is_read_by_urllib(server):
    request = urllib.request.Request(server.url + "/v1/completions", data=BIG,
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 413 and json.loads(caught.value.read())["error"]["code"] == "request_too_large"


def test_oversized_body_413_is_read_by_the_openai_client(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model="tiny", prompt="A" * 12_000_000, max_tokens=1)
    assert caught.value.status_code == 413


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("expect", ["Expect: 100-continue", "Expect:"], ids=["expect-continue", "no-expect"])
def test_oversized_body_413_is_read_by_curl(server, tmp_path, expect):
    body = tmp_path / "big.json"
    body.write_bytes(BIG)
    out = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "-H", "Content-Type: application/json",
                          "-H", expect, "--data-binary", f"@{body}", server.url + "/v1/completions"],
                         capture_output=True, timeout=60, text=True)
    text, status = out.stdout.rsplit("\n", 1)
    assert status == "413" and json.loads(text)["error"]["code"] == "request_too_large"


def test_server_is_still_up_and_clean(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "def ", "max_tokens": 3},
                   timeout=30)
    assert r.status_code == 200 and server.proc.poll() is None
    assert "Traceback" not in server.log.read_text()
