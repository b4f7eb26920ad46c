"""A client that goes away aborts its engine request and frees its KV blocks, streaming or not.

Each test starts a long request (max_tokens near the 512-token context, ignore_eos: ~1.5 s of
decoding), waits until the engine runs it, drops the connection, then requires the engine to be
idle with every block free within a short deadline, and the request to have ended as ABORTED
(so it cannot pass by simply finishing).
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

LONG = {"max_tokens": 450, "ignore_eos": True, "temperature": 0}


def running_request(engine, deadline_s: float = 10.0):
    """The engine's one running Request object, once it runs (polled from the test thread)."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        requests = list(engine.engine.scheduler.requests.values())
        if engine.stats().num_running == 1 and len(requests) == 1:
            return requests[0]
        time.sleep(0.005)
    pytest.fail(f"the request never started running: {engine.stats()}")


def assert_aborted(engine, request, wait_idle) -> None:
    wait_idle(5.0)
    assert request.status == RequestStatus.FINISHED_ABORTED, request
    assert request.num_output_tokens < LONG["max_tokens"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_streaming_disconnect_aborts(base_url, model, engine, wait_idle, path):
    wait_idle(5.0)
    body = {"model": model, "stream": True, **LONG}
    body.update({"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path
                else {"prompt": "Hi"})
    with httpx.Client(base_url=base_url, timeout=30) as client:
        with client.stream("POST", path, json=body) as resp:
            assert resp.status_code == 200
            first = next(resp.iter_lines())
            assert json.loads(first.removeprefix("data: "))["id"]
            request = running_request(engine)
        # leaving both blocks closes the response and the connection mid-stream
    assert_aborted(engine, request, wait_idle)


def test_non_streaming_disconnect_aborts(base_url, model, engine, wait_idle):
    wait_idle(5.0)
    payload = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi"}],
                          **LONG}).encode()
    url = urlparse(base_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
                     b"Content-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        request = running_request(engine)
    finally:
        sock.close()  # the client gives up before any byte of the response
    assert_aborted(engine, request, wait_idle)


def test_client_timeout_on_non_streaming_request_aborts(base_url, model, engine, wait_idle):
    wait_idle(5.0)
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], **LONG}
    with ThreadPoolExecutor(1) as pool:
        # a 0.5 s read timeout: the full 450 tokens take about three times that
        future = pool.submit(httpx.post, f"{base_url}/v1/chat/completions", json=body,
                             timeout=httpx.Timeout(5.0, read=0.5))
        request = running_request(engine)
        with pytest.raises(httpx.ReadTimeout):
            future.result()
    assert_aborted(engine, request, wait_idle)
    # and the server still serves
    resp = httpx.post(f"{base_url}/v1/chat/completions", json={**body, "max_tokens": 1})
    assert resp.status_code == 200
