"""The route class of every router: JSON bodies are parsed strictly.

Python's ``json`` module accepts ``"\\udb6d"``, an escaped lone UTF-16 surrogate, and yields a
``str`` that is not valid Unicode: the tokenizer, the UTF-8 encoder and pydantic's serializer
all fail on it later, as a 500. The OpenAI API refuses such a body as invalid JSON, and so do
we: ``StrictJSONRequest.json()`` raises ``json.JSONDecodeError`` naming the field, which FastAPI
turns into its ``json_invalid`` validation error and ``server/errors.py`` into a 400.

Use it as ``APIRouter(route_class=StrictJSONRoute)`` (FastAPI's documented hook for a custom
``Request``); ``tests/test_layout.py`` checks that every router does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

# An escaped surrogate code point, paired or not: only bodies that contain one are walked.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class StrictJSONRequest(Request):
    """A ``Request`` whose ``json()`` refuses strings that are not valid Unicode."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            value = json.loads(body)
            if _SURROGATE_ESCAPE.search(body):
                where = _lone_surrogate(value, "")
                if where is not None:
                    raise json.JSONDecodeError(
                        f"the string at {where or 'the top level'} holds a lone UTF-16 surrogate "
                        "(an unpaired \\uD800-\\uDFFF escape), which is not valid Unicode",
                        body.decode("utf-8", "replace"), 0)
            self._json = value
        return self._json


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path (``messages[0].content``) of the first string or key in ``value`` that cannot
    be encoded as UTF-8, or None. A valid surrogate pair was already joined by the decoder."""
    if isinstance(value, str):
        return None if _encodes(value) else path
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            if not _encodes(key):
                return path or "an object key"
            found = _lone_surrogate(item, child)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class StrictJSONRoute(APIRoute):
    """An ``APIRoute`` that hands its endpoint a ``StrictJSONRequest``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
