"""The real `openai` client against a live `dsmoe serve` (tiny model, 127.0.0.1, a free port)."""

import asyncio

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from dsmoe.checkpoint.hf import load_pretrained
from dsmoe.data.tokenizer import Tokenizer
from dsmoe.infer.chat_template import render_chat
from dsmoe.infer.generate import generate
from dsmoe.infer.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def server(model_dir, serve, tmp_path_factory):
    with serve(model_dir, tmp_path_factory.mktemp("log") / "serve.log", "--max-batch", "16") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(model_dir):
    return load_pretrained(model_dir).eval(), Tokenizer.load(model_dir)


def greedy_text(local, prompt_ids, n):
    model, tok = local
    return tok.decode(generate(model, [prompt_ids], SamplingParams(max_new_tokens=n, temperature=0),
                               eos_token_ids=tok.eos_ids)[0])


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert server.stats()["status"] == "ok"


def test_completion_streamed_and_not(client, local):
    r = client.completions.create(model="tiny", prompt="def ", max_tokens=12, temperature=0)
    text = r.choices[0].text
    assert text == greedy_text(local, local[1].encode("def "), 12)
    assert r.usage.prompt_tokens == len(local[1].encode("def ")) and r.usage.completion_tokens == 12
    assert r.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="tiny", prompt="def ", max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[0].choices[0].finish_reason is None


def test_chat_streamed_and_not(client, local):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    model, tok = local
    prompt = tok.encode(render_chat(messages, tok.chat_template, bos_token=tok.bos_token), add_special_tokens=False)
    assert r.choices[0].message.content == greedy_text(local, prompt, 10)
    assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens == len(prompt)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10
    scored = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            logprobs=True, top_logprobs=2).choices[0]
    # OpenAI's bytes field: the token's own bytes, which join to the text even where a token splits a character
    # (a random model writes invalid UTF-8 too, which the text shows as U+FFFD)
    joined = b"".join(bytes(e.bytes) for e in scored.logprobs.content)
    assert joined.decode("utf-8", errors="replace") == scored.message.content


def test_prompt_forms(client, local):
    tok = local[1]
    ids = tok.encode("import os")
    single = [client.completions.create(model="tiny", prompt=p, max_tokens=5, temperature=0).choices[0].text
              for p in ("def ", "class ")]
    r = client.completions.create(model="tiny", prompt=["def ", "class "], max_tokens=5, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == single
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0).choices[0].text
    r = client.completions.create(model="tiny", prompt=[ids, tok.encode("def ")], max_tokens=5, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [by_ids, single[0]]


def test_echo_logprobs_cover_the_prompt_like_openai(client, local):
    model, tok = local
    ids = tok.encode("def main():")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=2, temperature=0, echo=True, logprobs=2)
    choice = r.choices[0]
    lp = choice.logprobs
    generated = generate(model, [ids], SamplingParams(max_new_tokens=2, temperature=0))[0]
    assert choice.text.startswith(tok.decode(ids))
    assert len(lp.tokens) == len(ids) + 2 == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    full = ids + generated
    with torch.no_grad():
        ref = model(torch.tensor([full]))[0].float().log_softmax(-1)
    for i in range(1, len(full)):
        assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, full[i]].item(), abs=1e-4)
        assert len(lp.top_logprobs[i]) <= 2
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert lp.tokens[0] == "<|bos|>" and lp.text_offset[1] == 0  # special tokens: listed, not in the text
    assert "".join(lp.tokens[1: len(ids)]) == tok.decode(ids)
    # lm-eval's request: echo, logprobs 1, max_tokens 1; is_greedy compares with == to the top-1
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    last = r.choices[0].logprobs
    assert len(last.token_logprobs) == len(ids) + 1
    assert last.token_logprobs[-1] == max(last.top_logprobs[-1].values())
    only = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert only.choices[0].text == tok.decode(ids) and len(only.choices[0].logprobs.tokens) == len(ids)


