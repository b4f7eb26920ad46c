"""Models: ``GET /v1/models``, ``GET`` / ``DELETE /v1/models/{model_id}`` (OpenAI API
reference, "Models"), ``GET /v1/models/{model_id}/adapter`` (a fine-tuned model's PEFT files as a
zip), and vLLM's ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``.

The served models are the base model and the LoRA adapters registered with the engine: fine-tuned
ones (registered by the fine-tune worker, again at every start), ``--lora name=path`` ones, and
those loaded at run time. Deleting a model unregisters its adapter; a fine-tuned one also stops
being registered at start-up and its adapter files (under ``$LMFORGE_HOME/adapters``) go.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from lmforge.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError
from lmforge.jobs.fine_tunes import FineTuneStore
from lmforge.protocol import ModelCard, ModelList
from lmforge.protocol.models import LoadLoRAAdapterRequest, ModelDeleted, UnloadLoRAAdapterRequest

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


@router.get("/v1/models/{model_id:path}/adapter")
async def download_adapter(model_id: str, request: Request) -> Response:
    """The adapter's PEFT files (``adapter_config.json``, ``adapter_model.safetensors``) as a
    zip, loadable with ``peft.PeftModel.from_pretrained`` once unpacked.

    Raises:
        ModelNotFoundError: not a served adapter (the base model has none).
    """
    engine = request.app.state.engine
    name = resolve_model(engine, model_id)
    if name is None:
        raise ModelNotFoundError(f"The model `{model_id}` is a base model, with no adapter "
                                 "files; only fine-tuned models and LoRA adapters have them",
                                 param="model")
    directory = engine.engine.loras.registered[name].directory
    data = await asyncio.to_thread(_zip_dir, Path(directory))
    filename = name.replace(":", "_") + ".zip"
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.delete("/v1/models/{model_id:path}")
async def delete_model(model_id: str, request: Request) -> ModelDeleted:
    """Delete a fine-tuned model or LoRA adapter (OpenAI: "Delete a fine-tuned model").

    Raises:
        InvalidRequestError: the base model (400). ModelNotFoundError: an unknown id (404).
    """
    engine = request.app.state.engine
    name = resolve_model(engine, model_id)
    if name is None:
        raise InvalidRequestError(f"`{model_id}` is the base model and cannot be deleted; only "
                                  "fine-tuned models and LoRA adapters can", param="model")
    await engine.remove_lora(name)
    adapter = await asyncio.to_thread(FineTuneStore(request.app.state.store).unserve, name)
    if adapter is not None:  # the job's own copy under $LMFORGE_HOME/adapters
        await asyncio.to_thread(shutil.rmtree, adapter, True)
    return ModelDeleted(id=name)


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    """Serve the PEFT adapter directory ``lora_path`` as the model ``lora_name`` (vLLM's shape;
    until the server stops: restarts serve ``--lora`` and fine-tuned adapters only).

    Raises:
        InvalidRequestError: the name is taken, or the directory is not a usable adapter.
    """
    engine = request.app.state.engine
    if body.lora_name == engine.model_name:
        raise InvalidRequestError("lora_name must differ from the base model's name",
                                  param="lora_name")
    try:
        await engine.add_lora(body.lora_name, body.lora_path)
    except ModelLoadError as e:
        raise InvalidRequestError(e.message, param="lora_path") from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest,
                              request: Request) -> PlainTextResponse:
    """Stop serving an adapter loaded at run time or with ``--lora`` (vLLM's shape).

    Raises:
        ModelNotFoundError: no such adapter. InvalidRequestError: requests still use it.
    """
    engine = request.app.state.engine
    if resolve_model(engine, body.lora_name) is None:
        raise InvalidRequestError("the base model cannot be unloaded", param="lora_name")
    await engine.remove_lora(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    """Raises ModelNotFoundError (404) for an id that is neither the base nor an adapter."""
    engine = request.app.state.engine
    return model_card(engine, resolve_model(engine, model_id))


def _zip_dir(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(directory.iterdir()):
            if path.is_file():
                archive.write(path, path.name)
    return buffer.getvalue()
