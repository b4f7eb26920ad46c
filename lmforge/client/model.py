"""``Model``: the models a server serves (``/v1/models``), in LLM Engine's interface."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from urllib.parse import quote

from lmforge.client import transport
from lmforge.client.types import (
    DeleteLLMEndpointResponse,
    GetLLMEndpointResponse,
    ListLLMEndpointsResponse,
    ModelDownloadResponse,
)

DOWNLOAD_FORMATS = ("hugging_face",)  # PEFT's adapter_config.json + adapter_model.safetensors
DOWNLOAD_TIMEOUT_S = 600.0


class Model:
    """List, inspect, delete and download served models; fine-tuned ones are LoRA adapters on
    the base model (``model_name``)::

        from lmforge.client import Model

        for model in Model.list().model_endpoints:
            print(model.name, model.model_name, model.fine_tuned)
        Model.download("ft:smollm2-135m-instruct:pirate:ftjob-abc", output_dir="pirate-lora")
        Model.delete("ft:smollm2-135m-instruct:pirate:ftjob-abc")
    """

    @classmethod
    def get(cls, model: str) -> GetLLMEndpointResponse:
        """The served model named ``model``.

        Raises:
            NotFoundError: the server serves no such model.
        """
        card = transport.request("GET", f"/v1/models/{_quoted(model)}").json()
        return GetLLMEndpointResponse.from_card(card)

    @classmethod
    def list(cls) -> ListLLMEndpointsResponse:
        """Every served model: the base model first, then the adapters."""
        cards = transport.request("GET", "/v1/models").json()["data"]
        return ListLLMEndpointsResponse(
            model_endpoints=[GetLLMEndpointResponse.from_card(c) for c in cards])

    @classmethod
    def delete(cls, model: str) -> DeleteLLMEndpointResponse:
        """Stop serving a fine-tuned model or LoRA adapter, for good (a fine-tuned model's
        files go too, and it is not served again after a restart).

        Raises:
            NotFoundError: no such model. BadRequestError: ``model`` is the base model.
        """
        body = transport.request("DELETE", f"/v1/models/{_quoted(model)}").json()
        return DeleteLLMEndpointResponse(deleted=body["deleted"])

    @classmethod
    def download(cls, model_name: str, download_format: str = "hugging_face",
                 output_dir: str | os.PathLike[str] | None = None) -> ModelDownloadResponse:
        """Where a fine-tuned model's weights are: its PEFT adapter (``adapter_config.json``,
        ``adapter_model.safetensors``), loadable with ``peft.PeftModel.from_pretrained`` on
        the base model or served with ``lmforge serve --lora NAME=DIR``.

        Args:
            model_name: a fine-tuned model or LoRA adapter the server serves.
            download_format: ``hugging_face`` (the only format).
            output_dir: also fetch the files into this directory (created if missing).

        Returns:
            ``ModelDownloadResponse``: ``urls`` maps ``adapter.zip`` to its URL (fetch it with
            the API key); with ``output_dir``, ``files`` maps each file to its local path.

        Raises:
            NotFoundError: no such model, or a base model (it has no adapter files).
            ValueError: another ``download_format``.
        """
        if download_format not in DOWNLOAD_FORMATS:
            raise ValueError(f"download_format must be one of {DOWNLOAD_FORMATS}, got "
                             f"{download_format!r}")
        path = f"/v1/models/{_quoted(model_name)}/adapter"
        urls = {"adapter.zip": transport.url(path)}
        if output_dir is None:
            with transport.stream("GET", path):  # the server's 404s (unknown or base model)
                pass  # the body is left unread: only the URL is asked for
            return ModelDownloadResponse(urls=urls)
        archive = transport.request("GET", path, timeout=DOWNLOAD_TIMEOUT_S).content
        directory = Path(output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(archive)) as z:
            files = {}
            for member in (n for n in z.namelist() if not n.endswith("/")):
                target = directory / Path(member).name  # flat: no path from the zip is followed
                target.write_bytes(z.read(member))
                files[target.name] = str(target)
        return ModelDownloadResponse(urls=urls, files=files)


def _quoted(model: str) -> str:
    """``model`` as one path segment (fine-tuned names hold ``:``; adapters may hold ``/``)."""
    return quote(model, safe=":/")
