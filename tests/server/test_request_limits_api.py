"""Hostile request sizes: a body over ``--max-request-mb`` is a 413 in the OpenAI envelope (from
Content-Length, or while a chunked body streams in) and the keep-alive connection then serves
the next request; ``/v1/files`` keeps its own limit. A prompt too long for the context is a 400
before the tokenizer runs, while ``/health`` keeps answering; the tokenizer runs off the event
loop (``server/prompts.py``); a long but legal prompt still works."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from support.serving import serve

from lmforge.config import ServerConfig
from lmforge.server import build_app

MB = 2**20
LONGEST_TOKEN = "#" * 80  # one of SmolLM2's longest entries (81 characters is the longest)


@pytest.fixture(scope="module")
def small_url(engine, base_url) -> Iterator[str]:
    """The session engine (started by ``base_url``) behind ``--max-request-mb 1``."""
    app = build_app(engine, ServerConfig(max_request_mb=1, fine_tuning=False))
    with serve(app, lifespan="off") as url:
        yield url


def chunked(payload: bytes, piece: int = 64 * 1024) -> Iterator[bytes]:
    for start in range(0, len(payload), piece):
        yield payload[start:start + piece]


def assert_too_large(status: int, body: bytes) -> None:
    assert status == 413
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert "1 MB" in error["message"] and "--max-request-mb" in error["message"]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_over_the_limit_is_a_413_and_the_connection_serves_the_next(small_url, model,
                                                                        framing):
    url = urlsplit(small_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    big = json.dumps({"model": model, "prompt": "word " * (MB // 2)}).encode()  # 2.5 MB
    headers = {"Content-Type": "application/json"}
    if framing == "chunked":
        conn.request("POST", "/v1/completions", body=chunked(big), headers=headers,
                     encode_chunked=True)
    else:
        conn.request("POST", "/v1/completions", body=big, headers=headers)
    resp = conn.getresponse()
    assert_too_large(resp.status, resp.read())
    assert resp.getheader("connection") != "close"
    sock = conn.sock
    small = json.dumps({"model": model, "prompt": "Hi", "max_tokens": 2}).encode()
    conn.request("POST", "/v1/completions", body=small, headers=headers)
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["usage"]["prompt_tokens"] >= 1
    assert conn.sock is sock  # served on the same connection
    conn.close()


def test_a_chunked_body_under_the_limit_is_served(small_url, model):
    body = json.dumps({"model": model, "prompt": "Hi " * 50, "max_tokens": 2}).encode()
    resp = httpx.post(f"{small_url}/v1/completions", content=chunked(body, 100),
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"]


def test_expect_100_continue_over_the_limit_closes_the_connection(small_url, model):
    resp = httpx.post(f"{small_url}/v1/completions", content=b"{}" * MB, timeout=30,
                      headers={"Content-Type": "application/json", "Expect": "100-continue"})
    assert_too_large(resp.status_code, resp.content)
    assert resp.headers["connection"] == "close"  # the client may or may not send the body


def test_uploads_keep_their_own_limit(small_url):
    client = openai.OpenAI(base_url=f"{small_url}/v1", api_key="x", max_retries=0, timeout=30)
    data = b'{"text": "' + b"x" * (2 * MB) + b'"}\n'  # over --max-request-mb 1
    uploaded = client.files.create(file=("big.jsonl", data), purpose="user_data")
    assert uploaded.bytes == len(data)
    client.files.delete(uploaded.id)


def test_a_huge_prompt_is_refused_before_tokenizing_while_health_answers(base_url, model):
    body = json.dumps({"model": model, "prompt": "word " * MB, "max_tokens": 1}).encode()
    latencies: list[float] = []
    stop = threading.Event()

    def poll_health() -> None:
        with httpx.Client(base_url=base_url, timeout=30) as health:
            while not stop.is_set():
                start = time.perf_counter()
                assert health.get("/health").status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.005)

    poller = threading.Thread(target=poll_health)
    poller.start()
    try:
        while len(latencies) < 5:
            time.sleep(0.01)
        resp = httpx.post(f"{base_url}/v1/completions", content=body, timeout=60,
                          headers={"Content-Type": "application/json"})
        time.sleep(0.05)  # a few more polls after the answer
    finally:
        stop.set()
        poller.join()
    assert resp.status_code == 400  # under --max-request-mb (32): the context bound fires
    error = resp.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert f"prompt has {5 * MB} characters" in error["message"]
    assert "512 tokens" in error["message"] and "81 characters" in error["message"]
    # /health answered all along (every poll above asserted 200). How fast is a benchmark's
    # question, not a test's (benchmarks/big_prompt.py): the refusal came from the character
    # bound, so the tokenizer never ran, and test_tokenizing_runs_off_the_event_loop shows
    # that a prompt that does get tokenized is tokenized in a worker thread.
    assert latencies


def test_a_long_but_legal_prompt_is_served(client, model, http):
    # 24,000 characters in 375 tokens: far past any "4 characters per token" estimate
    prompt = LONGEST_TOKEN * 300
    out = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    assert 300 <= out.usage.prompt_tokens < 512 and out.choices[0].finish_reason
    chat = client.chat.completions.create(model=model, max_tokens=2, temperature=0,
                                          messages=[{"role": "user", "content": prompt}])
    assert out.usage.prompt_tokens < chat.usage.prompt_tokens < 512
    embedded = client.embeddings.create(model=model, input=[prompt, "Hi"])
    assert embedded.usage.prompt_tokens > out.usage.prompt_tokens
    count = http.post("/tokenize", json={"prompt": prompt}).json()["count"]
    assert count == out.usage.prompt_tokens


def test_tokenizing_runs_off_the_event_loop(engine, http, model, monkeypatch):
    marker = "zebra crossing"
    threads: list[str] = []
    encode = engine.tokenizer.encode

    def recording_encode(text: str, add_special_tokens: bool = True) -> list[int]:
        if marker in text:
            threads.append(threading.current_thread().name)
        return encode(text, add_special_tokens=add_special_tokens)

    monkeypatch.setattr(engine.tokenizer, "encode", recording_encode)
    messages = [{"role": "user", "content": marker}]
    for path, body in [("/v1/completions", {"prompt": marker, "max_tokens": 1}),
                       ("/v1/chat/completions", {"messages": messages, "max_tokens": 1}),
                       ("/v1/embeddings", {"input": marker}),
                       ("/tokenize", {"prompt": marker}),
                       ("/tokenize", {"messages": messages})]:
        assert http.post(path, json={"model": model, **body}).status_code == 200, path
    assert len(threads) == 5
    assert "uvicorn" not in threads  # the event loop's thread (conftest.ServerThread)


def test_echoed_token_ids_longer_than_the_context_are_refused_before_decoding(http, model):
    resp = http.post("/v1/completions", json={"model": model, "prompt": [[5, 6], [5] * 513],
                                              "echo": True, "max_tokens": 0})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "prompt[1] has 513 tokens" in error["message"]


def test_detokenize_takes_at_most_a_context_of_ids(http, model):
    resp = http.post("/detokenize", json={"model": model, "tokens": [5] * 513})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "tokens"
    assert http.post("/detokenize", json={"tokens": [5] * 512}).status_code == 200
