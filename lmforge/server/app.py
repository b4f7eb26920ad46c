"""The FastAPI application: lifespan, API-key and readiness gate, and health.

Every failure leaves the server as the OpenAI envelope ``{"error": {message, type, param,
code}}``; ``server/errors.py`` is the one place that maps exceptions to it.

``AccessMiddleware`` guards the whole app, so a router added later is covered without doing
anything: every request but ``GET /health`` needs an API key (when the server has any), and
while the model is loading every route but ``/health`` and ``/metrics`` answers 503.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from lmforge.config import ServerConfig
from lmforge.errors import AuthenticationError, LMForgeError, ServiceUnavailableError
from lmforge.jobs.batch_worker import BatchWorker
from lmforge.jobs.fine_tuning_worker import FineTuningWorker
from lmforge.jobs.store import Store
from lmforge.jobs.worker import INTERNAL_SCOPE_KEY
from lmforge.server import (
    batches,
    embeddings,
    files,
    fine_tuning,
    inference,
    metrics,
    models,
    tokenize,
)
from lmforge.server.body_limit import BodyLimitMiddleware
from lmforge.server.errors import envelope, install_error_handlers

if TYPE_CHECKING:
    from lmforge.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)

_LOADING_RETRY_AFTER_S = 5
# routes that answer while the model loads: they need the store, not the engine
_WITHOUT_ENGINE = ("/metrics", "/v1/files", "/v1/batches")


def build_app(engine: AsyncEngine, server_config: ServerConfig,
              chat_template: str | None = None, store: Store | None = None) -> FastAPI:
    """The OpenAI-compatible app serving ``engine`` (already loaded).

    Args:
        engine: started in the lifespan and shut down with it.
        server_config: ``api_keys`` (empty = no authentication) guard every route but
            ``GET /health``; ``watchdog_timeout`` is /health's limit on a silent engine loop.
        chat_template: Jinja text overriding the tokenizer's chat template (``--chat-template``).
        store: the jobs store (files, batches); None = one at ``server_config.database_url``.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        await _start_workers(app, engine)
        try:
            yield
        finally:
            await _stop_workers(app)
            engine.shutdown()

    app = _new_app(server_config, chat_template, lifespan, store)
    app.state.engine = engine
    return app


def build_loading_app(loading: Future[AsyncEngine], server_config: ServerConfig,
                      chat_template: str | None = None,
                      on_ready: Callable[[AsyncEngine], None] | None = None) -> FastAPI:
    """Like ``build_app``, for an engine still loading (``AsyncEngine.load_in_background``), so
    that the server listens at once: until ``loading`` is done, ``/health`` and every route but
    ``/metrics`` answer 503 (``Retry-After``); then the lifespan starts the engine, serves it,
    and calls ``on_ready(engine)`` (in the event loop). If loading fails, the error is logged,
    kept in ``app.state.load_error`` and /health stays 503; the caller decides to exit.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        adopt = asyncio.ensure_future(_adopt(app, loading, on_ready))
        try:
            yield
        finally:
            adopt.cancel()
            await asyncio.gather(adopt, return_exceptions=True)
            await _stop_workers(app)
            if app.state.engine is not None:
                app.state.engine.shutdown()
            else:  # still loading: stop the engine thread once the load returns
                loading.add_done_callback(_shutdown_loaded)

    app = _new_app(server_config, chat_template, lifespan)
    app.state.engine = None
    return app


async def _adopt(app: FastAPI, loading: Future[AsyncEngine],
                 on_ready: Callable[[AsyncEngine], None] | None) -> None:
    try:
        engine = await asyncio.wrap_future(loading)
    except Exception as e:
        logger.error("loading the model failed: %s", e)
        app.state.load_error = e
        return
    engine.start()
    app.state.engine = engine
    await _start_workers(app, engine)
    if on_ready is not None:
        on_ready(engine)


async def _start_workers(app: FastAPI, engine: AsyncEngine) -> None:
    """Serve the ``--lora`` adapters, then run batches (``jobs/batch_worker.py``) and fine-tuning jobs
    (``jobs/fine_tuning_worker.py``) on the served model, resuming any a restart interrupted;
    their routes wake them.

    Raises:
        ModelLoadError / InvalidRequestError: a ``--lora`` adapter cannot be served.
    """
    config: ServerConfig = app.state.server_config
    for name, path in config.loras.items():
        await engine.add_lora(name, path)
    app.state.batch_worker = BatchWorker(app.state.store, app, lambda: {engine.model_name},
                                         concurrency=config.batch_concurrency,
                                         lease_s=config.job_lease_s)
    app.state.batch_worker.start()
    if config.fine_tuning:
        app.state.fine_tuning_worker = FineTuningWorker(app.state.store, engine,
                                                        lease_s=config.job_lease_s)
        app.state.fine_tuning_worker.start()


async def _stop_workers(app: FastAPI) -> None:
    for worker in (app.state.batch_worker, app.state.fine_tuning_worker):
        if worker is not None:
            await worker.stop()


def _shutdown_loaded(loading: Future[AsyncEngine]) -> None:
    if not loading.cancelled() and loading.exception() is None:
        loading.result().shutdown()


def _new_app(server_config: ServerConfig, chat_template: str | None, lifespan: Any,
             store: Store | None = None) -> FastAPI:
    # strict_content_type=False: parse a body sent without Content-Type as JSON (curl -d ...).
    app = FastAPI(title="lmforge", lifespan=lifespan, strict_content_type=False)
    app.state.server_config = server_config
    app.state.store = store if store is not None else Store(server_config.database_url)
    app.state.batch_worker = app.state.fine_tuning_worker = None  # started with the engine
    app.state.chat_template = chat_template
    app.state.load_error = None
    app.state.metrics = metrics.ServerMetrics(lambda: app.state.engine)
    install_error_handlers(app)
    routers = (inference.router, models.router, embeddings.router, tokenize.router,
               metrics.router, batches.router, files.router, fine_tuning.router)
    for router in routers:
        app.include_router(router)
    # inside AccessMiddleware: a client without a key gets its 401 before any body is read
    app.add_middleware(BodyLimitMiddleware, max_bytes=server_config.max_request_mb * 2**20)
    app.add_middleware(AccessMiddleware, server_config=server_config)
    app.add_middleware(metrics.HTTPMetricsMiddleware, metrics=app.state.metrics,  # outermost
                       routes=[route for router in routers for route in router.routes])

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 ``{"status": "ok"}``; 503 ``{"status": "loading" | "unhealthy", "reason"}``."""
        problem = _health_problem(app.state.engine, server_config.watchdog_timeout,
                                  app.state.load_error)
        if problem is None:
            return JSONResponse({"status": "ok"})
        status, reason = problem
        return JSONResponse({"status": status, "reason": reason}, status_code=503)

    return app


