"""GET /metrics: Prometheus text that parses, with counters that move by exactly what the
requests did (tokens, prefix-cache lookups and hits, latency observations, HTTP responses)."""

from __future__ import annotations

import random

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(http: httpx.Client) -> Samples:
    resp = http.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_counters_move_by_what_the_requests_did(http, model, engine, wait_idle):
    # token ids no other test sends, so the first request finds nothing in the prefix cache
    prompt = random.Random(1234).sample(range(1000, 40000), 40)
    body = {"model": model, "prompt": prompt, "max_tokens": 5, "ignore_eos": True,
            "temperature": 0}
    wait_idle(5.0)
    before = scrape(http)
    for _ in range(2):
        resp = http.post("/v1/completions", json=body)
        assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
    assert http.post("/v1/completions", json={**body, "temperature": -1}).status_code == 400
    assert http.get("/no/such/url").status_code == 404
    wait_idle(5.0)
    after = scrape(http)

    assert delta(before, after, "lmforge:prompt_tokens_total") == 80
    assert delta(before, after, "lmforge:generation_tokens_total") == 10
    assert delta(before, after, "lmforge:prefix_cache_queries_total") == 80
    # the second request reads the 2 full blocks of 16 tokens (the last token is recomputed)
    assert delta(before, after, "lmforge:prefix_cache_hits_total") == 32
    # one first token per request, then one gap per further token
    assert delta(before, after, "lmforge:time_to_first_token_seconds_count") == 2
    assert delta(before, after, "lmforge:inter_token_latency_seconds_count") == 8
    assert delta(before, after, "lmforge:time_to_first_token_seconds_sum") > 0
    assert value(after, "lmforge:time_to_first_token_seconds_bucket", le="+Inf") == value(
        after, "lmforge:time_to_first_token_seconds_count")

    http_total = "lmforge:http_requests_total"
    assert delta(before, after, http_total, method="POST", handler="/v1/completions",
                 status="200") == 2
    assert delta(before, after, http_total, method="POST", handler="/v1/completions",
                 status="400") == 1
    assert delta(before, after, http_total, method="GET", handler="none", status="404") == 1
    assert value(after, http_total, method="GET", handler="/metrics", status="200") >= 1

    assert value(after, "lmforge:num_requests_running") == 0
    assert value(after, "lmforge:num_requests_waiting") == 0
    assert value(after, "lmforge:kv_cache_usage_perc") == 0
    hits, queries = (value(after, f"lmforge:prefix_cache_{k}_total") for k in ("hits", "queries"))
    assert value(after, "lmforge:prefix_cache_hit_rate") == pytest.approx(hits / queries)


def test_gauges_see_a_running_request(long_base_url, long_engine, long_wait_idle):
    """While a long request decodes, running is 1 and its KV blocks count as used."""
    body = {"model": long_engine.model_name, "prompt": "Hi", "max_tokens": 16000,
            "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=long_base_url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json=body) as resp:
            next(resp.iter_lines())  # the request is running
            samples = scrape(client)
    long_wait_idle(5.0)
    assert value(samples, "lmforge:num_requests_running") == 1
    assert 0 < value(samples, "lmforge:kv_cache_usage_perc") < 1


def test_memory_gauges_split_weights_kv_cache_and_runtime(http, model, engine):
    resp = http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    samples = scrape(http)
    llm = engine.engine
    params = sum(p.numel() * p.element_size() for p in llm.model_runner.model.parameters())
    # the tiny Llama's weights, its 128 blocks x 16 tokens of KV (2 layers x K,V x 2 heads x 16
    # dims x the cache's bytes per element: 4 in float32, 2 where --dtype auto picks bf16), and
    # at least one block written by now
    assert value(samples, "lmforge:memory_weights_bytes") >= params > 0
    assert value(samples, "lmforge:kv_cache_tokens") == 128 * 16
    cfg = llm.model_runner.model.config
    itemsize = llm.model_runner.kv_caches[0][0].element_size()
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize
    assert value(samples, "lmforge:memory_kv_cache_bytes") == 128 * 16 * per_token
    used = value(samples, "lmforge:memory_kv_cache_used_bytes")
    assert 16 * per_token <= used <= 128 * 16 * per_token
    resident = value(samples, "lmforge:memory_resident_bytes")
    runtime = value(samples, "lmforge:memory_runtime_bytes")
    assert resident > 100 * 2**20  # PyTorch alone
    assert runtime == pytest.approx(resident - value(samples, "lmforge:memory_weights_bytes")
                                    - used, abs=64 * 2**20)  # pages come and go between reads
