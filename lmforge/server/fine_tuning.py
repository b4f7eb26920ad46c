"""``/v1/fine_tuning/jobs`` routes (OpenAI API reference, "Fine-tuning"): create, list,
retrieve, cancel, events, checkpoints.

The routes read and write the store (``jobs/fine_tuning_store.py``); a fine-tune worker beside the
server validates the files, trains, and registers the result. Creating a job checks what can be
checked at once: the base model is the one served, the files exist with purpose ``fine-tune``,
the hyperparameters are in range.
"""

from __future__ import annotations

import asyncio
import secrets

from fastapi import APIRouter, Query, Request

from lmforge.errors import ConflictError, InvalidRequestError, NotFoundError
from lmforge.jobs.fine_tuning_store import (
    CheckpointRecord,
    EventRecord,
    FineTuningStore,
    JobRecord,
)
from lmforge.protocol.fine_tuning import (
    CheckpointMetrics,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCheckpointList,
    FineTuningJobCreate,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobList,
    JobError,
    JobHyperparameters,
)
from lmforge.protocol.statuses import FineTuningStatus
from lmforge.server.routing import StrictJSONRoute

router = APIRouter(route_class=StrictJSONRoute)
_PREFIX = "/v1/fine_tuning/jobs"


@router.post(_PREFIX)
async def create_job(body: FineTuningJobCreate, request: Request) -> FineTuningJob:
    """Create a job (``validating_files``); the worker takes it from there.

    ``model`` is the served base model or a model fine-tuned from it (``ft:...``, OpenAI's SFT
    then DPO): the job then trains a new adapter on top of that one, which is the reference of a
    DPO run, and serves the two stacked.

    Raises:
        InvalidRequestError: a model that is neither the base nor fine-tuned from it, a file of
            another purpose,
            a hyperparameter out of range, integrations. NotFoundError: no such file.
    """
    hyperparameters = body.resolved()
    engine = request.app.state.engine
    jobs = _jobs(request)
    method = {"type": body.method_type}
    if body.model != engine.model_name:  # an ft: model of this base: train on top of it
        parent = await asyncio.to_thread(jobs.served_job, body.model)
        if parent is None or parent.base_model != engine.model_name:
            raise InvalidRequestError(
                f"model {body.model!r} cannot be fine-tuned here: this server fine-tunes its "
                f"base model {engine.model_name!r} and the models fine-tuned from it",
                param="model")
        method |= {"base_model": engine.model_name, "parent_job": parent.id}
    for param in ("training_file", "validation_file"):
        file_id = getattr(body, param)
        if file_id is not None:
            await _check_file(request, file_id, param)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    job = await asyncio.to_thread(
        jobs.add_job, body.model, body.training_file, body.validation_file, body.suffix, seed,
        hyperparameters, method, body.metadata)
    await asyncio.to_thread(jobs.add_event, job.id, f"Created fine-tuning job: {job.id}")
    worker = getattr(request.app.state, "fine_tuning_worker", None)
    if worker is not None:
        worker.wake()
    return job_object(job)


@router.get(_PREFIX)
async def list_jobs(request: Request, after: str | None = None,
                    limit: int = Query(20, ge=1, le=100)) -> FineTuningJobList:
    jobs, has_more = await asyncio.to_thread(_jobs(request).list_jobs, limit, after)
    return FineTuningJobList(data=[job_object(j) for j in jobs], has_more=has_more)


@router.get(_PREFIX + "/{job_id}")
async def retrieve_job(job_id: str, request: Request) -> FineTuningJob:
    return job_object(await _get(request, job_id))