def test_stop_strings_and_seeds(client):
    full = client.completions.create(model="tiny", prompt="def ", max_tokens=20, temperature=0).choices[0].text
    stop = full[6:9]
    r = client.completions.create(model="tiny", prompt="def ", max_tokens=20, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model="tiny", prompt="def ", max_tokens=20, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == full[: full.index(stop)]
    prefixes = [client.completions.create(model="tiny", prompt="def ", max_tokens=n, temperature=0).choices[0].text
                for n in range(1, 9)]
    # a stop string completed by the last token max_tokens allows: the request stopped, it did not run out
    n, last = next((n, b[len(a):]) for n, (a, b) in enumerate(zip(prefixes, prefixes[1:]), 2)
                   if b[len(a):] and b.find(b[len(a):]) == len(a))
    r = client.completions.create(model="tiny", prompt="def ", max_tokens=n, temperature=0, stop=last)
    assert r.choices[0].text == prefixes[n - 2] and r.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model="tiny", prompt="def ", max_tokens=12, temperature=1.0, seed=s)
               .choices[0].text for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_extensions_and_unknown_fields(client, local):
    model, tok = local
    r = client.completions.create(model="tiny", prompt="def ", max_tokens=8, temperature=0.7, seed=3,
                                  extra_body={"top_k": 5, "repetition_penalty": 1.2, "not_an_openai_field": [1, {}],
                                              "ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    ids = generate(model, [tok.encode("def ")], SamplingParams(max_new_tokens=8, temperature=0))[0]
    r = client.completions.create(model="tiny", prompt="def ", max_tokens=8, temperature=0,
                                  extra_body={"stop_token_ids": [ids[2]]})
    assert r.usage.completion_tokens == ids.index(ids[2]) + 1 and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("params", [dict(n=2), dict(logit_bias={"5": 1.0}), dict(best_of=3),
                                    dict(presence_penalty=0.5), dict(frequency_penalty=-1.0), dict(suffix="x")])
def test_unsupported_parameters_are_refused_by_name(client, params):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="def ", max_tokens=3, **params)
    name = next(iter(params))
    assert e.value.body["param"] == name and name in e.value.body["message"]


@pytest.mark.parametrize("params", [dict(tools=[{"type": "function", "function": {"name": "f"}}]),
                                    dict(response_format={"type": "json_object"}), dict(n=3)])
def test_unsupported_chat_parameters_are_refused_by_name(client, params):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], **params)
    assert e.value.body["param"] == next(iter(params))


def test_32_concurrent_streaming_clients(server, client):
    prompts = [f"def f{i}(" for i in range(32)]
    expected = [client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text
                for p in prompts]

    async def one(aclient, prompt):
        stream = await aclient.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                                  stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=120) as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))

    assert asyncio.run(all_at_once()) == expected
    server.wait_idle()


def scrape(server) -> dict[str, float]:
    """Every sample of GET /metrics by name (+ finished_reason), the model_name label checked and dropped."""
    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if not s.name.startswith("dsmoe:"):
                continue
            labels = dict(s.labels)
            assert labels.pop("model_name") == "tiny"
            out[s.name + "".join(f"{{{v}}}" for k, v in labels.items() if k in ("finished_reason", "position"))] = \
                s.value
    return out


def test_metrics_move_as_requests_run_and_complete(server, local):
    prompt_tokens = len(local[1].encode("def "))
    before = scrape(server)
    assert before["dsmoe:num_requests_running"] == 0 and before["dsmoe:kv_cache_usage_perc"] == 0
    request = {"model": "tiny", "prompt": "def ", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
               "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as http, http.stream("POST", "/v1/completions",
                                                                             json=request) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        next(lines)
        during = scrape(server)
        rest = list(lines)
    assert rest[-1] == "data: [DONE]"
    assert during["dsmoe:num_requests_running"] == 1 and during["dsmoe:kv_cache_usage_perc"] == 1 / 16
    assert during["dsmoe:num_requests_admitted"] == 1
    server.wait_idle()
    after = scrape(server)
    delta = {name: after[name] - before.get(name, 0.0) for name in after}
    assert delta["dsmoe:generation_tokens_total"] == 200
    assert delta["dsmoe:prompt_tokens_total"] == prompt_tokens
    assert delta["dsmoe:time_to_first_token_seconds_count"] == 1
    assert delta["dsmoe:e2e_request_latency_seconds_count"] == 1
    assert 1 <= delta["dsmoe:time_per_output_token_seconds_count"] <= 199  # one per output after the first
    assert delta["dsmoe:request_success_total{length}"] == 1
    assert after["dsmoe:num_requests_running"] == 0 and after["dsmoe:num_requests_waiting"] == 0


