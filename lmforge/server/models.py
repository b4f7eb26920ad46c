"""Models: ``GET /v1/models``, ``GET`` / ``DELETE /v1/models/{model_id}`` (OpenAI API
reference, "Models"), ``GET /v1/models/{model_id}/adapter`` (a fine-tuned model's PEFT files as a
zip), and vLLM's ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``.

The served models are the base model and the LoRA adapters registered with the engine: fine-tuned
ones (registered by the fine-tune worker, again at every start), ``--lora name=path`` ones, and
those loaded at run time. Deleting a model unregisters its adapter; a fine-tuned one also stops
being registered at start-up and its adapter files (under ``$LMFORGE_HOME/adapters``) go.

Adapter files and a client's paths: ``/v1/load_lora_adapter`` serves only directories inside
``ServerConfig.lora_roots`` (``--lora-root``), checked on the resolved path, and answers one
same 400 for every path outside them, so a client learns nothing of the rest of the file system
(vLLM instead gates the route as a whole, ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``). The download
sends only the PEFT files the loader reads, each opened without following a symbolic link.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import shutil
import stat
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from lmforge.errors import (
    ConflictError,
    InvalidRequestError,
    LMForgeError,
    ModelLoadError,
    ModelNotFoundError,
)
from lmforge.jobs.fine_tuning_store import FineTuningStore
from lmforge.models.lora import CONFIG_FILE, WEIGHTS_FILE
from lmforge.protocol import ModelCard, ModelList
from lmforge.protocol.models import LoadLoRAAdapterRequest, ModelDeleted, UnloadLoRAAdapterRequest
from lmforge.server.routing import StrictJSONRoute

if TYPE_CHECKING:
    from lmforge.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)
router = APIRouter(route_class=StrictJSONRoute)

# What the download sends: the files ``models/lora.py`` reads (it refuses adapter_model.bin).
PEFT_FILES = (CONFIG_FILE, WEIGHTS_FILE)
_NOT_ALLOWED = ("lora_path is not a directory this server may load adapters from; put the "
                "adapter under one of its --lora-root directories (or start the server with "
                "--lora NAME=PATH)")


def model_card(engine: AsyncEngine, adapter: str | None = None) -> ModelCard:
    """The card of the base model ``engine`` serves (``root`` is itself), or of one of its LoRA
    adapters (``parent`` and ``root``: the base)."""
    return ModelCard(id=adapter or engine.model_name, created=engine.created,
                     root=engine.model_name, parent=engine.model_name if adapter else None,
                     max_model_len=engine.max_model_len)


def adapter_names(engine: AsyncEngine) -> list[str]:
    """The LoRA adapters registered with the engine (fine-tuned models among them)."""
    return engine.lora_names()


def requested_model(engine: AsyncEngine, model: str | None) -> str:
    """The model a request asks for: ``model``, or, when it sends none, the base model if that
    is all this server serves (vLLM's rule; the Chinese-LLaMA-Alpaca demo's bodies carry no
    ``model``).

    Raises:
        InvalidRequestError: (400) no ``model`` while LoRA adapters are served beside the base,
            naming them.
    """
    if model is not None:
        return model
    adapters = adapter_names(engine)
    if adapters:
        served = ", ".join([engine.model_name, *adapters])
        raise InvalidRequestError(f"Missing required parameter: 'model'. This server serves "
                                  f"several models ({served}); name one of them.", param="model")
    return engine.model_name


async def serve_on_first_use(request: Request, model: str | None) -> None:
    """Serve ``model`` now if it is a fine-tuned model (or a checkpoint of one) the jobs store
    knows and this server does not serve yet: a job finished by another server sharing the
    store (Ray Serve replicas, servers on one ``--database-url``) after this one started. Its
    adapter directory must be on storage this server reads. Any other name is left to
    ``resolve_model`` (a 404 for an unknown one)."""
    engine = request.app.state.engine
    if not model or not model.startswith("ft:") or engine.has_lora(model):
        return
    jobs = FineTuningStore(request.app.state.store)
    job = await asyncio.to_thread(jobs.served_job, model)
    path = job.adapter_path if job is not None else None
    if path is None:
        checkpoint = await asyncio.to_thread(jobs.checkpoint_of, model)
        path = checkpoint.path if checkpoint is not None else None
    if path is None or not Path(path).is_dir() or engine.has_lora(model):
        return
    try:
        await engine.add_lora(model, path)
    except LMForgeError as e:  # served meanwhile by a concurrent request, or unreadable
        logger.warning("cannot serve %s from %s on first use: %s", model, path, e.message)


def resolve_model(engine: AsyncEngine, model: str) -> str | None:
    """The adapter a request's ``model`` names: None for the base model.

    Raises:
        ModelNotFoundError: (404) neither the base model nor a registered adapter.
    """
    if model == engine.model_name:
        return None
    if engine.has_lora(model):
        return model
    raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    engine = request.app.state.engine
    return ModelList(data=[model_card(engine)] + [model_card(engine, a)
                                                  for a in adapter_names(engine)])


@router.get("/v1/models/{model_id:path}/adapter")
async def download_adapter(model_id: str, request: Request) -> Response:
    """The adapter's PEFT files (``PEFT_FILES``: ``adapter_config.json``,
    ``adapter_model.safetensors``) as a zip, loadable with ``peft.PeftModel.from_pretrained``
    once unpacked; nothing else in its directory is sent.

    Raises:
        ModelNotFoundError: not a served adapter (the base model has none).
        ConflictError: (409) a PEFT file is missing, a symbolic link, or not a regular file.
    """
    engine = request.app.state.engine
    name = resolve_model(engine, model_id)
    if name is None:
        raise ModelNotFoundError(f"The model `{model_id}` is a base model, with no adapter "
                                 "files; only fine-tuned models and LoRA adapters have them",
                                 param="model")
    directory = engine.lora_directory(name)
    data = await asyncio.to_thread(zip_adapter, Path(directory), name)
    filename = re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".zip"  # quoted in a header: no '"'
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.delete("/v1/models/{model_id:path}")
async def delete_model(model_id: str, request: Request) -> ModelDeleted:
    """Delete a fine-tuned model or LoRA adapter (OpenAI: "Delete a fine-tuned model"). A
    fine-tuning job's model goes with its checkpoints' models and files; a checkpoint's model
    alone goes with its own files.

    Raises:
        InvalidRequestError: the base model (400). ModelNotFoundError: an unknown id (404).
    """
    engine = request.app.state.engine
    name = resolve_model(engine, model_id)
    if name is None:
        raise InvalidRequestError(f"`{model_id}` is the base model and cannot be deleted; only "
                                  "fine-tuned models and LoRA adapters can", param="model")
    await engine.remove_lora(name)
    jobs = FineTuningStore(request.app.state.store)
    job = await asyncio.to_thread(jobs.unserve, name)
    if job is not None:  # a job's model: its copy under $LMFORGE_HOME/adapters, its checkpoints
        for checkpoint in await asyncio.to_thread(jobs.all_checkpoints, job.id):
            await engine.remove_lora(job.checkpoint_model(checkpoint.step_number))
        for directory in (job.adapter_path, jobs.work_dir(job.id)):
            if directory:
                await asyncio.to_thread(shutil.rmtree, directory, True)
    elif (checkpoint := await asyncio.to_thread(jobs.checkpoint_of, name)) is not None:
        await asyncio.to_thread(shutil.rmtree, checkpoint.path, True)
    return ModelDeleted(id=name)


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    """Serve the PEFT adapter directory ``lora_path`` as the model ``lora_name`` (vLLM's shape;
    until the server stops: restarts serve ``--lora`` and fine-tuned adapters only). Only
    directories inside ``--lora-root`` are served (``allowed_adapter_dir``).

    Raises:
        InvalidRequestError: the name is taken, the path is outside the roots (one message for
            all such paths), or the directory is not a usable adapter.
    """
    engine = request.app.state.engine
    if body.lora_name == engine.model_name:
        raise InvalidRequestError("lora_name must differ from the base model's name",
                                  param="lora_name")
    directory = allowed_adapter_dir(body.lora_path, request.app.state.server_config.lora_roots)
    try:
        await engine.add_lora(body.lora_name, str(directory))
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


def allowed_adapter_dir(lora_path: str, roots: list[str]) -> Path:
    """``lora_path`` resolved (symlinks followed, ``..`` collapsed, relative to the server's
    working directory), when that lies inside one of ``roots`` (resolved too); the engine then
    reads the resolved path, so a link swapped later does not move the adapter.

    Raises:
        InvalidRequestError: (400, param ``lora_path``, code ``lora_path_not_allowed``) outside
            every root, with the same message whether the path exists, is a directory, or holds
            an adapter, so the answer reveals nothing about the file system.
    """
    resolved: Path | None = None
    try:
        resolved = Path(os.path.realpath(lora_path))
    except (OSError, ValueError):  # ValueError: a NUL character
        pass
    if resolved is not None and any(resolved.is_relative_to(os.path.realpath(root))
                                    for root in roots):
        return resolved
    raise InvalidRequestError(_NOT_ALLOWED, param="lora_path", code="lora_path_not_allowed")


def zip_adapter(directory: Path, name: str) -> bytes:
    """The zip of ``directory``'s ``PEFT_FILES``: each opened relative to the directory with
    ``O_NOFOLLOW`` (a symbolic link is refused, never read through) and sent only when it is a
    regular file (not a FIFO, a device, ...).

    Raises:
        ConflictError: a PEFT file is missing or not a regular file (naming ``name``).
    """
    buffer = io.BytesIO()
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        raise _not_downloadable(name, "directory") from None
    try:
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for filename in PEFT_FILES:
                try:
                    fd = os.open(filename, flags, dir_fd=dir_fd)
                except OSError:  # ELOOP: a symbolic link; ENOENT: gone
                    raise _not_downloadable(name, filename) from None
                with os.fdopen(fd, "rb") as src:
                    info = os.fstat(fd)
                    if not stat.S_ISREG(info.st_mode):
                        raise _not_downloadable(name, filename)
                    stamp = max(time.localtime(info.st_mtime)[:6], (1980, 1, 1, 0, 0, 0))
                    entry = zipfile.ZipInfo(filename, stamp)  # zip dates start in 1980
                    entry.compress_type = zipfile.ZIP_DEFLATED
                    entry.external_attr = 0o644 << 16
                    with archive.open(entry, "w") as dst:
                        shutil.copyfileobj(src, dst)
    finally:
        os.close(dir_fd)
    return buffer.getvalue()


def _not_downloadable(name: str, filename: str) -> ConflictError:
    return ConflictError(
        f"The adapter `{name}` cannot be downloaded: its {filename} is missing, or is a symbolic "
        "link or a special file (lmforge sends only regular files and never follows a link); "
        "copy the adapter's files into a directory of their own and load it from there.",
        param="model",
        code="adapter_not_downloadable")
