"""``/v1/batches`` wire schemas (OpenAI API reference, "Batch"), and the batch input line."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from lmforge.protocol.base import RequestModel, ResponseModel
from lmforge.protocol.statuses import BatchStatus

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
COMPLETION_WINDOWS = {"24h": 24 * 3600}  # the only window the OpenAI API offers
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


class ExpiresAfter(RequestModel):
    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=2592000)  # one hour to 30 days, as OpenAI


class BatchCreateRequest(RequestModel):
    """``POST /v1/batches``. ``output_expires_after`` sets ``expires_at`` of the output and
    error files."""

    input_file_id: str
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = None
    output_expires_after: ExpiresAfter | None = None


class BatchInputLine(RequestModel):
    """One line of a batch input file: ``{"custom_id", "method", "url", "body"}``.

    ``url`` is an endpoint path with or without the ``/v1`` prefix: OpenAI's examples write
    ``/v1/chat/completions``, SGLang's write ``/chat/completions``, and SGLang accepts both.
    It is stored in its ``/v1`` form (``canonical_endpoint``).
    """

    custom_id: str = Field(min_length=1, max_length=512)
    method: Literal["POST"]
    url: str
    body: dict[str, Any]

    @field_validator("url")
    @classmethod
    def _canonical_url(cls, url: str) -> str:
        return canonical_endpoint(url)


def canonical_endpoint(url: str) -> str:
    """``/chat/completions`` -> ``/v1/chat/completions``; any other path is returned as given
    (``/v1/...`` paths, and unknown ones, which validation then reports)."""
    return "/v1" + url if "/v1" + url in ENDPOINTS else url


class BatchError(ResponseModel):
    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None  # 1-based line of the input file


class BatchErrors(ResponseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchRequestCounts(ResponseModel):
    total: int
    completed: int
    failed: int


class InputTokensDetails(ResponseModel):
    cached_tokens: int


class OutputTokensDetails(ResponseModel):
    reasoning_tokens: int = 0


class BatchUsage(ResponseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class Batch(ResponseModel):
    """The OpenAI batch object."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    usage: BatchUsage
    metadata: dict[str, str] | None = None


class BatchList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
