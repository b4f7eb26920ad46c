"""``File``: the server's stored files (``/v1/files``), in LLM Engine's interface."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

from lmforge.client import transport
from lmforge.client.types import (
    DeleteFileResponse,
    GetFileContentResponse,
    GetFileResponse,
    ListFilesResponse,
    UploadFileResponse,
)

UPLOAD_TIMEOUT_S = 600.0  # per chunk read or written; a large upload streams in many


class File:
    """Upload, inspect, download, list and delete files::

        from lmforge.client import File

        with open("train.jsonl", "rb") as f:
            file = File.upload(f)  # purpose "fine-tune"
        print(file.id, file.size)
        print(File.download(file.id).content[:100])
        File.delete(file.id)
    """

    @classmethod
    def upload(cls, file: BinaryIO | TextIO | str | os.PathLike[str], purpose: str = "fine-tune",
               expires_after_s: int | None = None) -> UploadFileResponse:
        """Store a file on the server.

        Args:
            file: an open file, binary or text (LLM Engine documents ``open(path, "r")``; the
                bytes under a text file are sent as they are, or its text UTF-8 encoded when it
                has none, e.g. ``io.StringIO``), or the path of one.
            purpose: ``fine-tune`` (training data: JSONL, or CSV with ``prompt`` and
                ``response``), ``batch`` (a batch's JSONL requests) or ``user_data``.
            expires_after_s: delete the file this many seconds after the upload (3600 to
                2592000); None keeps it.

        Returns:
            ``UploadFileResponse`` (``id`` to use in ``FineTune.create`` or ``Batch.create``).

        Raises:
            BadRequestError: a ``batch`` or ``fine-tune`` file that is not JSONL (the message
                names the line), a bad purpose; HTTP 413 above the server's ``--max-upload-mb``.
            FileNotFoundError: no file at the path.
        """
        data = {"purpose": purpose}
        if expires_after_s is not None:
            data |= {"expires_after[anchor]": "created_at",
                     "expires_after[seconds]": str(expires_after_s)}
        if isinstance(file, (str, os.PathLike)):
            with open(file, "rb") as handle:
                return cls.upload(handle, purpose, expires_after_s)
        name = Path(str(getattr(file, "name", "upload") or "upload")).name
        content: BinaryIO | bytes = file  # type: ignore[assignment]
        if isinstance(file, io.TextIOBase):  # the bytes under it, not its newline-translated text
            raw = getattr(file, "buffer", None)
            content = raw.read() if raw is not None else file.read().encode("utf-8")
        response = transport.request("POST", "/v1/files", data=data,
                                     files={"file": (name, content)}, timeout=UPLOAD_TIMEOUT_S)
        return UploadFileResponse.from_file(response.json())

    @classmethod
    def get(cls, file_id: str) -> GetFileResponse:
        """The file object of ``file_id``.

        Raises:
            NotFoundError: no such file.
        """
        return GetFileResponse.from_file(transport.request("GET", f"/v1/files/{file_id}").json())

    @classmethod
    def list(cls, purpose: str | None = None) -> ListFilesResponse:
        """Every stored file (of ``purpose``, if given), newest first."""
        params = {"purpose": purpose} if purpose else None
        return ListFilesResponse(files=[GetFileResponse.from_file(f)
                                        for f in transport.list_all("/v1/files", params)])

    @classmethod
    def delete(cls, file_id: str) -> DeleteFileResponse:
        """Delete ``file_id`` and its content.

        Raises:
            NotFoundError: no such file.
        """
        return DeleteFileResponse(**transport.request("DELETE", f"/v1/files/{file_id}").json())

    @classmethod
    def download(cls, file_id: str) -> GetFileContentResponse:
        """The content of ``file_id``, decoded as UTF-8 (for large or binary files,
        ``download_to`` or ``iter_content``).

        Raises:
            NotFoundError: no such file.
        """
        content = b"".join(cls.iter_content(file_id))
        return GetFileContentResponse(id=file_id, content=content.decode("utf-8", "replace"))

    @classmethod
    def iter_content(cls, file_id: str) -> Iterator[bytes]:
        """The content of ``file_id`` in chunks, as it arrives.

        Raises:
            NotFoundError: no such file (before the first chunk).
        """
        with transport.stream("GET", f"/v1/files/{file_id}/content",
                              timeout=UPLOAD_TIMEOUT_S) as response:
            yield from response.iter_bytes()

    @classmethod
    def download_to(cls, file_id: str, path: str | os.PathLike[str]) -> Path:
        """Write the content of ``file_id`` to ``path`` and return the path. The content goes
        to ``<path>.part`` first and takes the name only once complete.

        Raises:
            NotFoundError: no such file (``path`` is not touched).
        """
        path = Path(path)
        partial = path.with_name(path.name + ".part")
        try:
            with open(partial, "wb") as f:
                for chunk in cls.iter_content(file_id):
                    f.write(chunk)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return path
