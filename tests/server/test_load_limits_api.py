"""A bounded waiting queue: while --max-waiting-requests requests (or --max-waiting-tokens
prompt tokens) wait for their first token, new ones get 429 ``rate_limit_exceeded`` with
Retry-After; the admitted ones finish and the server serves normally afterwards.

The engine loop is stalled (``serving.stalled``) so that no request gets its first token while
the test fills the queue: which requests are admitted is then certain, not a race.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from support.serving import stalled, wait_for


@pytest.fixture
def limits(engine, monkeypatch):
    """Set the session engine's admission limits for one test (read at each request)."""
    config = engine.engine.config.scheduler

    def set_limits(requests: int, tokens: int) -> None:
        monkeypatch.setattr(config, "max_waiting_requests", requests)
        monkeypatch.setattr(config, "max_waiting_tokens", tokens)

    return set_limits


def complete(client: openai.OpenAI, model: str, prompt: list[int] | str):
    try:
        return client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0)
    except openai.RateLimitError as e:
        return e


def test_full_queue_answers_429_then_serves(client, model, engine, limits, monkeypatch,
                                            wait_idle):
    limits(requests=2, tokens=0)
    with ThreadPoolExecutor(6) as pool, stalled(engine, monkeypatch) as release:
        futures = [pool.submit(complete, client, model, "Hello there") for _ in range(6)]
        wait_for(lambda: sum(f.done() for f in futures) == 4, "4 refusals")
        refused = [f.result() for f in futures if f.done()]
        release.set()
        results = [f.result(timeout=30) for f in futures]
    assert all(isinstance(r, openai.RateLimitError) for r in refused)
    error = refused[0]
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    assert error.type == "requests" and "--max-waiting-requests 2" in error.message
    assert error.response.headers["retry-after"] == "1"
    done = [r for r in results if not isinstance(r, openai.RateLimitError)]
    assert len(done) == 2 and all(r.choices[0].finish_reason for r in done)
    wait_idle(5.0)
    # the backlog is gone: as many requests as the limit allows are admitted again
    with ThreadPoolExecutor(2) as pool:
        again = list(pool.map(lambda _: complete(client, model, "Hi"), range(2)))
    assert all(r.usage.completion_tokens >= 1 for r in again)


def test_waiting_tokens_limit(client, model, engine, limits, monkeypatch, wait_idle):
    limits(requests=0, tokens=100)
    long_prompt, short_prompt = list(range(1000, 1060)), list(range(2000, 2030))
    with ThreadPoolExecutor(3) as pool, stalled(engine, monkeypatch) as release:
        first = pool.submit(complete, client, model, long_prompt)  # alone: always admitted
        wait_for(lambda: engine.backlog == (1, 60), "the first request queued")
        refused = complete(client, model, long_prompt)  # 60 + 60 > 100
        fits = pool.submit(complete, client, model, short_prompt)  # 60 + 30 <= 100
        wait_for(lambda: engine.backlog == (2, 90), "the short request queued")
        release.set()
        assert first.result(timeout=30).usage.prompt_tokens == 60
        assert fits.result(timeout=30).usage.prompt_tokens == 30
    assert isinstance(refused, openai.RateLimitError) and refused.type == "tokens"
    assert "60 prompt tokens are waiting" in refused.message
    wait_idle(5.0)


def test_streaming_request_is_refused_before_the_stream_starts(client, model, engine, limits,
                                                               monkeypatch, http, wait_idle):
    limits(requests=1, tokens=0)
    with ThreadPoolExecutor(1) as pool, stalled(engine, monkeypatch) as release:
        first = pool.submit(complete, client, model, "Hi")
        wait_for(lambda: engine.backlog == (1, 1), "the first request queued")
        resp = http.post("/v1/chat/completions", json={
            "model": model, "stream": True, "messages": [{"role": "user", "content": "Hi"}]})
        release.set()
        assert first.result(timeout=30).choices
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["code"] == "rate_limit_exceeded"
    wait_idle(5.0)
