"""Routes ``/v1/files``: upload, list, retrieve, download and delete files (OpenAI API
reference, "Files").

Rows and bytes live in the jobs store (``app.state.store``). An upload streams to a temporary
file in the files directory (``server/uploads.py``), is checked (a ``batch`` or ``fine-tune``
file must be JSONL), then renamed into place. A file past its ``expires_at`` is gone: it is
deleted the next time a route touches it or lists files (no background task). Store calls
block (SQLite, disk), so the plain routes are sync functions, which FastAPI runs in its
thread pool, and the upload hands its disk work to threads.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.responses import FileResponse

from lmforge.errors import InvalidRequestError, NotFoundError
from lmforge.jobs.store import FileRecord, Store
from lmforge.protocol.files import (
    JSONL_PURPOSES,
    MAX_LIST_LIMIT,
    FileCreateForm,
    FileDeleted,
    FileList,
    FileObject,
    Purpose,
)
from lmforge.server.routing import StrictJSONRoute
from lmforge.server.uploads import receive_upload, safe_filename

router = APIRouter(route_class=StrictJSONRoute)

_FORM_NESTED = ("expires_after",)  # form fields sent as name[key]: expires_after[seconds]


@router.post("/v1/files")
async def create_file(request: Request) -> FileObject:
    """Upload a file: multipart ``file``, ``purpose`` and optional ``expires_after[anchor]``
    (``created_at``) + ``expires_after[seconds]`` (3600..2592000).

    Raises:
        PayloadTooLargeError: (413) the file is over ``--max-upload-mb``.
        InvalidRequestError: (400) a bad or missing field, or a batch/fine-tune file that is
            not JSONL (naming the first bad line).
    """
    store: Store = request.app.state.store
    limit = request.app.state.server_config.max_upload_mb * 2**20
    temp = await asyncio.to_thread(store.temp_path)
    try:
        upload = await receive_upload(request, temp, limit)
        form = _create_form(upload.fields)
        if upload.filename is None:
            raise InvalidRequestError("Missing required parameter: 'file'.", param="file")
        csv_training = form.purpose == "fine-tune" and upload.filename.lower().endswith(".csv")
        if form.purpose in JSONL_PURPOSES and not csv_training:  # CSV: LLM Engine's format,
            await asyncio.to_thread(check_jsonl, temp, form.purpose)  # checked by the job
        expires_after = form.expires_after.seconds if form.expires_after else None
        record = await asyncio.to_thread(store.add_file, temp, safe_filename(upload.filename),
                                         form.purpose, expires_after=expires_after)
    finally:
        temp.unlink(missing_ok=True)  # gone already once add_file renamed it into place
    return file_object(record)


@router.get("/v1/files")
def list_files(request: Request, purpose: Purpose | None = None,
               limit: int = Query(MAX_LIST_LIMIT, ge=1, le=MAX_LIST_LIMIT),
               after: str | None = None, order: Literal["asc", "desc"] = "desc") -> FileList:
    """A page of files, newest first (``order=desc``) or oldest first, optionally of one
    ``purpose``, after the file id ``after`` (the previous page's ``last_id``).

    Raises:
        InvalidRequestError: (400) a bad ``purpose``/``limit``/``order``, or an ``after`` that
            names no file (deleted or expired since: restart from the first page).
    """
    store: Store = request.app.state.store
    purge_expired(store)
    if after is not None and store.get_file(after) is None:
        raise InvalidRequestError(f"No such File object to list after: {after}.", param="after")
    records, has_more = store.list_files(purpose, limit, after, order)
    data = [file_object(r) for r in records]
    return FileList(data=data, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None, has_more=has_more)


@router.get("/v1/files/{file_id}")
def retrieve_file(file_id: str, request: Request) -> FileObject:
    """Raises NotFoundError (404) for an unknown, deleted or expired id."""
    return file_object(live_file(request.app.state.store, file_id))


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, request: Request) -> FileResponse:
    """The file's bytes (``application/octet-stream``, its name in Content-Disposition).

    Raises NotFoundError (404) for an unknown, deleted or expired id."""
    store: Store = request.app.state.store
    record = live_file(store, file_id)
    path = store.path(record.id)
    if not path.is_file():  # deleted between the lookup and now
        raise _not_found(file_id)
    return FileResponse(path, media_type="application/octet-stream", filename=record.filename)


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, request: Request) -> FileDeleted:
    """Raises NotFoundError (404) for an unknown, already deleted or expired id."""
    store: Store = request.app.state.store
    live_file(store, file_id)
    if not store.delete_file(file_id):  # another request deleted it meanwhile
        raise _not_found(file_id)
    return FileDeleted(id=file_id)


def file_object(record: FileRecord) -> FileObject:
    return FileObject(id=record.id, bytes=record.bytes, created_at=record.created_at,
                      expires_at=record.expires_at, filename=record.filename,
                      purpose=record.purpose)


def live_file(store: Store, file_id: str) -> FileRecord:
    """The file ``file_id``, deleting it first if it has expired.

    Raises:
        NotFoundError: (404) no such file, or it expired.
    """
    record = store.get_file(file_id)
    if record is not None and record.expires_at is not None and record.expires_at <= time.time():
        store.delete_file(file_id)
        record = None
    if record is None:
        raise _not_found(file_id)
    return record


def purge_expired(store: Store) -> None:
    """Delete the files whose ``expires_at`` has passed (they behave as deleted already)."""
    for file_id in store.expired_files(int(time.time())):
        store.delete_file(file_id)


def check_jsonl(path: Path, purpose: str) -> None:
    """Check that every non-empty line of the file is a JSON object (UTF-8; a leading BOM is
    allowed), as a batch or fine-tune file must be.

    Raises:
        InvalidRequestError: (400, param ``file``) naming the first bad line (1-based).
    """
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8"))
                problem = None if isinstance(value, dict) else f"it is a JSON {_kind(value)}"
            except UnicodeDecodeError:
                problem = "it is not UTF-8 text"
            except json.JSONDecodeError as e:
                problem = f"it is not valid JSON ({e.msg} at column {e.colno})"
            if problem is not None:
                raise InvalidRequestError(
                    f"Line {number} of the file is not a JSON object: {problem}. A "
                    f"'{purpose}' file must be JSONL, one JSON object per line.",
                    param="file", code="invalid_file_format")


def _kind(value: object) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null")


def _create_form(fields: dict[str, str]) -> FileCreateForm:
    """The upload's text fields -> ``FileCreateForm``; ``name[key]`` fields of
    ``_FORM_NESTED`` become nested objects (how the openai SDK sends ``expires_after``).

    Raises:
        RequestValidationError: the app's handler answers 400 naming the field.
    """
    values: dict[str, object] = {}
    for name, value in fields.items():
        outer, bracket, inner = name.partition("[")
        if bracket and outer in _FORM_NESTED and inner.endswith("]") and "[" not in inner:
            nested = values.setdefault(outer, {})
            if isinstance(nested, dict):
                nested[inner[:-1]] = value
                continue
        values[name] = value
    try:
        return FileCreateForm.model_validate(values, strict=False)  # form fields are text
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])}
                                      for err in e.errors()]) from None


def _not_found(file_id: str) -> NotFoundError:
    return NotFoundError(f"No such File object: {file_id}", param="file_id")
