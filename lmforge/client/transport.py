"""Where the client sends its requests, and how: configuration, retries, error mapping and
server-sent events, for the synchronous and the asyncio calls alike.

Configuration comes from ``configure(...)`` or, for what it leaves unset, from the environment
at each call (``LMFORGE_BASE_URL``, default ``http://127.0.0.1:8000``; ``LMFORGE_API_KEY``)::

    from lmforge.client import configure
    configure(base_url="http://gpu-box:8000", api_key="sk-...")

Retries follow the ``openai`` SDK (``_base_client.py``): up to ``max_retries`` (2) more attempts
on HTTP 408, 429 and 5xx and on connections that fail before an answer; the wait is the
server's ``Retry-After`` (or ``retry-after-ms``) when it is between 0 and 60 s, else an
exponential backoff from 0.5 s to at most 8 s, less up to 25% jitter. A timeout is not retried
(the work may still be running on the server), nor is a stream once its first byte arrived.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from lmforge.client.errors import (
    APIConnectionError,
    APIError,
    TimeoutError,
    error_for,
    stream_error,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 60.0  # calls without a timeout of their own (files, models, jobs)
DEFAULT_MAX_RETRIES = 2
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 60.0
INITIAL_BACKOFF_S, MAX_BACKOFF_S = 0.5, 8.0


@dataclass
class Settings:
    """What ``configure`` sets; None means "from the environment at each call"."""

    base_url: str | None = None  # the server's root URL; a trailing /v1 is dropped
    api_key: str | None = None  # sent as "Authorization: Bearer KEY"
    max_retries: int = DEFAULT_MAX_RETRIES  # extra attempts after a retryable failure
    timeout: float = DEFAULT_TIMEOUT_S  # seconds, for calls that take no timeout argument

    def resolved_base_url(self) -> str:
        root = (self.base_url or os.environ.get("LMFORGE_BASE_URL") or DEFAULT_BASE_URL)
        root = root.rstrip("/")
        return root[: -len("/v1")] if root.endswith("/v1") else root

    def headers(self) -> dict[str, str]:
        key = self.api_key or os.environ.get("LMFORGE_API_KEY")
        return {"Authorization": f"Bearer {key}"} if key else {}


T = TypeVar("T")

_settings = Settings()
_client_lock = threading.Lock()
_client: tuple[tuple[str, str], httpx.Client] | None = None  # ((base url, key header), client)


def configure(base_url: str | None = None, api_key: str | None = None, *,
              max_retries: int | None = None, timeout: float | None = None) -> Settings:
    """Point every later call at a server, and set how calls retry and time out.

    Args:
        base_url: the server's URL, e.g. ``http://127.0.0.1:8000`` (``.../v1`` is accepted).
            None: ``LMFORGE_BASE_URL``, else ``http://127.0.0.1:8000``.
        api_key: the key to send (None: ``LMFORGE_API_KEY``, else none).
        max_retries: extra attempts after HTTP 408/429/5xx or a failed connection (default 2;
            0 turns retries off).
        timeout: seconds for calls without a ``timeout`` argument (default 60).

    Returns:
        The settings now in force (a copy).

    Raises:
        ValueError: a negative ``max_retries`` or a ``timeout`` that is not positive.
    """
    if max_retries is not None and max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    _settings.base_url = base_url
    _settings.api_key = api_key
    _settings.max_retries = DEFAULT_MAX_RETRIES if max_retries is None else max_retries
    _settings.timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
    return Settings(**vars(_settings))


def settings() -> Settings:
    """The settings in force (a copy)."""
    return Settings(**vars(_settings))


def url(path: str) -> str:
    """The absolute URL of ``path`` (e.g. ``/v1/models``) on the configured server."""
    return _settings.resolved_base_url() + path


def _sync_client() -> httpx.Client:
    """One pooled ``httpx.Client`` per (base URL, API key), replaced when they change."""
    global _client
    key = (_settings.resolved_base_url(), json.dumps(_settings.headers()))
    with _client_lock:
        if _client is None or _client[0] != key:
            if _client is not None:
                _client[1].close()
            _client = (key, httpx.Client(base_url=key[0], headers=_settings.headers()))
        return _client[1]


def _timeout(seconds: float | None) -> httpx.Timeout:
    seconds = _settings.timeout if seconds is None else seconds
    return httpx.Timeout(seconds, connect=min(seconds, 10.0))


def request(method: str, path: str, *, timeout: float | None = None, **kwargs: Any
            ) -> httpx.Response:
    """Send ``method path`` (httpx keyword arguments: ``json``, ``params``, ``data``,
    ``files``) and return the read response, retrying as the module says.

    Args:
        timeout: seconds per connect / read / write (None: the configured default).

    Raises:
        BadRequestError, ConflictError, AuthenticationError, NotFoundError, RateLimitError,
        ServerError: the server's answer (the last attempt's). APIConnectionError: no answer.
        TimeoutError: the timeout ran out.
    """
    with stream(method, path, timeout=timeout, **kwargs) as response:
        response.read()
    return response


@contextmanager
def stream(method: str, path: str, *, timeout: float | None = None, **kwargs: Any
           ) -> Iterator[httpx.Response]:
    """Like ``request``, with the body left to read (``iter_bytes``, ``iter_lines``); a status
    >= 400 raises before anything is yielded."""
    client = _sync_client()
    started = False  # errors once the body is being read are the caller's, never retried
    for attempt in range(_settings.max_retries + 1):
        _rewind(kwargs.get("files"))
        last = attempt == _settings.max_retries
        try:
            with _mapped_transport_errors(), client.stream(
                    method, path, timeout=_timeout(timeout), **kwargs) as response:
                if response.status_code < 400:
                    started = True
                    yield response
                    return
                response.read()
                if last or response.status_code not in RETRY_STATUSES:
                    raise error_for(response.status_code, response.content)
                wait = retry_wait(attempt, response.headers)
        except APIConnectionError as e:
            if started or last or isinstance(e, TimeoutError):
                raise
            wait = retry_wait(attempt, None)
        _pause(wait)


@asynccontextmanager
async def astream(method: str, path: str, *, timeout: float | None = None, **kwargs: Any
                  ) -> AsyncIterator[httpx.Response]:
    """The asyncio twin of ``stream`` (a fresh ``httpx.AsyncClient`` per call, so calls work
    from any event loop)."""
    async with httpx.AsyncClient(base_url=_settings.resolved_base_url(),
                                 headers=_settings.headers()) as client:
        started = False
        for attempt in range(_settings.max_retries + 1):
            _rewind(kwargs.get("files"))
            last = attempt == _settings.max_retries
            try:
                with _mapped_transport_errors():
                    async with client.stream(method, path, timeout=_timeout(timeout),
                                             **kwargs) as response:
                        if response.status_code < 400:
                            started = True
                            yield response
                            return
                        await response.aread()
                        if last or response.status_code not in RETRY_STATUSES:
                            raise error_for(response.status_code, response.content)
                        wait = retry_wait(attempt, response.headers)
            except APIConnectionError as e:
                if started or last or isinstance(e, TimeoutError):
                    raise
                wait = retry_wait(attempt, None)
            await _apause(wait)


async def arequest(method: str, path: str, *, timeout: float | None = None, **kwargs: Any
                   ) -> httpx.Response:
    """The asyncio twin of ``request``."""
    async with astream(method, path, timeout=timeout, **kwargs) as response:
        await response.aread()
    return response


def sse_events(method: str, path: str, *, timeout: float | None = None, **kwargs: Any
               ) -> Iterator[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream, up to ``data: [DONE]``.

    Raises:
        What ``request`` raises, before the first event; ``BadRequestError`` or
        ``ServerError`` for an ``{"error": ...}`` event inside the stream.
    """
    with stream(method, path, timeout=timeout, **kwargs) as response:
        for line in response.iter_lines():
            payload = _sse_payload(line)
            if payload is _DONE:
                return
            if payload is not None:
                yield payload


