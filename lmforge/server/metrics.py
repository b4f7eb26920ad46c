"""``GET /metrics``: Prometheus text exposition of the server and its engine.

Names follow vLLM's (``vllm/v1/metrics/loggers.py``) with the ``lmforge:`` prefix, so dashboards
built for vLLM need only the prefix changed:

- ``lmforge:http_requests_total{method, handler, status}``: every HTTP response, by route template
  (``handler``, "none" for unknown URLs, as prometheus-fastapi-instrumentator labels it) and
  exact status code; 401s, 429s and 503s included.
- ``lmforge:num_requests_running`` / ``lmforge:num_requests_waiting`` (gauges): the scheduler's
  running and waiting queues.
- ``lmforge:kv_cache_usage_perc`` (gauge, 0..1): KV blocks held by requests / all blocks.
- ``lmforge:prefix_cache_queries_total`` / ``lmforge:prefix_cache_hits_total`` (counters, tokens):
  prompt tokens looked up in the prefix cache and found; ``lmforge:prefix_cache_hit_rate``
  (gauge) is their ratio since start.
- ``lmforge:prompt_tokens_total`` / ``lmforge:generation_tokens_total`` (counters).
- ``lmforge:time_to_first_token_seconds`` / ``lmforge:inter_token_latency_seconds`` (histograms).

Every app has its own ``CollectorRegistry`` (tests run several apps in one process). Engine
numbers are plain counters kept by ``AsyncEngine`` (prometheus-client stays out of ``engine/``)
and read at scrape time by ``EngineCollector``; nothing polls in the background.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.server.routing import StrictJSONRoute

if TYPE_CHECKING:
    from lmforge.engine.async_engine import AsyncEngine
    from lmforge.engine.metrics import LatencyHistogram

PREFIX = "lmforge:"
router = APIRouter(route_class=StrictJSONRoute)


class ServerMetrics:
    """The metrics of one app: its registry, the HTTP counter and the engine collector.

    Args:
        get_engine: returns the served engine, or None while the model is loading (then only
            the HTTP counter is exported).
    """

    def __init__(self, get_engine: Callable[[], AsyncEngine | None]):
        self.registry = CollectorRegistry()
        self.http_requests = Counter(f"{PREFIX}http_requests", "HTTP responses by route and status",
                                     ["method", "handler", "status"], registry=self.registry)
        self.registry.register(EngineCollector(get_engine))

    def render(self) -> bytes:
        """The Prometheus text exposition format (version 0.0.4)."""
        return generate_latest(self.registry)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus scrape endpoint (behind the API key like every route but /health)."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


class EngineCollector:
    """Reads ``AsyncEngine.stats()`` and ``AsyncEngine.counters`` at each scrape."""

    def __init__(self, get_engine: Callable[[], AsyncEngine | None]):
        self.get_engine = get_engine

    def collect(self) -> Iterator[Metric]:
        engine = self.get_engine()
        if engine is None:
            return
        stats, counters = engine.stats(), engine.counters
        yield _gauge("num_requests_running", "Requests in the running batch", stats.num_running)
        yield _gauge("num_requests_waiting", "Requests waiting to be scheduled",
                     stats.num_waiting)
        used = stats.num_total_blocks - stats.num_free_blocks
        yield _gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks held by requests (0..1)",
                     used / stats.num_total_blocks if stats.num_total_blocks else 0.0)
        yield _counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                       stats.prefix_cache_queries)
        yield _counter("prefix_cache_hits", "Prompt tokens found in the prefix cache",
                       stats.prefix_cache_hits)
        queries = stats.prefix_cache_queries
        yield _gauge("prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries since "
                     "start", stats.prefix_cache_hits / queries if queries else 0.0)
        yield _counter("prompt_tokens", "Prompt tokens of requests that produced a first token",
                       counters.prompt_tokens)
        yield _counter("generation_tokens", "Generated tokens delivered",
                       counters.generation_tokens)
        yield _histogram("time_to_first_token_seconds", "Time from admission to the first token",
                         counters.time_to_first_token)
        yield _histogram("inter_token_latency_seconds", "Time between consecutive outputs of a "
                         "request", counters.inter_token_latency)
        memory = engine.memory_report()
        yield _gauge("memory_weights_bytes", "The base model's parameters and buffers",
                     memory.weights)
        yield _gauge("memory_kv_cache_bytes", "The KV cache's reservation", memory.kv_cache)
        yield _gauge("memory_kv_cache_used_bytes", "The part of the KV cache written so far",
                     memory.kv_cache_used)
        yield _gauge("kv_cache_tokens", "Tokens the KV cache holds", memory.kv_cache_tokens)
        if memory.rss is not None:
            yield _gauge("memory_resident_bytes", "The process's resident set size", memory.rss)
            yield _gauge("memory_runtime_bytes", "Resident memory less weights and the used KV "
                         "cache (interpreter, PyTorch, tokenizer, activations)", memory.runtime)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def _histogram(name: str, doc: str, hist: LatencyHistogram) -> HistogramMetricFamily:
    """Engine buckets (per-bucket counts) -> Prometheus' cumulative ``le`` buckets."""
    buckets, total = [], 0
    for bound, count in zip([*map(str, hist.bounds), "+Inf"], list(hist.counts)):
        total += count
        buckets.append((bound, total))
    return HistogramMetricFamily(PREFIX + name, doc, buckets=buckets, sum_value=hist.total)


class HTTPMetricsMiddleware:
    """ASGI middleware counting every HTTP response in ``lmforge:http_requests_total``.

    Outermost of the app's own middleware, so responses of the API-key and readiness gate
    (which answer before routing) are counted under the route they were meant for.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: list[BaseRoute]):
        self.app = app
        self.counter = metrics.http_requests
        self.routes = routes  # to name the route of a request answered before routing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # if the app raises before it answers, Starlette sends a 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.counter.labels(scope["method"], self._route_template(scope), str(status)).inc()

    def _route_template(self, scope: Scope) -> str:
        """``/v1/models/{model_id:path}`` rather than the raw path, so labels stay few."""
        route = scope.get("route")  # set by the router
        if route is None:  # answered before routing (auth, readiness): the route it targets
            route = next((r for r in self.routes if r.matches(scope)[0] == Match.FULL), None)
        return getattr(route, "path", None) or "none"
