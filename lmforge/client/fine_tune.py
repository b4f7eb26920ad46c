"""``FineTune``: LoRA fine-tuning jobs (``/v1/fine_tuning/jobs``), in LLM Engine's interface."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.client import transport
from lmforge.client.errors import ConflictError
from lmforge.client.file import File
from lmforge.client.types import (
    CancelFineTuneResponse,
    CreateFineTuneResponse,
    GetFineTuneEventsResponse,
    GetFineTuneResponse,
    ListFineTunesResponse,
    LLMFineTuneEvent,
)

_PATH = "/v1/fine_tuning/jobs"
# LLM Engine's hyperparameter names -> the server's (the others are the same in both)
_HYPERPARAMETER_NAMES = {"lr": "learning_rate", "epochs": "n_epochs"}
_DATA_SUFFIXES = (".jsonl", ".json", ".csv")


class FineTune:
    """Fine-tune a served base model with LoRA; the result is served as a new model next to
    it (``fine_tuned_model``, ``ft:<base>:<suffix>:<job id>``)::

        from lmforge.client import FineTune

        job = FineTune.create(model="smollm2-135m-instruct", training_file="train.jsonl",
                              hyperparameters={"epochs": 3, "lr": 1e-3}, suffix="pirate")
        print(FineTune.get(job.id).status)  # PENDING, RUNNING, SUCCESS, FAILURE, CANCELLED
        for event in FineTune.get_events(job.id).events:
            print(event.timestamp, event.level, event.message)
    """

    @classmethod
    def create(cls, model: str, training_file: str | os.PathLike[str],
               validation_file: str | os.PathLike[str] | None = None,
               hyperparameters: dict[str, Any] | None = None,
               wandb_config: dict[str, Any] | None = None, suffix: str | None = None,
               **extra: Any) -> CreateFineTuneResponse:
        """Start a job that fine-tunes ``model`` on ``training_file``.

        Args:
            model: the base model, as the server serves it.
            training_file: a file ID (``File.upload``) or the path of a local file, which is
                uploaded first (purpose ``fine-tune``). Rows are OpenAI chat JSONL
                (``{"messages": [...]}``), prompt/completion JSONL, or a CSV with ``prompt`` and
                ``response`` columns (LLM Engine's format); at least 10 rows (2 in a CSV). For
                ``method="dpo"``: preference pairs (OpenAI's ``input`` /
                ``preferred_output`` / ``non_preferred_output``, TRL's ``prompt`` / ``chosen``
                / ``rejected``, or Anyscale's ``chosen`` / ``rejected`` conversations).
            validation_file: the same, for the validation loss (default: 10% held out).
            hyperparameters: LLM Engine's ``lr``, ``epochs``, ``warmup_ratio``,
                ``weight_decay``, and the server's own names (``n_epochs``, ``batch_size``,
                ``learning_rate``, ``lora_r``, ``lora_alpha``, ``lora_dropout``,
                ``target_modules``, ``max_seq_len``, ...). Numbers may be strings, as LLM
                Engine passes them.
            wandb_config: LLM Engine's Weights & Biases settings, sent as OpenAI's
                ``integrations``; an lmforge server has none (its job events carry the
                metrics) and answers 400 unless this is None.
            suffix: part of the new model's name (letters, digits, ``_.-``; 64 at most).
            **extra: more job fields (``seed``, ``metadata``), and lmforge's ``method``:
                ``"supervised"`` (SFT, the default) or ``"dpo"`` (preference pairs; OpenAI's
                ``method.type``), whose hyperparameters add ``beta`` (default 0.1),
                ``loss_type``, ``label_smoothing`` and ``rpo_alpha``. LLM Engine's signature
                has no ``method``, so it travels here.

        Returns:
            ``CreateFineTuneResponse``: the job (``id``, ``status`` PENDING at first).

        Raises:
            BadRequestError: an unknown base model, a file of another purpose, a
                hyperparameter out of range (``param`` names it).
            NotFoundError: no such file ID. FileNotFoundError: no such local path.
        """
        method = extra.pop("method", "supervised")
        body = {"model": model, "training_file": _file_id(training_file), "suffix": suffix,
                "validation_file": None if validation_file is None else _file_id(validation_file),
                "method": {"type": method, method: {
                    "hyperparameters": _hyperparameters(hyperparameters or {})}},
                "integrations": None if wandb_config is None else [
                    {"type": "wandb", "wandb": wandb_config}]}
        body = {k: v for k, v in body.items() if v is not None} | extra
        job = transport.request("POST", _PATH, json=body).json()
        return CreateFineTuneResponse.from_job(job)

    @classmethod
    def get(cls, fine_tune_id: str) -> GetFineTuneResponse:
        """The job ``fine_tune_id``: ``status`` (PENDING, RUNNING, SUCCESS, FAILURE,
        CANCELLED), ``fine_tuned_model`` once it succeeded, ``error`` if it failed.

        Raises:
            NotFoundError: no such job.
        """
        return GetFineTuneResponse.from_job(
            transport.request("GET", f"{_PATH}/{fine_tune_id}").json())

    @classmethod
    def list(cls) -> ListFineTunesResponse:
        """Every fine-tuning job, newest first."""
        return ListFineTunesResponse(jobs=[GetFineTuneResponse.from_job(j)
                                           for j in transport.list_all(_PATH)])

    @classmethod
    def cancel(cls, fine_tune_id: str) -> CancelFineTuneResponse:
        """Cancel ``fine_tune_id``: a running job stops at its next training step.

        Returns:
            ``CancelFineTuneResponse``: ``success`` is False when the job had already
            succeeded or failed (``job`` shows how it ended); cancelling twice succeeds.

        Raises:
            NotFoundError: no such job.
        """
        try:
            job = transport.request("POST", f"{_PATH}/{fine_tune_id}/cancel").json()
        except ConflictError:
            return CancelFineTuneResponse(success=False, job=cls.get(fine_tune_id))
        return CancelFineTuneResponse(success=True, job=GetFineTuneResponse.from_job(job))

    @classmethod
    def get_events(cls, fine_tune_id: str) -> GetFineTuneEventsResponse:
        """Every event of ``fine_tune_id``, oldest first: status changes and, per training
        step and epoch, a metrics event (``data``: step, train_loss, eval_loss, ...).

        Raises:
            NotFoundError: no such job.
        """
        return GetFineTuneEventsResponse(events=_new_events(fine_tune_id, set()))


    @classmethod
    def wait(cls, fine_tune_id: str, poll_interval: float = 2.0, timeout: float | None = None,
             on_event: Callable[[LLMFineTuneEvent], None] | None = None) -> GetFineTuneResponse:
        """Poll ``fine_tune_id`` until it succeeded, failed or was cancelled.

        Args:
            poll_interval: seconds between polls.
            timeout: give up after this many seconds (None: as long as it takes).
            on_event: called with each event once, oldest first, as they appear (every event
                written before the final status included).

        Returns:
            The job in its final status (check ``status``: SUCCESS is not implied).

        Raises:
            TimeoutError: not final after ``timeout`` (the job keeps running).
            NotFoundError: no such job.
        """
        seen: set[str] = set()

        def fetch() -> GetFineTuneResponse:
            job = cls.get(fine_tune_id)  # first: events written before a final status are read
            for event in _new_events(fine_tune_id, seen):
                if on_event is not None:
                    on_event(event)
            return job

        return transport.poll_until_final(fetch, lambda j: j.status.is_final(), poll_interval,
                                          timeout, lambda j: f"fine-tuning job {fine_tune_id} "
                                                             f"is still {j.server_status}")


def _new_events(fine_tune_id: str, seen: set[str]) -> list[LLMFineTuneEvent]:
    """The job's events not in ``seen`` (added to it), oldest first: the server pages newest
    first, so pages are read until one holds an event already seen."""
    new: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = transport.request("GET", f"{_PATH}/{fine_tune_id}/events", params=params).json()
        fresh = list(itertools.takewhile(lambda e: e["id"] not in seen, page["data"]))
        new += fresh
        if len(fresh) < len(page["data"]) or not page.get("has_more") or not fresh:
            break
        params["after"] = fresh[-1]["id"]  # the next page holds older events
    seen.update(e["id"] for e in new)
    return [LLMFineTuneEvent(**e, timestamp=e.get("created_at")) for e in reversed(new)]


def _file_id(file: str | os.PathLike[str]) -> str:
    """The ID of ``file``'s upload if it names a local file, else ``file`` (an ID).

    Raises:
        FileNotFoundError: ``file`` looks like a path (a separator or a data file's suffix)
            but there is no such file.
    """
    path = Path(file)
    if path.is_file():
        return File.upload(path, purpose="fine-tune").id
    if isinstance(file, os.PathLike) or os.sep in file or path.suffix in _DATA_SUFFIXES:
        raise FileNotFoundError(f"no such training file: {file} (give a local path or the ID "
                                "of an uploaded file)")
    return file


def _hyperparameters(given: dict[str, Any]) -> dict[str, Any]:
    """LLM Engine's names as the server's, numeric strings as numbers."""
    return {_HYPERPARAMETER_NAMES.get(k, k): _number(v) for k, v in given.items()}


def _number(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value  # "auto", or a string the server will judge
