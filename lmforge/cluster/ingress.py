"""The Ray Serve ingress: one OpenAI endpoint in front of N engine replicas.

Every request is read whole, routed (``router.PrefixAffinityRouter``: a conversation's prefix
stays on one replica, else the least loaded replica), and forwarded as data
(``asgi_call.ProxiedRequest``) to the chosen replica's ``handle`` (a whole response) or
``handle_stream`` (``"stream": true``: the head, then each SSE event as the replica makes it).

When a replica dies (its actor is gone: ``ActorDiedError``/``ActorUnavailableError``), the
router stops sending it requests and a probe marks it up again once Serve has replaced it.
A request it was serving is retried once on another replica if nothing was sent to the client
yet and it is safe to repeat (inference routes and GETs); otherwise the client gets a 503 in
the OpenAI envelope with ``Retry-After`` (in a stream already started, an error event, then
``[DONE]``, as ``server/sse.py`` ends any stream that fails). No request waits on a dead
replica.

``/health`` is 200 while any replica is healthy (each replica's own /health, listed);
``/metrics`` is every replica's page with a ``replica`` label (``metrics_merge``) plus the
router's own counters.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from lmforge.cluster.asgi_call import ProxiedRequest, ResponseHead
from lmforge.cluster.metrics_merge import CONTENT_TYPE, merge_pages
from lmforge.cluster.router import NoReplicaError, PrefixAffinityRouter, RouterConfig, routing_key
from lmforge.errors import ServiceUnavailableError

logger = logging.getLogger(__name__)

# paths whose requests may run twice without a visible effect (nothing stored)
_REPEATABLE = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize",
               "/detokenize")
_PROBE_S = 1.0  # how often a dead replica is asked whether its replacement serves
_PAGE_TIMEOUT_S = 5.0  # a replica's /health or /metrics answer, at most


def _lost_replica_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return (ActorDiedError, ActorUnavailableError, RayActorError)


def unavailable(message: str) -> JSONResponse:
    """503 in the OpenAI envelope, retryable after a second."""
    error = ServiceUnavailableError(message, code="replica_unavailable", retry_after_s=1)
    return JSONResponse(error.to_envelope(), status_code=503, headers=error.headers)


class IngressCore:
    """The ingress's behaviour over Serve deployment handles (the Serve class adds routes).

    Args:
        handles: the engine replicas' handles in name order (``engine-0``, ...).
        router_config: the routing policy's knobs.
    """

    def __init__(self, handles: list[Any], router_config: RouterConfig | None = None):
        self.names = [f"engine-{i}" for i in range(len(handles))]
        self.handles = dict(zip(self.names, handles))
        self.router = PrefixAffinityRouter(self.names, router_config)
        self.retries = 0
        self._lost = _lost_replica_errors()
        self._probes: dict[str, asyncio.Task] = {}

    async def proxy(self, request: Request) -> Response:
        """Forward ``request`` to a replica and return its response."""
        proxied = ProxiedRequest(request.method, request.url.path, request.url.query.encode(),
                                 list(request.headers.raw), await request.body())
        body = _json(proxied.body) if request.method == "POST" else None
        key = routing_key(body)
        repeatable = request.method == "GET" or request.url.path in _REPEATABLE
        if isinstance(body, dict) and body.get("stream") is True:
            return await self._stream(proxied, key, repeatable)
        return await self._unary(proxied, key, repeatable)

    async def _unary(self, proxied: ProxiedRequest, key: str | None, repeatable: bool
                     ) -> Response:
        async def send(name: str) -> Response:
            try:
                head, body = await self.handles[name].handle.remote(proxied)
            finally:
                self.router.release(name)
            return _response(head, body)

        return await self._with_retry(key, repeatable, send)

    async def _stream(self, proxied: ProxiedRequest, key: str | None, repeatable: bool
                      ) -> Response:
        async def send(name: str) -> Response:
            stream = self.handles[name].options(stream=True).handle_stream.remote(proxied)
            try:
                head = await stream.__anext__()
            except BaseException:
                self.router.release(name)
                raise
            response = StreamingResponse(self._rest(stream, name), status_code=head.status)
            response.raw_headers = list(head.headers)
            return response  # ``_rest`` releases the replica when the stream ends

        return await self._with_retry(key, repeatable, send)

    async def _with_retry(self, key: str | None, repeatable: bool,
                          send: Callable[[str], Awaitable[Response]]) -> Response:
        """``send(replica)`` on the routed replica; if that replica is lost before answering,
        once more on another when ``repeatable``; else a retryable 503."""
        tried: tuple[str, ...] = ()
        while len(tried) < (2 if repeatable else 1):
            try:
                name = self.router.choose(key, exclude=tried)
            except NoReplicaError:
                break
            try:
                return await send(name)
            except self._lost as e:
                self._replica_lost(name, e)
                tried += (name,)
        return unavailable("the engine replica serving this request stopped; retry")

    async def _rest(self, stream: Any, name: str) -> AsyncIterator[bytes]:
        """The body chunks after the head; a replica lost mid-stream ends it with an error
        event (the status is already sent)."""
        try:
            async for chunk in stream:
                yield chunk
        except self._lost as e:
            self._replica_lost(name, e)
            error = ServiceUnavailableError("the engine replica serving this stream stopped; "
                                            "retry", code="replica_unavailable")
            yield f"data: {json.dumps(error.to_envelope())}\n\ndata: [DONE]\n\n".encode()
        finally:
            self.router.release(name)
            stream.cancel()  # the client left early: abort the replica's request

    def _replica_lost(self, name: str, error: BaseException) -> None:
        logger.warning("replica %s lost (%s); routing around it until it serves again",
                       name, type(error).__name__)
        self.retries += 1
        self.router.mark_down(name)
        if name not in self._probes or self._probes[name].done():
            self._probes[name] = asyncio.ensure_future(self._probe(name))

    async def _probe(self, name: str) -> None:
        """Ask ``name`` every ``_PROBE_S`` until its replacement answers, then route to it."""
        while True:
            call = self.handles[name].ping.remote()
            try:
                await asyncio.wait_for(asyncio.shield(call), timeout=_PROBE_S)
                break
            except asyncio.TimeoutError:
                call.cancel()
            except self._lost:
                await asyncio.sleep(_PROBE_S)
        logger.info("replica %s serves again", name)
        self.router.mark_up(name)

    async def health(self, request: Request) -> Response:
        """200 when any replica's /health is 200; the body lists each one's status."""
        pages = await self._pages("/health", request)
        states = {name: _status(head, body) for name, (head, body) in pages.items()}
        ok = any(head is not None and head.status == 200 for head, _ in pages.values())
        return JSONResponse({"status": "ok" if ok else "unhealthy", "replicas": states},
                            status_code=200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        """Every replica's /metrics with a ``replica`` label, then the router's counters."""
        pages = await self._pages("/metrics", request)
        texts = {}
        for name, (head, body) in pages.items():
            if head is not None and head.status != 200:  # 401 without the API key
                return _response(head, body)
            if head is not None:
                texts[name] = body.decode()
        return Response(merge_pages(texts) + self._router_metrics(), media_type=CONTENT_TYPE)

    async def _pages(self, path: str, request: Request
                     ) -> dict[str, tuple[ResponseHead | None, bytes]]:
        proxied = ProxiedRequest("GET", path, b"", list(request.headers.raw))

        async def one(name: str) -> tuple[ResponseHead | None, bytes]:
            if name in self.router.down:
                return None, b""
            call = self.handles[name].handle.remote(proxied)
            try:
                return await asyncio.wait_for(asyncio.shield(call), timeout=_PAGE_TIMEOUT_S)
            except (asyncio.TimeoutError, *self._lost):
                call.cancel()
                return None, b""

        results = await asyncio.gather(*(one(n) for n in self.names))
        return dict(zip(self.names, results))

    def _router_metrics(self) -> str:
        lines = ["# HELP lmforge_router_requests_total Requests the ingress sent to each "
                 "replica.", "# TYPE lmforge_router_requests_total counter"]
        lines += [f'lmforge_router_requests_total{{replica="{n}"}} {self.router.routed[n]}'
                  for n in self.names]
        lines += ["# HELP lmforge_router_in_flight Requests each replica serves now.",
                  "# TYPE lmforge_router_in_flight gauge"]
        lines += [f'lmforge_router_in_flight{{replica="{n}"}} {self.router.in_flight[n]}'
                  for n in self.names]
        lines += ["# HELP lmforge_router_replica_up Whether the router sends the replica "
                  "requests (0 after it died, until its replacement answers).",
                  "# TYPE lmforge_router_replica_up gauge"]
        lines += [f'lmforge_router_replica_up{{replica="{n}"}} {int(n not in self.router.down)}'
                  for n in self.names]
        lines += ["# HELP lmforge_router_replica_losses_total Requests that found their "
                  "replica dead.", "# TYPE lmforge_router_replica_losses_total counter",
                  f"lmforge_router_replica_losses_total {self.retries}"]
        return "\n".join(lines) + "\n"


def _response(head: ResponseHead, body: bytes) -> Response:
    response = Response(body, status_code=head.status)
    response.raw_headers = list(head.headers)  # the replica's, content-length included
    return response


def _status(head: ResponseHead | None, body: bytes) -> str:
    """A replica's /health status word ("ok", "loading", ...), or "down" without an answer."""
    if head is None:
        return "down"
    answer = _json(body)
    return answer.get("status", str(head.status)) if isinstance(answer, dict) else "down"


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:  # the replica answers the 400
        return None
