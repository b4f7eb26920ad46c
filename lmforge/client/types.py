"""The client's response types: LLM Engine's client names and fields (``llmengine/data_types``),
filled from lmforge's OpenAI-shaped answers, plus a few fields LLM Engine lacks (each marked
"lmforge:"). Types built from a server object keep its other fields too (``extra="allow"``), so
``model_dump()`` shows everything the server said."""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = [
    "BatchJob",
    "BatchJobStatus",
    "BatchRequestCounts",
    "BatchStatus",
    "CancelFineTuneResponse",
    "CompletionOutput",
    "CompletionStreamOutput",
    "CompletionStreamResponse",
    "CompletionSyncResponse",
    "CreateFineTuneResponse",
    "DeleteFileResponse",
    "DeleteLLMEndpointResponse",
    "GetFileContentResponse",
    "GetFileResponse",
    "GetFineTuneEventsResponse",
    "GetFineTuneResponse",
    "GetLLMEndpointResponse",
    "LLMFineTuneEvent",
    "ListBatchesResponse",
    "ListFilesResponse",
    "ListFineTunesResponse",
    "ListLLMEndpointsResponse",
    "ModelDownloadResponse",
    "ModelEndpointStatus",
    "TokenOutput",
    "UploadFileResponse",
]


class _Status(str, Enum):
    """A status that prints as its value (``print(job.status)`` shows ``SUCCESS``)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class _ServerObject(BaseModel):
    """A type that keeps the server object's fields it does not declare."""

    model_config = ConfigDict(extra="allow")


# -- completions ------------------------------------------------------------------------------


class TokenOutput(BaseModel):
    """One generated token and its log probability (natural log, the model's raw
    log-softmax)."""

    token: str
    log_prob: float


class CompletionOutput(BaseModel):
    """What a (chat) completion produced."""

    text: str
    num_prompt_tokens: int | None = None
    num_completion_tokens: int
    tokens: list[TokenOutput] | None = None  # with return_token_log_probs=True
    finish_reason: str | None = None  # lmforge: "stop", "length" or "tool_calls"
    tool_calls: list[dict[str, Any]] | None = None  # lmforge: chat tool calls, OpenAI's shape


class CompletionSyncResponse(BaseModel):
    """The answer of ``Completion.create`` / ``ChatCompletion.create`` without streaming."""

    request_id: str  # the server's response id ("cmpl-...", "chatcmpl-...")
    output: CompletionOutput


class CompletionStreamOutput(BaseModel):
    """One streamed piece of a (chat) completion."""

    text: str  # the text this piece adds
    finished: bool
    num_prompt_tokens: int | None = None
    num_completion_tokens: int | None = None  # generated so far
    token: TokenOutput | None = None  # the piece's token, when it holds exactly one
    tokens: list[TokenOutput] | None = None  # lmforge: all of the piece's tokens
    finish_reason: str | None = None  # lmforge: set on the last piece
    tool_calls: list[dict[str, Any]] | None = None  # lmforge: chat tool-call deltas


class CompletionStreamResponse(BaseModel):
    """One item of ``Completion.create(stream=True)``."""

    request_id: str
    output: CompletionStreamOutput | None = None


# -- fine-tuning ------------------------------------------------------------------------------


class BatchJobStatus(_Status):
    """A fine-tuning job's status as LLM Engine names it (``status``); the server's own
    OpenAI status is ``server_status``."""

    PENDING = "PENDING"  # validating_files, queued
    RUNNING = "RUNNING"  # running
    SUCCESS = "SUCCESS"  # succeeded
    FAILURE = "FAILURE"  # failed
    CANCELLED = "CANCELLED"  # cancelled
    UNDEFINED = "UNDEFINED"  # a status this client does not know

    @classmethod
    def of(cls, server_status: str) -> BatchJobStatus:
        return _JOB_STATUSES.get(server_status, cls.UNDEFINED)

    def is_final(self) -> bool:
        return self in (BatchJobStatus.SUCCESS, BatchJobStatus.FAILURE,
                        BatchJobStatus.CANCELLED)


_JOB_STATUSES = {"validating_files": BatchJobStatus.PENDING, "queued": BatchJobStatus.PENDING,
                 "running": BatchJobStatus.RUNNING, "succeeded": BatchJobStatus.SUCCESS,
                 "failed": BatchJobStatus.FAILURE, "cancelled": BatchJobStatus.CANCELLED}


