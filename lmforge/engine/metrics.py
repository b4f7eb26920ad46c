"""What the engine counts: load snapshots (``EngineStats``) and per-request latency histograms.

Plain numbers, no Prometheus here: ``server/metrics.py`` exports them. The histogram buckets are
vLLM's (``vllm/v1/metrics/loggers.py``), so dashboards built for vLLM read ours.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field


@dataclass
class EngineStats:
    """A snapshot of the engine's load."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, cumulative
    prefix_cache_hits: int = 0  # of which found cached, cumulative


# Bucket upper bounds in seconds, vLLM's for vllm:time_to_first_token_seconds and
# vllm:inter_token_latency_seconds (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                  5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)


@dataclass
class LatencyHistogram:
    """Cumulative observations in fixed buckets: plain numbers that server/metrics.py exports as
    a Prometheus histogram. ``counts[i]`` counts values <= ``bounds[i]`` and > ``bounds[i-1]``;
    the last entry counts values above every bound (+Inf)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0  # sum of observed values

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


@dataclass
class RequestCounters:
    """Cumulative per-request numbers, taken where ``generate`` hands outputs to the caller
    (as vLLM's frontend measures them): prompt tokens of each request at its first token,
    generated tokens, time to first token and the time between consecutive outputs."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    time_to_first_token: LatencyHistogram = field(
        default_factory=lambda: LatencyHistogram(TTFT_BUCKETS_S))
    inter_token_latency: LatencyHistogram = field(
        default_factory=lambda: LatencyHistogram(ITL_BUCKETS_S))
