"""``/v1/models`` wire schemas (OpenAI API reference, "Models"; ``root``/``parent``/
``max_model_len`` as vLLM adds them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmforge.protocol.base import RequestModel
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


class ModelDeleted(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class LoadLoRAAdapterRequest(RequestModel):
    """vLLM's ``POST /v1/load_lora_adapter``: serve the PEFT adapter at ``lora_path`` (a
    directory on the server) as the model ``lora_name``."""

    lora_name: str = Field(min_length=1, max_length=255)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(RequestModel):
    """vLLM's ``POST /v1/unload_lora_adapter`` (``lora_int_id`` accepted, unused)."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None