@router.post(_PREFIX + "/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request) -> FineTuningJob:
    """Cancel a job that has not finished (a running one stops at its next step).

    Raises:
        NotFoundError: no such job. ConflictError: it already finished.
    """
    jobs = _jobs(request)
    job = await _get(request, job_id)
    if not job.status.is_final():
        if await asyncio.to_thread(jobs.transition, job_id, FineTuningStatus.CANCELLED):
            await asyncio.to_thread(jobs.add_event, job_id, "Fine-tuning job cancelled")
    job = await _get(request, job_id)
    if job.status is not FineTuningStatus.CANCELLED:
        raise ConflictError(f"fine-tuning job {job_id} is {job.status} and can no longer be "
                            "cancelled", param="job_id")
    return job_object(job)


@router.get(_PREFIX + "/{job_id}/events")
async def list_events(job_id: str, request: Request, after: str | None = None,
                      limit: int = Query(20, ge=1, le=1000)) -> FineTuningJobEventList:
    """The job's events, newest first: messages, and metrics (step, epoch, train_loss,
    eval_loss, learning_rate in ``data``)."""
    await _get(request, job_id)
    events, has_more = await asyncio.to_thread(_jobs(request).list_events, job_id, limit, after)
    return FineTuningJobEventList(data=[event_object(e) for e in events], has_more=has_more)


@router.get(_PREFIX + "/{job_id}/checkpoints")
async def list_checkpoints(job_id: str, request: Request, after: str | None = None,
                           limit: int = Query(10, ge=1, le=100)) -> FineTuningJobCheckpointList:
    job = await _get(request, job_id)
    checkpoints, has_more = await asyncio.to_thread(_jobs(request).list_checkpoints, job_id,
                                                    limit, after)
    data = [checkpoint_object(job, c) for c in checkpoints]
    return FineTuningJobCheckpointList(data=data, first_id=data[0].id if data else None,
                                       last_id=data[-1].id if data else None, has_more=has_more)


def job_object(job: JobRecord) -> FineTuningJob:
    """The OpenAI job object of a stored job; ``method`` echoes the method's hyperparameters
    (``"auto"`` until the files are validated, then the numbers used)."""
    hp = job.hyperparameters
    kind = job.method_type
    method = {"type": kind, kind: {"hyperparameters": {
        k: hp.get(k, "auto") for k in job.method_hyperparameters}}}
    return FineTuningJob(
        id=job.id, created_at=job.created_at, model=job.model, seed=job.seed,
        status=job.status,  # type: ignore[arg-type]
        error=JobError(**job.error) if job.error else None,
        fine_tuned_model=job.fine_tuned_model, finished_at=job.finished_at,
        hyperparameters=JobHyperparameters(**{k: hp[k] for k in (
            "n_epochs", "batch_size", "learning_rate_multiplier") if k in hp}),
        result_files=job.result_files or [], trained_tokens=job.trained_tokens,
        training_file=job.training_file, validation_file=job.validation_file,
        metadata=job.metadata, method=method, suffix=job.suffix)


def event_object(event: EventRecord) -> FineTuningJobEvent:
    return FineTuningJobEvent(id=event.id, created_at=event.created_at,
                              level=event.level,  # type: ignore[arg-type]
                              message=event.message, type=event.type,  # type: ignore[arg-type]
                              data=event.data)


def checkpoint_object(job: JobRecord, checkpoint: CheckpointRecord) -> FineTuningJobCheckpoint:
    name = job.checkpoint_model(checkpoint.step_number)
    return FineTuningJobCheckpoint(
        id=checkpoint.id, created_at=checkpoint.created_at, fine_tuned_model_checkpoint=name,
        fine_tuning_job_id=job.id, step_number=checkpoint.step_number,
        metrics=CheckpointMetrics(**checkpoint.metrics))


def _jobs(request: Request) -> FineTuningStore:
    return FineTuningStore(request.app.state.store)


async def _get(request: Request, job_id: str) -> JobRecord:
    job = await asyncio.to_thread(_jobs(request).get_job, job_id)
    if job is None:
        raise NotFoundError(f"No such fine-tuning job: {job_id}", param="job_id")
    return job


async def _check_file(request: Request, file_id: str, param: str) -> None:
    file = await asyncio.to_thread(request.app.state.store.get_file, file_id)
    if file is None:
        raise NotFoundError(f"No such File object: {file_id}", param=param)
    if file.purpose != "fine-tune":
        raise InvalidRequestError(f"{param} {file_id} has purpose {file.purpose!r}; upload it "
                                  "with purpose 'fine-tune'", param=param)
