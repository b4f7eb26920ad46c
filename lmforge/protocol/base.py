"""The two base classes of every wire schema: strict requests, plain responses."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RequestModel(BaseModel):
    """Base of every request body: unknown fields are rejected, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ResponseModel(BaseModel):
    """Base of every response body (no strictness: we build these ourselves)."""
