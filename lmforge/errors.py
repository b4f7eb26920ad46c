"""Typed errors and the one mapping to the OpenAI error envelope.

Every error a user can cause is an ``LMForgeError`` subclass that carries the HTTP status, the
OpenAI ``type``, the offending ``param`` and a ``code``. ``to_envelope()`` renders
``{"error": {"message", "type", "param", "code"}}`` exactly as the OpenAI API does; the server's
single exception handler uses it for responses and SSE streams alike.
"""

from __future__ import annotations

from typing import Any


class LMForgeError(Exception):
    """Base class of every error lmforge reports to a user.

    Attributes:
        message: a human sentence that names the problem and, where one exists, the fix.
        status_code: the HTTP status the server answers with.
        type: the OpenAI error ``type`` string.
        param: the request parameter at fault, or None.
        code: a short machine-readable code, or None.
    """

    status_code: int = 500
    type: str = "server_error"
    default_code: str | None = None
    headers: dict[str, str] | None = None  # extra HTTP response headers, e.g. Retry-After

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def renamed(self, param: str, client_name: str) -> LMForgeError:
        """This error, reported under the name the client used for ``param`` (e.g.
        ``max_tokens`` -> ``max_completion_tokens``) in ``param`` and the message."""
        if self.param == param and client_name != param:
            self.param = client_name
            self.message = self.message.replace(param, client_name)
        return self

    def to_envelope(self) -> dict[str, Any]:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(LMForgeError, ValueError):
    """A request parameter is missing, of the wrong type or out of range (HTTP 400)."""

    status_code = 400
    type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    """Prompt tokens plus requested completion tokens exceed the model's context (HTTP 400)."""

    default_code = "context_length_exceeded"


class AuthenticationError(LMForgeError):
    """Missing or wrong API key (HTTP 401)."""

    status_code = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class NotFoundError(LMForgeError):
    """The named model or object does not exist (HTTP 404)."""

    status_code = 404
    type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    """The request names a model this server does not serve (HTTP 404)."""

    default_code = "model_not_found"


class PayloadTooLargeError(LMForgeError):
    """An upload exceeds the server's size limit (HTTP 413)."""

    status_code = 413
    type = "invalid_request_error"
    default_code = "file_too_large"


class ConflictError(LMForgeError):
    """The object is not in a state that allows the operation, e.g. cancelling a batch that
    already completed (HTTP 409, as the OpenAI API answers such a cancel)."""

    status_code = 409
    type = "invalid_request_error"
    default_code = "conflict"


class RateLimitError(LMForgeError):
    """The server's waiting queue is full (HTTP 429 with a ``Retry-After`` header in seconds).

    As the OpenAI API's rate-limit errors: code ``rate_limit_exceeded``, and ``type``
    ``"requests"`` or ``"tokens"`` naming the limit that was hit (OpenAI's requests-per-minute and
    tokens-per-minute limits; here ``--max-waiting-requests`` and ``--max-waiting-tokens``).
    """

    status_code = 429
    type = "requests"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit: str = "requests", retry_after_s: int = 1):
        super().__init__(message)
        self.type = limit
        self.headers = {"Retry-After": str(retry_after_s)}


class ServiceUnavailableError(LMForgeError):
    """The server cannot answer now: the model is still loading or the server is shutting down
    (HTTP 503, with ``Retry-After`` in seconds when waiting helps)."""

    status_code = 503
    type = "server_error"
    default_code = "service_unavailable"

    def __init__(self, message: str, *, code: str | None = None,
                 retry_after_s: int | None = None):
        super().__init__(message, code=code)
        if retry_after_s is not None:
            self.headers = {"Retry-After": str(retry_after_s)}


class ModelLoadError(LMForgeError):
    """A model path is missing, corrupt or of an unsupported architecture.

    Raised at load time (CLI / offline use), never in answer to a request.
    """

    status_code = 400
    type = "invalid_request_error"
    default_code = "model_load_error"


class EngineDeadError(LMForgeError):
    """The engine loop stopped; the server must be restarted (HTTP 503)."""

    status_code = 503
    type = "server_error"
    default_code = "engine_dead"


class InternalServerError(LMForgeError):
    """An unexpected failure. The message is generic: internals never reach the client."""

    status_code = 500
    type = "server_error"
    default_code = "internal_error"

    def __init__(self, message: str = "The server had an error while processing your request."):
        super().__init__(message)