def test_metrics_count_the_prompt_tokens_of_scoring_requests(server, local):
    """lm-eval's scoring requests (echo + logprobs, max_tokens 0) prefill prompts and generate nothing: their prompt
    tokens count, and they have no first token to time."""
    prompts = ["def f(x):", "import torch"]
    prompt_tokens = sum(len(local[1].encode(p)) for p in prompts)
    server.wait_idle()
    before = scrape(server)
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": prompts, "max_tokens": 0,
                                                         "echo": True, "logprobs": 1}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 0
    after = scrape(server)
    delta = {name: after[name] - before.get(name, 0.0) for name in after}
    assert delta["dsmoe:prompt_tokens_total"] == prompt_tokens
    assert delta["dsmoe:generation_tokens_total"] == 0
    assert delta["dsmoe:time_to_first_token_seconds_count"] == 0
    assert delta["dsmoe:e2e_request_latency_seconds_count"] == 2


@pytest.fixture(scope="module")
def spec_server(model_dir, serve, tmp_path_factory):
    with serve(model_dir, tmp_path_factory.mktemp("spec") / "spec.log", "--speculative", "ngram",
               "--prompt-lookup-min", "1") as s:
        yield s


def test_a_server_with_prompt_lookup_answers_as_plain_decoding_and_counts_drafts(spec_server, server):
    """`dsmoe serve --speculative ngram`: greedy completions equal the plain server's; /metrics counts the drafts
    verified and kept (vLLM's spec_decode counters), in total and per draft position."""
    prompt = "def f(x):\n    return x\ndef f(x):\n"
    request = {"model": "tiny", "prompt": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    plain = httpx.post(server.url + "/v1/completions", json=request, timeout=60).json()["choices"][0]["text"]
    http = httpx.Client(base_url=spec_server.url, timeout=60)
    assert http.post("/v1/completions", json=request).json()["choices"][0]["text"] == plain
    after = scrape(spec_server)
    assert 0 < after["dsmoe:spec_decode_num_accepted_tokens_total"] <= after[
        "dsmoe:spec_decode_num_draft_tokens_total"]
    per_position = [after[f"dsmoe:spec_decode_num_accepted_tokens_per_pos_total{{{j}}}"] for j in range(4)]
    assert sum(per_position) == after["dsmoe:spec_decode_num_accepted_tokens_total"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("path,fields,param", [
    ("/v1/completions", {"prompt": "def ", "logprobs": 1}, "logprobs"),
    ("/v1/completions", {"prompt": ["def ", "x"], "repetition_penalty": 1.2}, "repetition_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs"),
], ids=["logprobs", "repetition_penalty", "chat_logprobs"])
def test_a_speculative_server_refuses_what_it_cannot_run_before_answering(spec_server, path, fields, param, stream):
    """What the engine cannot do with speculative decoding is a 400 naming the parameter, decided before any
    header (never a 200 whose stream then carries the error), and not an unhandled exception in the log."""
    r = httpx.post(spec_server.url + path, json={"model": "tiny", "max_tokens": 4, "stream": stream, **fields},
                   timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and "--speculative" in r.json()["error"]["message"]
    assert spec_server.wait_idle(timeout=5)["in_flight"] == 0
    assert "Traceback" not in spec_server.log.read_text()
