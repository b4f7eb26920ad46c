"""The one error-handling layer: every failure leaves the server as the OpenAI envelope
``{"error": {message, type, param, code}}``, and no failure costs the client its connection.

- ``LMForgeError`` answers with its ``to_envelope()`` (and its ``headers``, e.g. ``Retry-After``);
- pydantic validation errors are a 400 naming the first bad field (never FastAPI's 422);
- Starlette's 404/405 for unknown routes and wrong methods keep their status;
- anything unexpected is a generic 500 whose details stay in the server log.

Starlette's outermost ``ServerErrorMiddleware`` re-raises an unexpected exception after
answering, and uvicorn then closes the connection, so a keep-alive client's next request would
fail ("connection reset"). ``ErrorBoundaryMiddleware`` sits inside it, answers the 500 itself
and swallows the exception: the connection stays usable, as after any other error.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.errors import (
    InternalServerError,
    InvalidRequestError,
    LMForgeError,
    NotFoundError,
)

logger = logging.getLogger(__name__)

_JSON_HINT = ("We could not parse the JSON body of your request. (HINT: This likely means you "
              "aren't using your HTTP library correctly. The API expects a JSON payload, but what "
              "was sent was not valid JSON.)")


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception to the OpenAI error envelope (see the module docstring)."""

    @app.exception_handler(LMForgeError)
    async def on_lmforge_error(request: Request, exc: LMForgeError) -> JSONResponse:
        return envelope(exc)  # with exc.headers (Retry-After of 429 and 503)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return envelope(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        route = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            err: LMForgeError = NotFoundError(f"Invalid URL ({route})", code="unknown_url")
        elif exc.status_code == 405:
            err = InvalidRequestError(f"Method not allowed ({route})", code="method_not_allowed")
        else:
            err = InvalidRequestError(str(exc.detail))
        return envelope(err, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Only reached by a failure outside ErrorBoundaryMiddleware (in an outer middleware).
        logger.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return envelope(InternalServerError())

    app.add_middleware(ErrorBoundaryMiddleware)  # added first: the innermost middleware


class ErrorBoundaryMiddleware:
    """Turn an exception that escaped the routes into a logged, generic 500 envelope without
    re-raising it (see the module docstring). If the response had already started (a stream),
    the body is ended cleanly instead; the stream's own code sends error events before that.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = {"started": False, "ended": False}

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                state["ended"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not state["started"]:
                await envelope(InternalServerError())(scope, receive, send)
            elif not state["ended"]:
                await send({"type": "http.response.body", "body": b"", "more_body": False})


def envelope(err: LMForgeError, status_code: int | None = None,
             headers: dict[str, str] | None = None) -> JSONResponse:
    """The response carrying ``err`` as the OpenAI envelope (``err.status_code`` unless
    ``status_code`` is given; ``err.headers`` unless ``headers`` is)."""
    return JSONResponse(err.to_envelope(), status_code=status_code or err.status_code,
                        headers=headers if headers is not None else err.headers)


def validation_error(errors: list[dict[str, Any]]) -> LMForgeError:
    """One pydantic/FastAPI validation error list -> one 400 naming the most specific bad field.

    Priority: unparsable JSON, then a non-object body, then an unknown top-level argument
    (OpenAI checks those first), then the error with the deepest location (inside a union that
    is the member the client most likely meant).
    """
    body_errors = [e for e in errors if e["loc"] and e["loc"][0] == "body"] or errors
    for e in body_errors:
        if e["type"] == "json_invalid":
            detail = (e.get("ctx") or {}).get("error")
            return InvalidRequestError(f"{_JSON_HINT} {detail}." if detail else _JSON_HINT)
        if tuple(e["loc"]) == ("body",):
            if e["type"] == "missing":
                return InvalidRequestError("The request body is empty; send a JSON object.")
            return InvalidRequestError("The request body must be a JSON object (sent with "
                                       "Content-Type: application/json).")
    unknown = [e for e in body_errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 2]
    e = unknown[0] if unknown else max(body_errors, key=lambda e: len(e["loc"]))
    if isinstance(cause := (e.get("ctx") or {}).get("error"), LMForgeError):
        return cause
    where = e["loc"][:1]  # a query or path parameter is named as plainly as a body field
    param = _param_name(e["loc"][1:] if where in (("body",), ("query",), ("path",)) else e["loc"])
    if e["type"] == "extra_forbidden":
        return InvalidRequestError(f"Unrecognized request argument supplied: {param}", param=param)
    if e["type"] == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param)
    return InvalidRequestError(f"Invalid value for '{param}': {e['msg']}", param=param)


def _param_name(loc: tuple[Any, ...] | list[Any]) -> str:
    """``("messages", 0, "content", "list[TextContentPart]", 1, "type")`` ->
    ``messages[0].content[1].type``: list indices in brackets, union member tags dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _is_union_tag(str(part)):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _is_union_tag(part: str) -> bool:
    # pydantic names a union member by its type: "str", "list[int]", "TextContentPart", ...
    return ("[" in part or part[:1].isupper()
            or part in ("str", "int", "float", "bool", "dict", "list", "none"))