class GetFineTuneResponse(_ServerObject):
    """A fine-tuning job (the server's job object, with ``status`` in LLM Engine's words)."""

    id: str
    fine_tuned_model: str | None = None  # the model to call once the job succeeded
    status: BatchJobStatus
    server_status: str  # lmforge: validating_files, queued, running, succeeded, ...
    model: str | None = None  # lmforge: the base model
    error: dict[str, Any] | None = None  # lmforge: {code, message, param} of a failed job

    @classmethod
    def from_job(cls, job: dict[str, Any]) -> GetFineTuneResponse:
        return cls(**{**job, "status": BatchJobStatus.of(job["status"]),
                      "server_status": job["status"]})


class CreateFineTuneResponse(GetFineTuneResponse):
    """The job ``FineTune.create`` started."""


class ListFineTunesResponse(BaseModel):
    jobs: list[GetFineTuneResponse]  # newest first


class CancelFineTuneResponse(BaseModel):
    success: bool  # the job is (or already was) cancelled
    job: GetFineTuneResponse | None = None  # lmforge: the job as it is now


class LLMFineTuneEvent(_ServerObject):
    """One event of a fine-tuning job."""

    timestamp: float | None = None  # Unix seconds
    message: str
    level: str  # "info", "warn" or "error"
    id: str | None = None  # lmforge: the event's id
    type: str | None = None  # lmforge: "message" or "metrics"
    data: dict[str, Any] | None = None  # lmforge: a metrics event's step, losses, rate


class GetFineTuneEventsResponse(BaseModel):
    events: list[LLMFineTuneEvent]  # oldest first


# -- models -----------------------------------------------------------------------------------


class ModelEndpointStatus(_Status):
    READY = "READY"  # every model the server lists is being served


class GetLLMEndpointResponse(_ServerObject):
    """A model the server serves."""

    id: str | None = None
    name: str  # the name to call it by
    model_name: str | None = None  # the base model (itself, for a base model)
    status: ModelEndpointStatus = ModelEndpointStatus.READY
    inference_framework: str = "lmforge"
    # LLM Engine's deployment details; a server of lmforge's has none to report
    source: str | None = None
    inference_framework_tag: str | None = None
    num_shards: int | None = None
    quantize: str | None = None
    spec: dict[str, Any] | None = None
    fine_tuned: bool = False  # lmforge: a LoRA adapter on ``model_name``

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> GetLLMEndpointResponse:
        parent = card.get("parent")
        return cls(**{**card, "name": card["id"], "model_name": parent or card["id"],
                      "fine_tuned": parent is not None})


class ListLLMEndpointsResponse(BaseModel):
    model_endpoints: list[GetLLMEndpointResponse]


class DeleteLLMEndpointResponse(BaseModel):
    deleted: bool


class ModelDownloadResponse(BaseModel):
    urls: dict[str, str]  # file name -> URL (fetch with the API key)
    files: dict[str, str] | None = None  # lmforge: file name -> local path, with output_dir


# -- files ------------------------------------------------------------------------------------


class GetFileResponse(_ServerObject):
    """A stored file (the server's file object; ``size`` is its ``bytes``)."""

    id: str
    filename: str
    size: int  # bytes
    purpose: str | None = None  # lmforge
    created_at: int | None = None  # lmforge: Unix seconds

    @classmethod
    def from_file(cls, file: dict[str, Any]) -> GetFileResponse:
        return cls(**{**file, "size": file["bytes"]})


class UploadFileResponse(GetFileResponse):
    """The file ``File.upload`` stored."""


class ListFilesResponse(BaseModel):
    files: list[GetFileResponse]  # newest first


class DeleteFileResponse(_ServerObject):
    deleted: bool
    id: str | None = None  # lmforge


class GetFileContentResponse(BaseModel):
    id: str
    content: str  # decoded as UTF-8


# -- batches ----------------------------------------------------------------------------------


class BatchRequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchStatus(_Status):
    """A batch's status, as the OpenAI Batch API names it."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    def is_final(self) -> bool:
        return self in (BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED,
                        BatchStatus.CANCELLED)


class BatchJob(_ServerObject):
    """A batch (the OpenAI batch object): its results are ``output_file_id`` (2xx answers)
    and ``error_file_id`` (the rest), JSONL in input order."""

    id: str
    status: BatchStatus
    endpoint: str
    input_file_id: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    request_counts: BatchRequestCounts = BatchRequestCounts()
    created_at: int | None = None
    metadata: dict[str, str] | None = None
    errors: dict[str, Any] | None = None  # {"data": [{code, message, param, line}]}


class ListBatchesResponse(BaseModel):
    batches: list[BatchJob]  # newest first
