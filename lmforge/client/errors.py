"""The client's typed errors, mapped once from an HTTP status (``error_for``).

Each carries the server's message (from the OpenAI error envelope
``{"error": {"message", "type", "param", "code"}}``), the status and the envelope's other fields.
The classes follow LLM Engine's client (``llmengine/errors.py``) in meaning; the ``openai``
SDK's names are kept where LLM Engine has none. ``UnauthorizedError`` and
``RateLimitExceededError`` are LLM Engine's spellings of two of them, so that code written for
``llmengine`` catches the same errors.

==========================  ================================================================
status                      error
==========================  ================================================================
400, 413, 422, other 4xx    ``BadRequestError`` (409: ``ConflictError``, a subclass)
401, 403                    ``AuthenticationError``
404                         ``NotFoundError``
429                         ``RateLimitError`` (retried first, honouring ``Retry-After``)
5xx                         ``ServerError`` (retried first)
no answer                   ``APIConnectionError``; ``TimeoutError`` when a timeout ran out
==========================  ================================================================
"""

from __future__ import annotations

import builtins
import json
from typing import Any


class APIError(Exception):
    """Base class of every error the client raises.

    Attributes:
        message: the server's message (or the client's, for connection errors).
        status_code: the HTTP status, or None (no answer, or an error inside a stream).
        type, param, code: the OpenAI error envelope's fields, when the server sent them.
    """

    def __init__(self, message: str, *, status_code: int | None = None, type: str | None = None,
                 param: str | None = None, code: str | None = None):
        super().__init__(message if status_code is None else f"{message} (HTTP {status_code})")
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code


class BadRequestError(APIError):
    """The request was refused as it is (HTTP 400, 413, 422 and other 4xx): do not retry it
    unchanged; ``param`` names the offending parameter when the server knows it."""


class ConflictError(BadRequestError):
    """The request conflicts with the resource's state (HTTP 409), e.g. cancelling a batch or
    fine-tuning job that already finished."""


class AuthenticationError(APIError):
    """No valid API key (HTTP 401) or not allowed (403): set ``LMFORGE_API_KEY`` or
    ``configure(api_key=...)`` to a key the server was started with (``--api-key``)."""


class NotFoundError(APIError):
    """No such model, file, batch or fine-tuning job (HTTP 404)."""


class RateLimitError(APIError):
    """The server's queue is full (HTTP 429), still so after the client's retries."""


class ServerError(APIError):
    """The server failed (HTTP 5xx, or an error event inside a stream), still so after the
    client's retries."""


class APIConnectionError(APIError):
    """The server could not be reached, or the connection broke before an answer."""


class TimeoutError(APIConnectionError, builtins.TimeoutError):
    """The call's timeout ran out (also a builtin ``TimeoutError``). Not retried: a generation
    that timed out may still be running on the server."""


UnauthorizedError = AuthenticationError  # LLM Engine's name
RateLimitExceededError = RateLimitError  # LLM Engine's name


def error_for(status_code: int, body: bytes) -> APIError:
    """The typed error of a response with ``status_code`` >= 400 and this ``body`` (an OpenAI
    error envelope, FastAPI's ``{"detail": ...}``, or any text)."""
    fields = _envelope(body)
    if status_code == 409:
        kind: type[APIError] = ConflictError
    elif status_code in (401, 403):
        kind = AuthenticationError
    elif status_code == 404:
        kind = NotFoundError
    elif status_code == 429:
        kind = RateLimitError
    elif status_code >= 500:
        kind = ServerError
    else:
        kind = BadRequestError
    return kind(status_code=status_code, **fields)


def stream_error(payload: dict[str, Any]) -> APIError:
    """The typed error of an ``{"error": {...}}`` event inside an SSE stream (the HTTP status was
    200 by then): ``BadRequestError`` for an ``invalid_request_error``, else ``ServerError``."""
    fields = _envelope(json.dumps(payload).encode())
    kind = BadRequestError if fields.get("type") == "invalid_request_error" else ServerError
    return kind(**fields)


def _envelope(body: bytes) -> dict[str, Any]:
    """``message``, ``type``, ``param`` and ``code`` from an error body."""
    try:
        payload = json.loads(body)
    except ValueError:
        return {"message": body.decode("utf-8", "replace").strip()[:1000] or "no message"}
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return {"message": str(error.get("message") or "no message"), "type": error.get("type"),
                "param": error.get("param"), "code": error.get("code")}
    if isinstance(payload, dict) and "detail" in payload:
        return {"message": str(payload["detail"])}
    return {"message": str(payload)[:1000]}
