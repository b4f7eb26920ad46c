"""The two base classes of every wire schema: strict requests, plain responses."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RequestModel(BaseModel):
    """Base of every request body: unknown fields are rejected, never silently ignored, and
    values are not coerced across JSON types (pydantic's strict mode): ``"stream": "True"`` or
    ``"max_tokens": "5"`` is a 400, as on the OpenAI API, not a stream or 5. An int still
    passes for a float. Form fields, which are text by nature, are validated with
    ``strict=False`` (``server/files.py``)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ResponseModel(BaseModel):
    """Base of every response body (no strictness: we build these ourselves)."""
