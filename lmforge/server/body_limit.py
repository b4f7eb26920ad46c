"""A size limit on request bodies (``--max-request-mb``), enforced before any route reads them.

A JSON body is read whole into memory and parsed on the event loop, so an unbounded one costs
memory and stalls every other request while it is parsed (~0.1 s per 30 MB of text, ~1 s per
30 MB of token ids). ``BodyLimitMiddleware`` answers 413 in the OpenAI envelope (code
``request_too_large``; RFC 9110 section 15.5.14) for a body over the limit: at once from
``Content-Length``, or, for a chunked body, as soon as the bytes received pass it. Either way
the route never runs and the rest of the body is never stored: uvicorn reads and drops what the
client still sends once the 413 is out, so the keep-alive connection serves the client's next
request. A client that sent
``Expect: 100-continue`` has sent no body yet and is told ``Connection: close`` instead (RFC
9110 section 10.1.1: it may or may not send the body now, so the framing is lost).

``POST /v1/files`` keeps its own, larger limit (``--max-upload-mb``, ``server/uploads.py``).
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.errors import PayloadTooLargeError

# Routes with a limit of their own; the prefix covers the whole /v1/files tree.
EXEMPT_PREFIXES = ("/v1/files",)


class BodyLimitMiddleware:
    """ASGI middleware: 413 for a request body over ``max_bytes`` on every route but
    ``exempt`` ones (see the module docstring).

    Args:
        max_bytes: the largest body accepted, in bytes (``ServerConfig.max_request_mb`` MiB).
        exempt: path prefixes left alone.
    """

    def __init__(self, app: ASGIApp, max_bytes: int,
                 exempt: tuple[str, ...] = EXEMPT_PREFIXES):
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = _content_length(headers)
        if declared is not None:
            if declared > self.max_bytes:
                await self._refuse(scope, receive, send, headers, declared)
                return
            await self.app(scope, receive, send)  # the server stops at Content-Length
            return
        if "chunked" not in headers.get("transfer-encoding", "").lower():
            await self.app(scope, receive, send)  # no body (HTTP/1.1 framing)
            return
        first = await self._read_chunked(receive)
        if first is None:
            await self._refuse(scope, receive, send, headers, None)
            return
        await self.app(scope, _replay(first, receive), send)

    async def _read_chunked(self, receive: Receive) -> Message | None:
        """The whole chunked body as one ``http.request`` message (what the route would read
        anyway), a disconnect as it came, or None once the bytes pass the limit."""
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_bytes:
                return None
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, headers: Headers,
                      size: int | None) -> None:
        mb = self.max_bytes / 2**20
        what = f"is {size} bytes" if size is not None else "passed"
        error = PayloadTooLargeError(
            f"The request body {what}, over this server's limit of {mb:g} MB; send a smaller "
            "request (fewer or shorter prompts), or start the server with a larger "
            "--max-request-mb.", code="request_too_large")
        close = "100-continue" in headers.get("expect", "").lower()
        response = JSONResponse(error.to_envelope(), status_code=error.status_code,
                                headers={"Connection": "close"} if close else None)
        await response(scope, receive, send)


def _content_length(headers: Headers) -> int | None:
    try:
        return int(headers["content-length"])
    except KeyError:
        return None
    except ValueError:  # uvicorn refuses a malformed one before the app sees it
        return 0


def _replay(first: Message, receive: Receive) -> Receive:
    """A ``receive`` that returns ``first`` once, then defers to ``receive`` (which reports the
    client's disconnect to routes that watch for it)."""
    pending = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
