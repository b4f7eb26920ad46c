"""``Batch``: batch jobs (``/v1/batches``, the OpenAI Batch API's semantics)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from lmforge.client import transport
from lmforge.client.file import File
from lmforge.client.types import BatchJob, ListBatchesResponse

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


class Batch:
    """Run many requests as one job, behind online traffic, durable across server restarts::

        from lmforge.client import Batch, File

        batch = Batch.create("requests.jsonl", endpoint="/v1/chat/completions")
        batch = Batch.wait(batch.id)
        print(batch.status, batch.request_counts)
        print(File.download(batch.output_file_id).content)

    Each line of the input is ``{"custom_id", "method": "POST", "url", "body"}``; each line of
    the output is ``{"id", "custom_id", "response": {"status_code", "body"}, "error"}``.
    """

    @classmethod
    def create(cls, input_file: str | os.PathLike[str],
               endpoint: str = "/v1/chat/completions", completion_window: str = "24h",
               metadata: dict[str, str] | None = None) -> BatchJob:
        """Start a batch.

        Args:
            input_file: a file ID (purpose ``batch``) or the path of a local JSONL file,
                which is uploaded first.
            endpoint: the endpoint of every line: ``/v1/chat/completions``,
                ``/v1/completions`` or ``/v1/embeddings``.
            completion_window: ``24h`` (OpenAI's only window); lines still waiting when it
                ends are reported as expired.
            metadata: up to 16 string pairs kept with the batch.

        Returns:
            The batch (``status`` ``validating`` or already ``in_progress``).

        Raises:
            BadRequestError: a line that fails validation (the batch's ``errors`` name the
                lines), an unknown endpoint, a file of another purpose.
            NotFoundError: no such file ID. FileNotFoundError: no such local path.
        """
        path = Path(input_file)
        if path.is_file():
            input_file = File.upload(path, purpose="batch").id
        elif isinstance(input_file, os.PathLike) or path.suffix == ".jsonl":
            raise FileNotFoundError(f"no such batch input file: {input_file}")
        body = {"input_file_id": str(input_file), "endpoint": endpoint,
                "completion_window": completion_window}
        if metadata:
            body["metadata"] = metadata
        return BatchJob(**transport.request("POST", "/v1/batches", json=body).json())

    @classmethod
    def get(cls, batch_id: str) -> BatchJob:
        """The batch ``batch_id``, with its ``status`` and ``request_counts``.

        Raises:
            NotFoundError: no such batch.
        """
        return BatchJob(**transport.request("GET", f"/v1/batches/{batch_id}").json())

    @classmethod
    def list(cls) -> ListBatchesResponse:
        """Every batch, newest first."""
        return ListBatchesResponse(batches=[BatchJob(**b)
                                            for b in transport.list_all("/v1/batches")])

    @classmethod
    def cancel(cls, batch_id: str) -> BatchJob:
        """Cancel ``batch_id``: it is ``cancelling`` until the lines in flight finish, then
        ``cancelled``; lines that never ran are in the error file as ``batch_cancelled``.
        Cancelling again returns the batch as it is.

        Raises:
            NotFoundError: no such batch. ConflictError: the batch already completed or failed.
        """
        return BatchJob(**transport.request("POST", f"/v1/batches/{batch_id}/cancel").json())

    @classmethod
    def wait(cls, batch_id: str, poll_interval: float = 2.0, timeout: float | None = None,
             on_update: Callable[[BatchJob], None] | None = None) -> BatchJob:
        """Poll ``batch_id`` until it is completed, failed, expired or cancelled.

        Args:
            poll_interval: seconds between polls.
            timeout: give up after this many seconds (None: wait as long as it takes).
            on_update: called with the batch after every poll (e.g. to show progress).

        Returns:
            The batch in its final status (``completed`` is not implied: check ``status``).

        Raises:
            TimeoutError: still not final after ``timeout`` (the batch keeps running).
            NotFoundError: no such batch.
        """
        def fetch() -> BatchJob:
            batch = cls.get(batch_id)
            if on_update is not None:
                on_update(batch)
            return batch

        return transport.poll_until_final(fetch, lambda b: b.status.is_final(), poll_interval,
                                          timeout, lambda b: f"batch {batch_id} is still "
                                                             f"{b.status}")
