"""`dsmoe bench serve` on the CPU: the real server on a tiny model, streaming clients, the vLLM quantities."""

import argparse
import json

import pytest

from dsmoe.bench import serve as bench


def test_bench_serve_reports_throughput_and_latency(tmp_path, model_dir, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "serve.json"
    args = parser.parse_args(["--model", str(model_dir), "--request-rates", "inf,50", "--concurrency", "3",
                              "--num-prompts", "6", "--prompt-len", "12", "--output-len", "5", "--max-batch", "4",
                              "--device", "cpu", "--json", str(out)])
    assert bench.run(args) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["rate"] for r in results] == ["inf", "50"]
    for r in results:
        assert r["server"] == "dsmoe" and r["requests"] == 6 and r["failed"] == 0
        assert r["output_tokens"] == 6 * 5  # ignore_eos: every request runs to max_tokens
        assert r["prompt_tokens"] >= 6  # counted by the server (the BPE merges letters)
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and 0 < r["itl_p50_ms"] <= r["itl_p99_ms"]
        assert r["output_tokens_per_s"] > 0
    assert "TTFT p50" in capsys.readouterr().out


@pytest.mark.parametrize("error", [False, True])
def test_a_stream_that_breaks_off_with_an_error_chunk_is_a_failed_request(error):
    import asyncio

    import httpx

    chunks = [{"choices": [{"text": "a"}]}, *([{"error": {"message": "engine failed"}}] if error else []),
              {"choices": [{"text": "b"}]}]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"

    async def request():
        transport = httpx.MockTransport(lambda r: httpx.Response(200, content=body.encode()))
        async with httpx.AsyncClient(transport=transport) as client:
            return await bench.one_request(client, "http://server/v1/completions", {})

    result = asyncio.run(request())
    assert result.ok is not error and (error or result.output_tokens == 2)


def test_percentile_interpolates_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert bench.percentile(values, 50) == 2.5 and bench.percentile(values, 100) == 4.0
    assert bench.percentile(values, 99) == pytest.approx(3.97)
