"""``GET /v1/models`` and ``GET /v1/models/{model_id}`` (OpenAI API reference, "Models")."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request

from lmforge.errors import ModelNotFoundError
from lmforge.protocol import ModelCard, ModelList

if TYPE_CHECKING:
    from lmforge.engine.async_engine import AsyncEngine

router = APIRouter()


def model_card(engine: AsyncEngine, adapter: str | None = None) -> ModelCard:
    """The card of the base model ``engine`` serves (``root`` is itself), or of one of its LoRA
    adapters (``parent`` and ``root``: the base)."""
    return ModelCard(id=adapter or engine.model_name, created=engine.created,
                     root=engine.model_name, parent=engine.model_name if adapter else None,
                     max_model_len=engine.max_model_len)


def adapter_names(engine: AsyncEngine) -> list[str]:
    """The LoRA adapters registered with the engine (fine-tuned models among them)."""
    return sorted(list(engine.engine.loras.registered))  # a copy: the engine thread owns it


def resolve_model(engine: AsyncEngine, model: str) -> str | None:
    """The adapter a request's ``model`` names: None for the base model.

    Raises:
        ModelNotFoundError: (404) neither the base model nor a registered adapter.
    """
    if model == engine.model_name:
        return None
    if model in engine.engine.loras.registered:
        return model
    raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    engine = request.app.state.engine
    return ModelList(data=[model_card(engine)] + [model_card(engine, a)
                                                  for a in adapter_names(engine)])


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    """Raises ModelNotFoundError (404) for an id that is neither the base nor an adapter."""
    engine = request.app.state.engine
    return model_card(engine, resolve_model(engine, model_id))
