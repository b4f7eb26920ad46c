"""``GET /v1/models`` and ``GET /v1/models/{model_id}`` (OpenAI API reference, "Models")."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request

from lmforge.errors import ModelNotFoundError
from lmforge.protocol import ModelCard, ModelList

if TYPE_CHECKING:
    from lmforge.engine.async_engine import AsyncEngine

router = APIRouter()


def model_card(engine: AsyncEngine) -> ModelCard:
    """The card of the model ``engine`` serves (a base model: ``root`` is itself)."""
    return ModelCard(id=engine.model_name, created=engine.created, root=engine.model_name,
                     max_model_len=engine.max_model_len)


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[model_card(request.app.state.engine)])


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    """Raises ModelNotFoundError (404) for any id but the served one."""
    card = model_card(request.app.state.engine)
    if model_id != card.id:
        raise ModelNotFoundError(f"The model `{model_id}` does not exist.", param="model")
    return card