async def asse_events(method: str, path: str, *, timeout: float | None = None, **kwargs: Any
                      ) -> AsyncIterator[dict[str, Any]]:
    """The asyncio twin of ``sse_events``."""
    async with astream(method, path, timeout=timeout, **kwargs) as response:
        async for line in response.aiter_lines():
            payload = _sse_payload(line)
            if payload is _DONE:
                return
            if payload is not None:
                yield payload


_DONE: dict[str, Any] = {}


def _sse_payload(line: str) -> dict[str, Any] | None:
    """The JSON of one ``data:`` line (``_DONE`` for ``[DONE]``; None for anything else:
    blank separators, comments, other fields).

    Raises:
        APIError: an error event.
    """
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    if data == "[DONE]":
        return _DONE
    try:
        payload = json.loads(data)
    except ValueError as e:
        raise APIError(f"the server sent an event that is not JSON: {data[:200]!r}") from e
    if isinstance(payload, dict) and "error" in payload:
        raise stream_error(payload)
    return payload


def _pause(seconds: float) -> None:
    """The wait before a retry (a seam: tests record the waits instead of sleeping)."""
    time.sleep(seconds)


async def _apause(seconds: float) -> None:
    await asyncio.sleep(seconds)


def retry_wait(attempt: int, headers: httpx.Headers | None) -> float:
    """Seconds to wait before retry ``attempt + 1``: the server's ``retry-after-ms`` or
    ``Retry-After`` (seconds or an HTTP date) when in (0, 60], else exponential backoff from
    0.5 s, capped at 8 s, less up to 25% jitter (the ``openai`` SDK's rule)."""
    if headers is not None:
        asked = _retry_after(headers)
        if asked is not None and 0 < asked <= MAX_RETRY_AFTER_S:
            return asked
    backoff = min(INITIAL_BACKOFF_S * 2.0 ** attempt, MAX_BACKOFF_S)
    return backoff * (1 - 0.25 * random.random())