def _health_problem(engine: AsyncEngine | None, watchdog_timeout: float,
                    load_error: BaseException | None) -> tuple[str, str] | None:
    """None when healthy, else (status, reason). The loop refreshes ``last_step_time`` after
    every step and every idle second, so a stale one means a step is stuck."""
    if load_error is not None:  # its message (paths) stays in the log: /health needs no key
        return "unhealthy", "loading the model failed; see the server log"
    if engine is None:
        return "loading", "the model is still loading"
    if engine.error is not None:
        return "unhealthy", "the engine loop died; see the server log and restart the server"
    silent = time.monotonic() - engine.last_step_time
    if silent > watchdog_timeout:
        return "unhealthy", (f"the engine loop has not stepped for {silent:.1f} s (watchdog "
                             f"{watchdog_timeout:g} s)")
    return None


class AccessMiddleware:
    """ASGI middleware in front of every route: the API key, then readiness.

    The key is ``Authorization: Bearer KEY`` or ``x-api-key: KEY`` (Anthropic's header, which
    several clients send); every request but ``GET /health`` needs one when
    ``server_config.api_keys`` is set, unknown URLs included (401 before 404, as OpenAI).
    """

    def __init__(self, app: ASGIApp, server_config: ServerConfig):
        self.app = app
        self.keys = server_config.api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not (scope["path"] == "/health"
                                            and scope["method"] == "GET"):
            error = self._refusal(scope)
            if error is not None:
                await envelope(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> LMForgeError | None:
        if self.keys and not scope.get(INTERNAL_SCOPE_KEY):  # the batch worker, in-process
            headers = Headers(scope=scope)
            scheme, _, bearer = headers.get("authorization", "").partition(" ")
            offered = [bearer.strip()] if scheme.lower() == "bearer" else []
            offered += [k.strip() for k in headers.getlist("x-api-key")]
            if not offered:
                return AuthenticationError(
                    "You didn't provide an API key; send 'Authorization: Bearer KEY' or "
                    "'x-api-key: KEY' with a key the server was started with (--api-key).")
            if not any(api_key_matches(key, self.keys) for key in offered):
                return AuthenticationError("Incorrect API key provided.")
        state = scope["app"].state
        if state.engine is None and not scope["path"].startswith(_WITHOUT_ENGINE):
            if state.load_error is not None:
                return ServiceUnavailableError("Loading the model failed; see the server log.",
                                               code="model_load_failed")
            return ServiceUnavailableError("The model is still loading; retry in a few seconds.",
                                           code="model_loading",
                                           retry_after_s=_LOADING_RETRY_AFTER_S)
        return None


def api_key_matches(offered: str, keys: list[str]) -> bool:
    """Whether ``offered`` is one of ``keys``, compared in constant time against EVERY key, so
    the time taken reveals neither a near match nor which key matched."""
    matches = [hmac.compare_digest(offered.encode(), key.encode()) for key in keys]
    return any(matches)
