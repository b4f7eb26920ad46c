"""Server-sent events as the OpenAI API streams them.

Each event is ``data: <json>\\n\\n``; the stream ends with ``data: [DONE]\\n\\n``. An error after
the response started cannot change the HTTP status any more, so it is sent as one
``data: {"error": {...}}`` event followed by ``[DONE]``, which the ``openai`` SDK raises as an
``APIError``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Send

DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel | dict[str, Any]) -> str:
    """One ``data:`` event holding ``payload`` as compact JSON."""
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json()
    else:
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {body}\n\n"


class SSEResponse(StreamingResponse):
    """A ``text/event-stream`` response that always runs its cleanup.

    Starlette cancels the streaming task when the client disconnects but never closes the body
    iterator, which would leave the engine request running until garbage collection; and an
    iterator closed before its first step never runs its own ``finally``. So the ``finally``
    here closes the iterator and then awaits ``on_close`` (both shielded from the cancellation):
    the engine request is aborted at once, whenever the client leaves.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]):
        super().__init__(content, headers={"Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self.on_close()