def _retry_after(headers: httpx.Headers) -> float | None:
    try:
        if "retry-after-ms" in headers:
            return float(headers["retry-after-ms"]) / 1000
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return float(value)
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return when.timestamp() - time.time()
    except (TypeError, ValueError):
        return None


@contextmanager
def _mapped_transport_errors() -> Iterator[None]:
    """httpx's timeouts and transport errors as the client's ``TimeoutError`` and
    ``APIConnectionError``, naming the server and how to point at another."""
    try:
        yield
    except httpx.TimeoutException as e:
        if isinstance(e, httpx.ConnectTimeout):
            raise _unreachable(e) from e
        raise TimeoutError(f"the lmforge server at {_settings.resolved_base_url()} did not "
                           f"answer in time ({type(e).__name__}); pass a larger timeout") from e
    except httpx.TransportError as e:
        raise _unreachable(e) from e


def _unreachable(e: Exception) -> APIConnectionError:
    return APIConnectionError(
        f"cannot reach the lmforge server at {_settings.resolved_base_url()} "
        f"({type(e).__name__}: {e}); start one with `lmforge serve`, or point at yours with "
        "LMFORGE_BASE_URL or lmforge.client.configure(base_url=...)")


def _rewind(files: Any) -> None:
    """Seek uploaded file objects back to their start before a (re)try."""
    if not isinstance(files, dict):
        return
    for value in files.values():
        handle = value[1] if isinstance(value, tuple) else value
        if hasattr(handle, "seek"):
            handle.seek(0)


def list_all(path: str, params: dict[str, Any] | None = None, page_size: int = 100
             ) -> list[dict[str, Any]]:
    """Every item of an OpenAI list endpoint (``{"data", "has_more"}``), following
    ``after=<last id>`` page by page, in the server's order."""
    items: list[dict[str, Any]] = []
    query = {**(params or {}), "limit": page_size}
    while True:
        page = request("GET", path, params=query).json()
        items += page["data"]
        if not page.get("has_more") or not page["data"]:
            return items
        query["after"] = page["data"][-1]["id"]


def poll_until_final(fetch: Callable[[], T], is_final: Callable[[T], bool], poll_interval: float,
                     timeout: float | None, describe: Callable[[T], str]) -> T:
    """Call ``fetch()`` every ``poll_interval`` seconds until ``is_final`` of its value; return
    that value (``Batch.wait``, ``FineTune.wait``).

    Raises:
        TimeoutError: not final after ``timeout`` seconds, naming ``describe(last value)``.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        value = fetch()
        if is_final(value):
            return value
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{describe(value)} after {timeout:g} s; it keeps running on "
                               "the server")
        time.sleep(poll_interval)
