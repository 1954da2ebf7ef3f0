"""`GET /metrics`: the server's state and latencies in Prometheus' text format, with vLLM's metric names
(prefix `dsmoe:` instead of `vllm:`, label `model_name`) so that dashboards written for vLLM read them.

Gauges are read from the engine when scraped; counters and histograms are fed by each request as its
tokens arrive (`RequestTimer`). Every server has its own registry (tests run several in one process).
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from dsmoe.infer.async_engine import AsyncEngine

# vLLM's buckets (seconds), so percentiles read off the same grid
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    def __init__(self, engine: AsyncEngine, model_name: str):
        self.registry = CollectorRegistry()
        labels, reg = ["model_name"], self.registry
        inner = engine.engine

        def gauge(name: str, doc: str, read) -> None:
            Gauge(name, doc, labels, registry=reg).labels(model_name).set_function(read)

        gauge("dsmoe:num_requests_running", "Requests holding a cache slot (prefilling or decoding).",
              inner.num_running)
        gauge("dsmoe:num_requests_waiting", "Requests queued for a cache slot.", inner.num_waiting)
        gauge("dsmoe:num_requests_admitted", "Requests accepted and not yet answered in full (what the 429 limit "
              "counts: --max-batch + --max-queue).", lambda: engine.in_flight)
        gauge("dsmoe:kv_cache_usage_perc", "Share of the KV cache in use, 0..1 (each running request holds one "
              "slot of --max-model-len tokens).", lambda: inner.num_running() / inner.max_batch)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels + list(extra), registry=reg)

        self.prompt_tokens = counter("dsmoe:prompt_tokens", "Prompt tokens prefilled.").labels(model_name)
        self.generation_tokens = counter("dsmoe:generation_tokens", "Tokens generated.").labels(model_name)
        self.finished = counter("dsmoe:request_success", "Requests finished, by finish reason.", ("finished_reason",))
        self.rejected = counter("dsmoe:request_rejected", "Requests answered 429 (over the admission limit).",
                                ).labels(model_name)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=reg).labels(model_name)

        self.ttft = histogram("dsmoe:time_to_first_token_seconds", "Time from submission to the first token.",
                              TTFT_BUCKETS)
        self.tpot = histogram("dsmoe:time_per_output_token_seconds", "Time between output tokens of a request.",
                              TPOT_BUCKETS)
        self.e2e = histogram("dsmoe:e2e_request_latency_seconds", "Time from submission to the last token.",
                             E2E_BUCKETS)
        self.model_name = model_name
        if inner.spec is not None:
            reg.register(SpeculationCollector(inner, model_name))

    def start(self, prompt_tokens: int) -> "RequestTimer":
        return RequestTimer(self, prompt_tokens)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """One request's latencies and token counts, recorded as its outputs arrive."""

    def __init__(self, metrics: ServerMetrics, prompt_tokens: int):
        self.metrics, self.prompt_tokens = metrics, prompt_tokens
        self.start = self.last = time.perf_counter()
        self.prefilled = False
        self.first = True

    def tokens(self, n: int) -> None:
        """An output of the request carrying n new tokens (none for a scoring request, max_tokens 0)."""
        m = self.metrics
        if not self.prefilled:  # the first output comes once the prompt is in the cache, tokens or not (as vLLM)
            m.prompt_tokens.inc(self.prompt_tokens)
            self.prefilled = True
        if n == 0:
            return  # a request that generates nothing has no first token to time
        now = time.perf_counter()
        if self.first:
            m.ttft.observe(now - self.start)
            self.first = False
        else:
            m.tpot.observe((now - self.last) / n)
        m.generation_tokens.inc(n)
        self.last = now

    def finished(self, reason: str) -> None:
        m = self.metrics
        m.e2e.observe(time.perf_counter() - self.start)
        m.finished.labels(m.model_name, reason).inc()


class SpeculationCollector:
    """vLLM's speculative-decoding counters, read from the engine's own tallies when scraped (drafts verified and
    kept per draft position since the server started)."""

    def __init__(self, engine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        stats = self.engine.speculation_stats()
        proposed, accepted = list(stats["proposed"]), list(stats["accepted"])
        for name, doc, value in (("dsmoe:spec_decode_num_draft_tokens", "Draft tokens verified.", sum(proposed)),
                                 ("dsmoe:spec_decode_num_accepted_tokens", "Draft tokens kept.", sum(accepted))):
            metric = CounterMetricFamily(name, doc, labels=["model_name"])
            metric.add_metric([self.model_name], value)
            yield metric
        metric = CounterMetricFamily("dsmoe:spec_decode_num_accepted_tokens_per_pos", "Draft tokens kept, by draft "
                                     "position (0 = the first draft of a step).", labels=["model_name", "position"])
        for position, value in enumerate(accepted):
            metric.add_metric([self.model_name, str(position)], value)
        yield metric
