"""The FastAPI application: lifespan, authentication, health, and the ONE error-handling layer.

Every failure leaves the server as the OpenAI envelope ``{"error": {message, type, param,
code}}``: ``LMForgeError`` via its ``to_envelope()``, pydantic validation errors as 400 naming the
first bad field (never FastAPI's 422), Starlette's 404/405 for unknown routes and wrong methods,
and anything unexpected as a generic 500 whose details stay in the server log.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.config import ServerConfig
from lmforge.errors import (
    AuthenticationError,
    InternalServerError,
    InvalidRequestError,
    LMForgeError,
    NotFoundError,
)
from lmforge.server import inference, models

if TYPE_CHECKING:
    from lmforge.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)

_JSON_HINT = ("We could not parse the JSON body of your request. (HINT: This likely means you "
              "aren't using your HTTP library correctly. The API expects a JSON payload, but what "
              "was sent was not valid JSON.)")


def build_app(engine: AsyncEngine, server_config: ServerConfig,
              chat_template: str | None = None) -> FastAPI:
    """The OpenAI-compatible app serving ``engine``.

    Args:
        engine: started in the lifespan and shut down with it.
        server_config: ``api_keys`` (empty = no authentication) is enforced on ``/v1/*``.
        chat_template: Jinja text overriding the tokenizer's chat template (``--chat-template``).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    # strict_content_type=False: parse a body sent without Content-Type as JSON (curl -d ...).
    app = FastAPI(title="lmforge", lifespan=lifespan, strict_content_type=False)
    app.state.engine = engine
    app.state.server_config = server_config
    app.state.chat_template = chat_template
    install_error_handlers(app)
    for router in (inference.router, models.router):
        app.include_router(router, dependencies=[Depends(check_api_key)])

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


async def check_api_key(request: Request) -> None:
    """``Authorization: Bearer <key>`` must name one of ``server_config.api_keys`` (if any).

    Raises:
        AuthenticationError: 401, missing or unknown key.
    """
    keys: list[str] = request.app.state.server_config.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    # compare_digest against every key: the time taken does not reveal a near match
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(token, k) for k in keys):
        raise AuthenticationError("Incorrect or missing API key; send 'Authorization: Bearer "
                                  "<key>' with a key the server was started with.")


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception to the OpenAI error envelope (see the module docstring)."""

    @app.exception_handler(LMForgeError)
    async def on_lmforge_error(request: Request, exc: LMForgeError) -> JSONResponse:
        return _envelope(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _envelope(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        route = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            err: LMForgeError = NotFoundError(f"Invalid URL ({route})", code="unknown_url")
        elif exc.status_code == 405:
            err = InvalidRequestError(f"Method not allowed ({route})", code="method_not_allowed")
        else:
            err = InvalidRequestError(str(exc.detail))
        return _envelope(err, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this, so the server logs the traceback as well.
        logger.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return _envelope(InternalServerError())


def _envelope(err: LMForgeError, status_code: int | None = None,
              headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.to_envelope(), status_code=status_code or err.status_code,
                        headers=headers)


def validation_error(errors: list[dict[str, Any]]) -> LMForgeError:
    """One pydantic/FastAPI validation error list -> one 400 naming the most specific bad field.

    Priority: unparsable JSON, then a non-object body, then an unknown top-level argument
    (OpenAI checks those first), then the error with the deepest location (inside a union that
    is the member the client most likely meant).
    """
    body_errors = [e for e in errors if e["loc"] and e["loc"][0] == "body"] or errors
    for e in body_errors:
        if e["type"] == "json_invalid":
            return InvalidRequestError(_JSON_HINT)
        if tuple(e["loc"]) == ("body",):
            if e["type"] == "missing":
                return InvalidRequestError("The request body is empty; send a JSON object.")
            return InvalidRequestError("The request body must be a JSON object (sent with "
                                       "Content-Type: application/json).")
    unknown = [e for e in body_errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 2]
    e = unknown[0] if unknown else max(body_errors, key=lambda e: len(e["loc"]))
    if isinstance(cause := (e.get("ctx") or {}).get("error"), LMForgeError):
        return cause
    param = _param_name(e["loc"][1:] if e["loc"][:1] == ("body",) else e["loc"])
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
