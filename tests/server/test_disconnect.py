"""A client that goes away aborts its engine request and frees its KV blocks, streaming or not.

The tests run on ``long_engine`` (the tiny Llama with a 16k context): each starts a request
that would decode 16000 tokens (many seconds), waits until the engine holds it, drops the
connection, then requires the engine to be idle with every block free within a short deadline,
and the request to have ended ABORTED, well short of its max_tokens.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import pytest

from lmforge.engine.request import RequestStatus

LONG = {"max_tokens": 16000, "ignore_eos": True, "temperature": 0}
CHAT_BODY = {"messages": [{"role": "user", "content": "Hi"}], **LONG}


def engine_request(engine, request_id: str | None = None, deadline_s: float = 10.0):
    """The engine's Request object (``request_id``'s, else the only one), polled from the test
    thread until the engine has it."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        requests = dict(engine.engine.scheduler.requests)
        if request_id is not None and request_id in requests:
            return requests[request_id]
        if request_id is None and len(requests) == 1:
            return next(iter(requests.values()))
        time.sleep(0.002)
    pytest.fail(f"request {request_id or ''} never reached the engine: {engine.stats()}")


def assert_aborted(request, wait_idle) -> None:
    wait_idle(5.0)
    assert request.status == RequestStatus.FINISHED_ABORTED, request
    assert request.num_output_tokens < LONG["max_tokens"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_streaming_disconnect_aborts(long_base_url, long_engine, long_wait_idle, path):
    long_wait_idle(5.0)
    body = {"model": long_engine.model_name, "stream": True}
    body.update(CHAT_BODY if "chat" in path else {"prompt": "Hi", **LONG})
    with httpx.Client(base_url=long_base_url, timeout=30) as client:
        with client.stream("POST", path, json=body) as resp:
            assert resp.status_code == 200
            first = json.loads(next(resp.iter_lines()).removeprefix("data: "))
            request = engine_request(long_engine, first["id"])  # one prompt: same id
        # leaving both blocks closes the response and the connection mid-stream
    assert_aborted(request, long_wait_idle)


def test_non_streaming_disconnect_aborts(long_base_url, long_engine, long_wait_idle):
    long_wait_idle(5.0)
    payload = json.dumps({"model": long_engine.model_name, **CHAT_BODY}).encode()
    url = urlparse(long_base_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
                     b"Content-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        request = engine_request(long_engine)
    finally:
        sock.close()  # the client gives up before any byte of the response
    assert_aborted(request, long_wait_idle)


def test_client_timeout_on_non_streaming_request_aborts(long_base_url, long_engine,
                                                        long_wait_idle):
    long_wait_idle(5.0)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(httpx.post, f"{long_base_url}/v1/chat/completions",
                             json={"model": long_engine.model_name, **CHAT_BODY},
                             timeout=httpx.Timeout(5.0, read=1.0))
        request = engine_request(long_engine)
        with pytest.raises(httpx.ReadTimeout):
            future.result()
    assert_aborted(request, long_wait_idle)


def test_server_still_serves_after_disconnects(long_base_url, long_engine):
    resp = httpx.post(f"{long_base_url}/v1/chat/completions", timeout=30, json={
        "model": long_engine.model_name, **CHAT_BODY, "max_tokens": 2})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 2
