"""``/v1/models`` wire schemas (OpenAI API reference, "Models"; ``root``/``parent``/
``max_model_len`` as vLLM adds them)."""

from __future__ import annotations

from typing import Literal

from lmforge.protocol.common import ResponseModel


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int  # unix seconds when the model was loaded
    owned_by: str = "lmforge"
    root: str  # the base model this one derives from (itself for a base model)
    parent: str | None = None  # the base model of an adapter; null for a base model
    max_model_len: int  # context length in tokens


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
