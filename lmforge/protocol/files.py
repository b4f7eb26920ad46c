"""``/v1/files`` wire schemas (OpenAI API reference, "Files": the File object, the upload form,
the list and delete answers).

A client uploads with one of ``UPLOAD_PURPOSES``; the server itself writes files with an
output purpose (``batch_output`` for a batch's results and errors), which clients can list,
retrieve and download but not upload.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmforge.protocol.base import RequestModel, ResponseModel

UploadPurpose = Literal["assistants", "batch", "fine-tune", "vision", "user_data", "evals"]
UPLOAD_PURPOSES: tuple[str, ...] = UploadPurpose.__args__
# what the server writes: a batch's output and error files (a fine-tune's metrics, later)
OutputPurpose = Literal["batch_output", "fine-tune-results"]
OUTPUT_PURPOSES: tuple[str, ...] = OutputPurpose.__args__
Purpose = Literal[UploadPurpose, OutputPurpose]  # what GET /v1/files?purpose= may filter on
# purposes whose files must be JSONL: every non-empty line one JSON object
JSONL_PURPOSES = ("batch", "fine-tune")

MIN_EXPIRES_AFTER_S = 3600  # 1 hour, OpenAI's bounds of expires_after[seconds]
MAX_EXPIRES_AFTER_S = 2592000  # 30 days
MAX_LIST_LIMIT = 10000  # GET /v1/files' largest (and default) page


class ExpiresAfter(RequestModel):
    """``expires_after[anchor]`` and ``expires_after[seconds]`` of the upload form."""

    anchor: Literal["created_at"]
    seconds: int = Field(ge=MIN_EXPIRES_AFTER_S, le=MAX_EXPIRES_AFTER_S)


class FileCreateForm(RequestModel):
    """The text fields of ``POST /v1/files`` (multipart/form-data; the ``file`` part is
    streamed to disk separately). Unknown fields are a 400, as for JSON bodies."""

    purpose: UploadPurpose
    expires_after: ExpiresAfter | None = None


class FileObject(ResponseModel):
    """The OpenAI File object. ``status`` and ``status_details`` are deprecated upstream but
    the SDK still reads them: a stored file is always ``processed``."""

    id: str  # "file-" + 24 hex digits
    object: Literal["file"] = "file"
    bytes: int  # size of the content
    created_at: int  # unix seconds
    expires_at: int | None = None  # unix seconds; null = kept until deleted
    filename: str  # the uploaded name, sanitized (base name, no control characters)
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None


class FileList(ResponseModel):
    """A page of files; ``after=last_id`` asks for the next one while ``has_more``."""

    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(ResponseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
