"""Malformed and hostile requests: each gets a 4xx in the OpenAI error shape, never a 500, never an echo of a
large input; the server keeps answering normal requests."""

import json

import httpx
import pytest

BIG = "A" * 10_000_000
JSON = {"content-type": "application/json"}


def body(obj) -> dict:
    return {"content": json.dumps(obj), "headers": JSON}


def raw(data: bytes | str) -> dict:
    return {"content": data, "headers": JSON}


def chunked_big():  # no Content-Length: the server must cap the body while reading it
    yield b'{"prompt": "'
    for _ in range(40):
        yield b"B" * 250_000
    yield b'"}'


C, CHAT = "/v1/completions", "/v1/chat/completions"
CASES = [
    ("invalid json", C, raw(b'{"prompt": "x",'), 400, None),
    ("json array body", C, raw(b"[1, 2]"), 400, None),
    ("json string body", C, raw(b'"hello"'), 400, None),
    ("empty body", C, raw(b""), 400, None),
    ("not utf-8", C, raw(b'{"prompt": "\xff\xfe"}'), 400, None),
    ("form content type", C, {"content": "prompt=x", "headers": {"content-type": "application/x-www-form-urlencoded"}},
     415, None),
    ("text content type", C, {"content": '{"prompt": "x"}', "headers": {"content-type": "text/plain"}}, 415, None),
    ("10 MB body", C, body({"model": "tiny", "prompt": BIG}), 413, None),
    ("10 MB chunked body", C, {"content": chunked_big(), "headers": JSON}, 413, None),
    ("missing prompt", C, body({"model": "tiny"}), 400, "prompt"),
    ("prompt is an object", C, body({"prompt": {"a": 1}}), 400, "prompt"),
    ("negative max_tokens", C, body({"prompt": "x", "max_tokens": -1}), 400, "max_tokens"),
    ("huge max_tokens", C, body({"prompt": "x", "max_tokens": 10**12}), 400, "max_tokens"),
    ("max_tokens as text", C, body({"prompt": "x", "max_tokens": "ten"}), 400, "max_tokens"),
    ("negative temperature", C, body({"prompt": "x", "temperature": -0.5}), 400, "temperature"),
    ("NaN temperature", C, raw(b'{"prompt": "x", "temperature": NaN}'), 400, "temperature"),
    ("top_p zero", C, body({"prompt": "x", "top_p": 0}), 400, "top_p"),
    ("top_p above one", C, body({"prompt": "x", "top_p": 1.5}), 400, "top_p"),
    ("unknown model", C, body({"model": "gpt-9" * 1000, "prompt": "x"}), 404, "model"),
    ("token id past the vocabulary", C, body({"prompt": [5, 999999]}), 400, "prompt"),
    ("negative token id", C, body({"prompt": [-1]}), 400, "prompt"),
    ("negative token id nested", C, body({"prompt": [[3], [-1]]}), 400, "prompt"),
    ("enormous token id", C, body({"prompt": [10**40]}), 400, "prompt"),
    ("prompt past the context", C, body({"prompt": "def f(x): return x\n" * 60, "max_tokens": 1}), 400, "max_tokens"),
    ("empty token list", C, body({"prompt": [[]]}), 400, "prompt"),
    ("empty prompt list", C, body({"prompt": []}), 400, "prompt"),
    ("too many prompts", C, body({"prompt": ["x"] * 65}), 400, "prompt"),
    ("logprobs too many", C, body({"prompt": "x", "logprobs": 100}), 400, "logprobs"),
    ("five stop strings", C, body({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}), 400, "stop"),
    ("empty stop string", C, body({"prompt": "x", "stop": [""]}), 400, "stop"),
    ("seed out of range", C, body({"prompt": "x", "seed": 10**30}), 400, "seed"),
    ("top_k past int64", C, body({"prompt": "x", "top_k": 10**20}), 400, "top_k"),  # was an engine failure
    ("stream as text", C, body({"prompt": "x", "stream": "yes"}), 400, "stream"),
    ("stop token id past the vocabulary", C, body({"prompt": "x", "stop_token_ids": [10**6]}), 400, "stop_token_ids"),
    ("huge logit_bias key", C, body({"prompt": "x", "logit_bias": {"9" * 100_000: 5}}), 400, "logit_bias"),
    ("deeply nested json", C, raw(b"[" * 200_000 + b"]" * 200_000), 400, None),
    ("5000-digit number", C, raw(b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"), 400, None),
    ("chat without messages", CHAT, body({"model": "tiny"}), 400, "messages"),
    ("chat with empty messages", CHAT, body({"messages": []}), 400, "messages"),
    ("chat with an unknown role", CHAT, body({"messages": [{"role": "wizard", "content": "x"}]}), 400, "messages"),
    ("chat with an image part", CHAT,
     body({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
     400, "messages"),
    ("chat max_tokens zero", CHAT, body({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
     400, "max_tokens"),
    ("chat message past the context", CHAT,
     body({"messages": [{"role": "user", "content": "word " * 2000}]}), 400, "messages"),
    ("chat with tools", CHAT,
     body({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}), 400, "tools"),
]


@pytest.fixture(scope="module")
def server(model_dir, serve, tmp_path_factory):
    with serve(model_dir, tmp_path_factory.mktemp("log") / "serve.log") as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.mark.parametrize("name,path,request_kwargs,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_an_openai_error(http, name, path, request_kwargs, status, param):
    r = http.post(path, **request_kwargs)
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert len(r.content) < 1200  # never echoes a large input back
    if param is not None:
        assert error["param"] == param


def test_wrong_method_and_route(http):
    for r in (http.get("/v1/completions"), http.post("/v1/nowhere", json={}), http.delete("/v1/models"),
              http.post("/v1/completions/", json={})):  # a trailing slash: an error, not a redirect without a body
        assert 400 <= r.status_code < 500 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_server_still_answers_normal_requests(http, server):
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "def ", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4  # sampled: eos could come first
    assert server.proc.poll() is None
    assert "Traceback" not in server.log.read_text()
    server.wait_idle()
