"""CLI commands for a running server's jobs: ``lmforge batches ...`` and ``lmforge fine-tune
...`` (built on ``cli_api``'s client helpers: ``--base-url``, ``--api-key``, errors as one
``Error:`` line, one JSON object per command)::

    lmforge batches create --input requests.jsonl --endpoint /v1/chat/completions
    lmforge batches wait batch_abc123
    lmforge fine-tune create --model smollm2-135m-instruct --training data.jsonl --follow
    lmforge fine-tune events ftjob-abc123 --follow
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import httpx
from tqdm import tqdm

from lmforge.cli_api import api_options, echo_json, request
from lmforge.protocol.fine_tuning import FINAL_JOB_STATUSES


@click.group()
def batches() -> None:
    """Create, inspect, list, cancel and wait for batches (the server's /v1/batches)."""


BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
FINAL_STATUSES = ("completed", "failed", "expired", "cancelled")


@batches.command("create")
@click.option("--input-file-id", default=None, help="An uploaded file of purpose batch.")
@click.option("--input", "input_path", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A local JSONL file: uploaded first (purpose batch), then used.")
@click.option("--endpoint", type=click.Choice(BATCH_ENDPOINTS), default=BATCH_ENDPOINTS[0],
              show_default=True)
@click.option("--metadata", "metadata", multiple=True, metavar="KEY=VALUE",
              help="Metadata pairs (repeatable).")
@api_options
def create_batch(client: httpx.Client, input_file_id: str | None, input_path: Path | None,
                 endpoint: str, metadata: tuple[str, ...]) -> None:
    """Create a batch (completion window 24h) and print its batch object."""
    if (input_file_id is None) == (input_path is None):
        raise click.UsageError("give exactly one of --input-file-id and --input")
    pairs = dict(pair.partition("=")[::2] for pair in metadata)
    if input_path is not None:
        with open(input_path, "rb") as f:
            input_file_id = request(client, "POST", "/v1/files", data={"purpose": "batch"},
                                    files={"file": (input_path.name, f)}).json()["id"]
    body = {"input_file_id": input_file_id, "endpoint": endpoint, "completion_window": "24h"}
    echo_json(request(client, "POST", "/v1/batches",
                      json=body | ({"metadata": pairs} if pairs else {})).json())


@batches.command("get")
@click.argument("batch_id")
@api_options
def get_batch(client: httpx.Client, batch_id: str) -> None:
    """Print the batch object of BATCH_ID."""
    echo_json(request(client, "GET", f"/v1/batches/{batch_id}").json())


@batches.command("list")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@click.option("--after", default=None, help="A batch id: list the batches after it.")
@api_options
def list_batches(client: httpx.Client, limit: int, after: str | None) -> None:
    """Print a page of batches, newest first."""
    params = {"limit": limit} | ({"after": after} if after else {})
    echo_json(request(client, "GET", "/v1/batches", params=params).json())


@batches.command("cancel")
@click.argument("batch_id")
@api_options
def cancel_batch(client: httpx.Client, batch_id: str) -> None:
    """Cancel BATCH_ID (it is cancelling, then cancelled) and print its batch object."""
    echo_json(request(client, "POST", f"/v1/batches/{batch_id}/cancel").json())


@batches.command("wait")
@click.argument("batch_id")
@click.option("--poll", type=float, default=2.0, show_default=True, help="Seconds between polls.")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@api_options
def wait_batch(client: httpx.Client, batch_id: str, poll: float, timeout: float | None) -> None:
    """Wait until BATCH_ID finishes, showing its progress; print its final batch object. Exits
    1 unless it completed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with tqdm(desc=batch_id, unit="req", file=sys.stderr) as bar:
        while True:
            batch = request(client, "GET", f"/v1/batches/{batch_id}").json()
            counts = batch["request_counts"]
            bar.total = counts["total"] or None
            bar.n = counts["completed"] + counts["failed"]
            bar.set_postfix_str(batch["status"])
            if batch["status"] in FINAL_STATUSES:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise click.ClickException(f"batch {batch_id} is still {batch['status']} after "
                                           f"{timeout:g} s")
            time.sleep(poll)
    echo_json(batch)
    if batch["status"] != "completed":
        raise click.ClickException(f"batch {batch_id} ended {batch['status']}")


@click.group("fine-tune")
def fine_tune() -> None:
    """Create, inspect, list, cancel and follow fine-tuning jobs (the server's
    /v1/fine_tuning/jobs; LoRA SFT of the served base model)."""


# the create options that go to method.supervised.hyperparameters: (option, key, type, help)
_HYPERPARAMETERS = (
    ("--n-epochs", "n_epochs", int, "Passes over the training file (1 to 50; default auto)."),
    ("--batch-size", "batch_size", int, "Examples per optimizer step (1 to 256; default auto)."),
    ("--learning-rate-multiplier", "learning_rate_multiplier", float,
     "The peak learning rate is --learning-rate times this (0 to 10; default auto)."),
    ("--lora-r", "lora_r", int, "LoRA rank (1 to 256)."),
    ("--lora-alpha", "lora_alpha", float, "LoRA alpha (the update is scaled by alpha / r)."),
    ("--learning-rate", "learning_rate", float, "Base learning rate of AdamW (default 2e-4)."),
    ("--max-seq-len", "max_seq_len", int, "Tokens per example; longer ones are cut at the end."),
)


def _hyperparameter_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for flag, key, kind, text in reversed(_HYPERPARAMETERS):
        command = click.option(flag, key, type=kind, default=None, help=text)(command)
    return command


@fine_tune.command("create")
@click.option("--model", required=True, help="The base model: the one the server serves.")
@click.option("--training-file", default=None, help="An uploaded file of purpose fine-tune.")
@click.option("--training", "training_path", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A local JSONL (or CSV) file: uploaded first (purpose fine-tune), then used.")
@click.option("--validation-file", default=None, help="An uploaded file of purpose fine-tune.")
@click.option("--validation", "validation_path", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A local file: uploaded first (purpose fine-tune), then used.")
@click.option("--suffix", default=None, help="Part of the model name: ft:<base>:<suffix>:<job>.")
@click.option("--seed", type=int, default=None, help="For a reproducible run (default: random).")
@_hyperparameter_options
@click.option("--follow", is_flag=True,
              help="Then follow the job like `events --follow` (exit 1 unless it succeeds).")
@click.option("--poll", type=float, default=2.0, show_default=True,
              help="Seconds between polls with --follow.")
@api_options
def create_fine_tune(client: httpx.Client, model: str, training_file: str | None,
                     training_path: Path | None, validation_file: str | None,
                     validation_path: Path | None, suffix: str | None, seed: int | None,
                     follow: bool, poll: float, **hyperparameters: Any) -> None:
    """Create a fine-tuning job and print its job object (or, with --follow, its final one)."""
    if (training_file is None) == (training_path is None):
        raise click.UsageError("give exactly one of --training-file and --training")
    if validation_file is not None and validation_path is not None:
        raise click.UsageError("give at most one of --validation-file and --validation")
    if training_path is not None:
        training_file = _upload_fine_tune_file(client, training_path)
    if validation_path is not None:
        validation_file = _upload_fine_tune_file(client, validation_path)
    given = {k: v for k, v in hyperparameters.items() if v is not None}
    # method.supervised is where OpenAI takes hyperparameters now (the top level is deprecated)
    body = {"model": model, "training_file": training_file, "validation_file": validation_file,
            "suffix": suffix, "seed": seed,
            "method": {"type": "supervised", "supervised": {"hyperparameters": given}}}
    job = request(client, "POST", "/v1/fine_tuning/jobs",
                  json={k: v for k, v in body.items() if v is not None}).json()
    if follow:
        _follow(client, job["id"], poll)
    else:
        echo_json(job)


def _upload_fine_tune_file(client: httpx.Client, path: Path) -> str:
    with open(path, "rb") as f:
        return request(client, "POST", "/v1/files", data={"purpose": "fine-tune"},
                       files={"file": (path.name, f)}).json()["id"]


@fine_tune.command("get")
@click.argument("job_id")
@api_options
def get_fine_tune(client: httpx.Client, job_id: str) -> None:
    """Print the job object of JOB_ID."""
    echo_json(request(client, "GET", f"/v1/fine_tuning/jobs/{job_id}").json())


@fine_tune.command("list")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@click.option("--after", default=None, help="A job id: list the jobs after it.")
@api_options
def list_fine_tunes(client: httpx.Client, limit: int, after: str | None) -> None:
    """Print a page of fine-tuning jobs, newest first."""
    params = {"limit": limit} | ({"after": after} if after else {})
    echo_json(request(client, "GET", "/v1/fine_tuning/jobs", params=params).json())


@fine_tune.command("cancel")
@click.argument("job_id")
@api_options
def cancel_fine_tune(client: httpx.Client, job_id: str) -> None:
    """Cancel JOB_ID (a running job stops at its next step) and print its job object."""
    echo_json(request(client, "POST", f"/v1/fine_tuning/jobs/{job_id}/cancel").json())


@fine_tune.command("events")
@click.argument("job_id")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="The newest this many events (without --follow).")
@click.option("--follow", is_flag=True,
              help="Poll until the job finishes: messages and a live loss line on stderr, then "
                   "the final job object; exit 1 unless it succeeded.")
@click.option("--poll", type=float, default=2.0, show_default=True,
              help="Seconds between polls with --follow.")
@api_options
def fine_tune_events(client: httpx.Client, job_id: str, limit: int, follow: bool,
                     poll: float) -> None:
    """Print JOB_ID's events, oldest first, one line each: local time, level, message."""
    if follow:
        _follow(client, job_id, poll)
        return
    page = request(client, "GET", f"/v1/fine_tuning/jobs/{job_id}/events",
                   params={"limit": limit}).json()
    for event in reversed(page["data"]):  # the server sends newest first
        click.echo(_event_line(event))


def _event_line(event: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["created_at"]))
    return f"{when} {event['level']:<5} {event['message']}"


def _follow(client: httpx.Client, job_id: str, poll: float) -> None:
    """Poll JOB_ID until it is final: message events as lines and a loss line (tqdm; the
    metrics events' step, train loss, eval loss, learning rate) on stderr, so that stdout holds
    only the final job object (JSON).

    Raises:
        click.ClickException: the job failed (its error message) or was cancelled (exit 1).
    """
    seen: set[str] = set()
    eval_loss: float | None = None
    with tqdm(desc=job_id, unit="step", file=sys.stderr) as bar:
        while True:
            # the status first: events written before a final status are all fetched below
            job = request(client, "GET", f"/v1/fine_tuning/jobs/{job_id}").json()
            for event in _new_events(client, job_id, seen):
                if event["type"] != "metrics":
                    bar.write(_event_line(event), file=sys.stderr)
                    continue
                data = event.get("data") or {}
                eval_loss = data.get("eval_loss", eval_loss)
                bar.n = int(data.get("step", bar.n))
                bar.set_postfix_str(_loss_line(data, eval_loss), refresh=False)
                bar.refresh()
            if job["status"] in FINAL_JOB_STATUSES:
                break
            time.sleep(poll)
    echo_json(job)
    if job["status"] == "failed":
        error = job.get("error") or {}
        raise click.ClickException(f"fine-tuning job {job_id} failed: "
                                   f"{error.get('message', 'no reason given')}")
    if job["status"] != "succeeded":
        raise click.ClickException(f"fine-tuning job {job_id} was {job['status']}")


def _loss_line(data: dict[str, Any], eval_loss: float | None) -> str:
    parts = []
    if data.get("train_loss") is not None:
        parts.append(f"train_loss={data['train_loss']:.4f}")
    if eval_loss is not None:
        parts.append(f"eval_loss={eval_loss:.4f}")
    if data.get("learning_rate") is not None:
        parts.append(f"lr={data['learning_rate']:.2e}")
    return " ".join(parts)


def _new_events(client: httpx.Client, job_id: str, seen: set[str]) -> list[dict[str, Any]]:
    """JOB_ID's events not in ``seen`` (added to it), oldest first: pages newest-first until
    an event already seen."""
    new: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 1000}
    while True:
        page = request(client, "GET", f"/v1/fine_tuning/jobs/{job_id}/events",
                       params=params).json()
        fresh = list(itertools.takewhile(lambda e: e["id"] not in seen, page["data"]))
        new += fresh
        if len(fresh) < len(page["data"]) or not page["has_more"] or not fresh:
            break
        params["after"] = fresh[-1]["id"]  # the next page holds older events
    seen.update(e["id"] for e in new)
    return new[::-1]
