"""``/v1/batches`` routes (OpenAI API reference, "Batch"): create, retrieve, list, cancel.

The routes only read and write the store; the batch worker (``jobs/batch_worker.py``, started by the
app's lifespan) validates and runs the batches, and ``wake()`` tells it when one is created or
cancelled.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Request

from lmforge.errors import ConflictError, InvalidRequestError, NotFoundError
from lmforge.jobs.batch_store import BatchRecord, BatchStore
from lmforge.jobs.store import Store
from lmforge.protocol.batches import (
    COMPLETION_WINDOWS,
    MAX_METADATA_KEY,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE,
    Batch,
    BatchCreateRequest,
    BatchErrors,
    BatchList,
    BatchRequestCounts,
    BatchUsage,
    InputTokensDetails,
)
from lmforge.protocol.statuses import BatchStatus
from lmforge.server.routing import StrictJSONRoute

router = APIRouter(route_class=StrictJSONRoute)


@router.post("/v1/batches")
async def create_batch(body: BatchCreateRequest, request: Request) -> Batch:
    """Create a batch from an uploaded ``purpose="batch"`` JSONL file; it starts
    ``validating`` and the worker takes it from there.

    Raises:
        NotFoundError: no such input file. InvalidRequestError: a file of another purpose, or
            metadata over OpenAI's limits (16 pairs, 64-character keys, 512-character values).
    """
    store: Store = request.app.state.store
    _check_metadata(body.metadata)
    file = await asyncio.to_thread(store.get_file, body.input_file_id)
    if file is None:
        raise NotFoundError(f"No such File object: {body.input_file_id}", param="input_file_id")
    if file.purpose != "batch":
        raise InvalidRequestError(
            f"the input file {file.id} has purpose {file.purpose!r}; upload it with purpose "
            "'batch'", param="input_file_id")
    window_s = request.app.state.server_config.batch_window_s
    batch = await asyncio.to_thread(
        _batches(request).add_batch, body.endpoint, body.input_file_id, body.completion_window,
        int(window_s or COMPLETION_WINDOWS[body.completion_window]), body.metadata,
        body.output_expires_after.seconds if body.output_expires_after else None)
    _wake(request)
    return batch_object(batch)


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(batch_id: str, request: Request) -> Batch:
    return batch_object(await _get(request, batch_id))


@router.get("/v1/batches")
async def list_batches(request: Request, after: str | None = None,
                       limit: int = Query(20, ge=1, le=100)) -> BatchList:
    """Batches, newest first; ``after`` is the last id of the previous page."""
    batches, has_more = await asyncio.to_thread(_batches(request).list_batches, limit, after)
    data = [batch_object(b) for b in batches]
    return BatchList(data=data, first_id=data[0].id if data else None,
                     last_id=data[-1].id if data else None, has_more=has_more)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request) -> Batch:
    """Cancel: the batch is ``cancelling`` at once and ``cancelled`` when the worker has
    stopped its lines and written the partial results (lines that ran stay in the output and
    error files; the others are reported ``batch_cancelled``).

    Raises:
        NotFoundError: no such batch. ConflictError: it already finished (completed, failed,
            expired) or is finalizing.
    """
    cancelled = (BatchStatus.CANCELLING, BatchStatus.CANCELLED)
    batch = await _get(request, batch_id)
    if batch.status not in cancelled:
        if not await asyncio.to_thread(_batches(request).transition, batch_id,
                                       BatchStatus.CANCELLING):
            batch = await _get(request, batch_id)
            if batch.status not in cancelled:
                raise ConflictError(f"batch {batch_id} is {batch.status} and can no longer be "
                                    "cancelled", param="batch_id")
        _wake(request)
    return batch_object(await _get(request, batch_id))


def batch_object(b: BatchRecord) -> Batch:
    """The OpenAI batch object of a stored batch."""
    times: dict[str, Any] = {f: getattr(b, f) for f in (
        "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
        "failed_at", "expired_at", "cancelling_at", "cancelled_at")}
    return Batch(
        id=b.id, endpoint=b.endpoint, model=b.model, input_file_id=b.input_file_id,
        completion_window=b.completion_window, status=b.status,  # type: ignore[arg-type]
        errors=BatchErrors(data=b.errors) if b.errors else None,  # type: ignore[arg-type]
        output_file_id=b.output_file_id, error_file_id=b.error_file_id, metadata=b.metadata,
        request_counts=BatchRequestCounts(total=b.total, completed=b.completed, failed=b.failed),
        usage=BatchUsage(input_tokens=b.input_tokens,
                         input_tokens_details=InputTokensDetails(cached_tokens=b.cached_tokens),
                         output_tokens=b.output_tokens,
                         total_tokens=b.input_tokens + b.output_tokens),
        **times)


def _batches(request: Request) -> BatchStore:
    return BatchStore(request.app.state.store)


async def _get(request: Request, batch_id: str) -> BatchRecord:
    batch = await asyncio.to_thread(_batches(request).get_batch, batch_id)
    if batch is None:
        raise NotFoundError(f"No such Batch object: {batch_id}", param="batch_id")
    return batch


def _wake(request: Request) -> None:
    worker = getattr(request.app.state, "batch_worker", None)
    if worker is not None:
        worker.wake()


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequestError(f"metadata has {len(metadata)} pairs; at most "
                                  f"{MAX_METADATA_PAIRS} are allowed", param="metadata")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise InvalidRequestError(
                f"metadata keys are at most {MAX_METADATA_KEY} characters and values at most "
                f"{MAX_METADATA_VALUE}; {key[:20]!r} is longer", param="metadata")
