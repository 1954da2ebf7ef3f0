"""`dsmoe bench serve`: the OpenAI HTTP server under load, the quantities vLLM's serving benchmark reports.

The real `dsmoe serve` is started as a subprocess on a model folder (or on a preset with random weights and
a byte-level tokenizer, written to a temporary folder), then `--num-prompts` streaming /v1/completions
requests are sent by at most `--concurrency` clients at a time, arriving as a Poisson process of each rate
in `--request-rates` (`inf`: all at once). Per rate: output tokens/s, requests/s, time to first token
(TTFT) and inter-token latency (ITL: the gap between streamed chunks) at p50 and p99. With `--servers
dsmoe,transformers`, `transformers serve` runs on the same folder with the same prompts, where the
installed transformers has it (otherwise the table says why not).

Prompts are random letters, one token each under the byte-level tokenizer (a model folder's own tokenizer
may merge them into fewer tokens; the table reports the prompt tokens the server counted). dsmoe gets
`ignore_eos` so every request generates `--output-len` tokens; transformers serve has no such field, and a
request that stops early counts the tokens it produced.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import string
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from dsmoe.devices import add_device_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="a model folder (default: --preset with random weights)")
    parser.add_argument("--preset", default="small", help="model preset used when --model is not given")
    parser.add_argument("--servers", default="dsmoe", help="comma-separated: dsmoe, transformers")
    parser.add_argument("--request-rates", default="inf", help="comma-separated requests/s (Poisson); inf = at once")
    parser.add_argument("--concurrency", type=int, default=32, help="clients with a request in flight, at most")
    parser.add_argument("--num-prompts", type=int, default=128, help="requests per rate")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt characters (tokens, byte-level)")
    parser.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    parser.add_argument("--max-batch", type=int, default=32, help="dsmoe serve --max-batch")
    add_device_argument(parser)
    parser.add_argument("--serve-args", default="", help="extra arguments for dsmoe serve, e.g. '--compile'")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for a server")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and the arrival times")
    parser.add_argument("--json", default=None, help="write all results to this JSON file")


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itls: tuple[float, ...] = ()
    latency: float = 0.0


@dataclass
class RateResult:
    server: str
    rate: str  # requests/s, or "inf"
    requests: int
    failed: int
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100  # linear interpolation, as numpy's default
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def one_request(client, url: str, body: dict) -> RequestResult:
    start = time.perf_counter()
    last, ttft, itls, tokens, prompt_tokens, chunks = start, 0.0, [], 0, 0, 0
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return RequestResult(False)
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                    prompt_tokens = chunk["usage"]["prompt_tokens"]
                if "error" in chunk:  # the server's in-band error: the stream broke off after its first chunks
                    return RequestResult(False)
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    ttft = now - start
                else:
                    itls.append(now - last)
                last, chunks = now, chunks + 1
    except Exception:  # a transport error is a failed request, counted in the table
        return RequestResult(False)
    return RequestResult(chunks > 0, prompt_tokens, tokens or chunks, ttft, tuple(itls), last - start)


async def run_rate(url: str, bodies: list[dict], rate: float, concurrency: int, seed: int) -> tuple[list, float]:
    import httpx

    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def limited(body: dict) -> RequestResult:
            async with gate:
                return await one_request(client, url, body)

        start = time.perf_counter()
        tasks = []
        for body in bodies:
            tasks.append(asyncio.create_task(limited(body)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def summarize(server: str, rate: float, results: list[RequestResult], duration: float) -> RateResult:
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft * 1e3 for r in ok]
    itls = [x * 1e3 for r in ok for x in r.itls]
    return RateResult(server, f"{rate:g}", len(results), len(results) - len(ok), duration,
                      sum(r.prompt_tokens for r in ok), output, output / duration, len(ok) / duration,
                      percentile(ttfts, 50), percentile(ttfts, 99), percentile(itls, 50), percentile(itls, 99))


def random_model_folder(preset: str, root: Path) -> Path:
    """A preset with random weights and a byte-level tokenizer, as `dsmoe train` would write it."""
    import torch

    from dsmoe.checkpoint.hf import save_pretrained
    from dsmoe.presets import get_preset
    from dsmoe.data.tokenizer import MIN_VOCAB, train_tokenizer
    from dsmoe.model.transformer import build_model

    torch.manual_seed(0)
    folder = root / preset
    config = get_preset(preset)
    save_pretrained(build_model(config, dtype=torch.bfloat16), folder)
    train_tokenizer([], MIN_VOCAB).save(folder, model_max_length=config.max_position_embeddings)
    return folder


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(name: str, folder: Path, port: int, args: argparse.Namespace) -> tuple[list[str], str]:
    """The command line starting server `name`, and the model name its clients send."""
    if name == "dsmoe":
        max_len = args.prompt_len + args.output_len + 64  # the tokenizer's BOS and a margin
        return ([sys.executable, "-m", "dsmoe", "serve", str(folder), "--port", str(port), "--model-name", "bench",
                 "--device", args.device, "--max-batch", str(args.max_batch), "--max-model-len", str(max_len),
                 "--max-queue", str(max(args.num_prompts, 1)), *args.serve_args.split()], "bench")
    from transformers.cli.serve import is_serve_available  # raises ImportError where transformers has no serve

    if not is_serve_available():
        raise ImportError("transformers serve needs its [serving] extra (fastapi, uvicorn, openai)")
    device = "auto" if args.device == "auto" else args.device
    return ([sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder),
             "--port", str(port), "--device", device, "--log-level", "warning"], str(folder))


@contextmanager
def launched(command: list[str], port: int, log: Path, timeout: float):
    import httpx

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer within {timeout:g} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1/completions"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench_server(name: str, folder: Path, prompts: list[str], rates: list[float], args, root: Path) -> list:
    port = free_port()
    command, model = server_command(name, folder, port, args)
    bodies = [{"model": model, "prompt": p, "max_tokens": args.output_len, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}, **({"ignore_eos": True} if name == "dsmoe" else {})}
              for p in prompts]
    out = []
    with launched(command, port, root / f"{name}.log", args.startup_timeout) as url:
        asyncio.run(run_rate(url, bodies[:2], float("inf"), 2, args.seed))  # warm-up (CUDA graphs, allocator)
        for rate in rates:
            results, duration = asyncio.run(run_rate(url, bodies, rate, args.concurrency, args.seed))
            out.append(summarize(name, rate, results, duration))
            print(f"{name} rate {rate:g}: {out[-1].output_tokens_per_s:.1f} output tok/s", flush=True)
    return out


def print_table(results: list[RateResult], notes: list[str]) -> None:
    header = (f"{'server':<13}{'rate/s':>8}{'reqs':>6}{'fail':>6}{'out tok/s':>11}{'req/s':>8}"
              f"{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}  (ms)")
    print(header)
    for r in results:
        print(f"{r.server:<13}{r.rate:>8}{r.requests:>6}{r.failed:>6}{r.output_tokens_per_s:>11.1f}"
              f"{r.requests_per_s:>8.2f}{r.ttft_p50_ms:>10.1f}{r.ttft_p99_ms:>10.1f}{r.itl_p50_ms:>9.2f}"
              f"{r.itl_p99_ms:>9.2f}")
    for note in notes:
        print(note)


def run(args: argparse.Namespace) -> int:
    from dsmoe.atomic import atomic_write_text
    from dsmoe.errors import UserError

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    try:
        rates = [float(x) for x in args.request_rates.split(",")]
    except ValueError:
        raise UserError(f"--request-rates takes numbers and inf, comma-separated, got {args.request_rates!r}") from None
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if any(s not in ("dsmoe", "transformers") for s in servers):
        raise UserError(f"--servers takes dsmoe and/or transformers, got {args.servers!r}")
    if not all(r > 0 for r in rates) or min(args.concurrency, args.num_prompts, args.prompt_len, args.output_len) < 1:
        raise UserError("--request-rates must be > 0 and --concurrency, --num-prompts, --prompt-len, --output-len >= 1")
    rng = random.Random(args.seed)
    prompts = ["".join(rng.choices(string.ascii_letters, k=args.prompt_len)) for _ in range(args.num_prompts)]
    results: list[RateResult] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="dsmoe-bench-serve-") as tmp:
        root = Path(tmp)
        folder = Path(args.model) if args.model else random_model_folder(args.preset, root)
        for name in servers:
            try:
                results += bench_server(name, folder, prompts, rates, args, root)
            except (ImportError, RuntimeError) as e:
                if name == "dsmoe" and isinstance(e, RuntimeError):
                    raise
                notes.append(f"{name}: not run ({str(e)[-1500:]})")
    print_table(results, notes)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps({"args": vars(args), "results": [asdict(r) for r in results],
                                               "notes": notes}, indent=2))
    return 0
