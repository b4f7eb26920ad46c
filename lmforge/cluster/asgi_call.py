"""One HTTP request carried as plain data into an ASGI app, and its response out, streamed.

The Ray Serve ingress (``serve_app.py``) cannot hand a socket to an engine replica: it sends a
``ProxiedRequest`` (picklable), and the replica runs it through its own FastAPI app with
``iterate_app``, whose first item is the ``ResponseHead`` (status and headers) and whose next
items are the body's chunks as the app sends them (each SSE event of a stream as it is made).
httpx's ``ASGITransport`` would do the same for a whole response, but it buffers the body
until the app returns, which a stream cannot wait for.

The ASGI messages follow the HTTP connection scope of the ASGI spec
(https://asgi.readthedocs.io/en/latest/specs/www.html): the body is sent in one
``http.request`` message; when the consumer stops early (its client went away), the app's
next ``receive()`` returns ``http.disconnect``, so the engine request is aborted as it is for a
direct client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

_END = object()


@dataclass
class ProxiedRequest:
    """An HTTP request as data: what the ingress read from its client."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # lower-case names
    body: bytes = b""


@dataclass
class ResponseHead:
    """The status line and headers of a response (the ASGI ``http.response.start``)."""

    status: int
    headers: list[tuple[bytes, bytes]]


def _scope(request: ProxiedRequest, extra: dict[str, Any]) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": request.method, "scheme": "http", "path": request.path,
            "raw_path": request.path.encode(), "query_string": request.query_string,
            "root_path": "", "headers": request.headers, "client": ("ray-serve", 0),
            "server": ("lmforge.replica", 80), **extra}


async def iterate_app(app: Any, request: ProxiedRequest, **scope_extra: Any
                      ) -> AsyncIterator[ResponseHead | bytes]:
    """Run ``request`` through the ASGI ``app``: yields the ``ResponseHead``, then each
    non-empty body chunk. ``scope_extra`` is added to the ASGI scope.

    Raises:
        RuntimeError: the app ended without starting a response (an app that raises is
            turned into a 500 by its own error middleware before this can happen).
    """
    queue: asyncio.Queue[Any] = asyncio.Queue()
    disconnected = asyncio.Event()
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await queue.put(message)

    async def run() -> None:
        try:
            await app(_scope(request, scope_extra), receive, send)
        finally:
            await queue.put(_END)

    task = asyncio.ensure_future(run())
    try:
        async for item in _messages(queue):
            yield item
        await task  # re-raises what the app raised
    finally:
        disconnected.set()
        if not task.done():
            await asyncio.wait({task}, timeout=5.0)  # let it see the disconnect and clean up
            task.cancel()


async def _messages(queue: asyncio.Queue[Any]) -> AsyncIterator[ResponseHead | bytes]:
    started = False
    while (message := await queue.get()) is not _END:
        if message["type"] == "http.response.start":
            started = True
            yield ResponseHead(message["status"], list(message.get("headers", [])))
        elif message["type"] == "http.response.body":
            if message.get("body"):
                yield bytes(message["body"])
            if not message.get("more_body", False):
                return
    if not started:
        raise RuntimeError("the app ended without a response")


async def call_app(app: Any, request: ProxiedRequest, **scope_extra: Any
                   ) -> tuple[ResponseHead, bytes]:
    """``iterate_app`` collected: the head and the whole body."""
    head, chunks = None, []
    async for item in iterate_app(app, request, **scope_extra):
        if isinstance(item, ResponseHead):
            head = item
        else:
            chunks.append(item)
    assert head is not None  # iterate_app raises when no response started
    return head, b"".join(chunks)
