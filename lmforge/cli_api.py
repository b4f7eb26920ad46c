"""CLI commands that talk to a running lmforge server over HTTP (httpx): ``lmforge files ...``,
``lmforge batches ...`` and ``lmforge fine-tune ...``.

Every such command takes ``--base-url`` (env ``LMFORGE_BASE_URL``) and ``--api-key`` (env
``LMFORGE_API_KEY``) through ``api_options``, prints one pretty JSON object for scripts to
parse, and turns the server's OpenAI error envelope into one ``Error: <message>`` line with
exit status 1 (``request``)::

    lmforge files upload requests.jsonl --purpose batch
    lmforge files list --purpose batch --limit 20
    lmforge files download file-abc123 -o results.jsonl
    lmforge batches create --input requests.jsonl --endpoint /v1/chat/completions
    lmforge batches wait batch_abc123
    lmforge fine-tune create --model tiny --training train.jsonl --suffix pirate --follow
    lmforge fine-tune events ftjob-abc123 --limit 50
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import httpx
from tqdm import tqdm

from lmforge.protocol.files import MAX_LIST_LIMIT, OUTPUT_PURPOSES, UPLOAD_PURPOSES
from lmforge.protocol.fine_tuning import FINAL_JOB_STATUSES

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# seconds per connect / per read or write of a chunk (not for a whole upload or download)
_TIMEOUT = httpx.Timeout(120.0, connect=10.0)


def api_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator of a click command that talks to a server: adds ``--base-url`` and
    ``--api-key`` and passes the command an open ``httpx.Client`` as its first argument
    (closed when the command returns)::

        @group.command("get")
        @click.argument("file_id")
        @api_options
        def get(client: httpx.Client, file_id: str) -> None: ...
    """

    @click.option("--base-url", envvar="LMFORGE_BASE_URL", default=DEFAULT_BASE_URL,
                  show_default=True, help="The lmforge server (env LMFORGE_BASE_URL).")
    @click.option("--api-key", envvar="LMFORGE_API_KEY", default=None,
                  help="Sent as 'Authorization: Bearer KEY' (env LMFORGE_API_KEY).")
    @functools.wraps(command)
    def with_client(base_url: str, api_key: str | None, **kwargs: Any) -> Any:
        with api_client(base_url, api_key) as client:
            return command(client, **kwargs)

    return with_client


def api_client(base_url: str, api_key: str | None = None) -> httpx.Client:
    """An ``httpx.Client`` on the server's root URL (a trailing ``/v1``, as OpenAI clients
    write it, is dropped: routes are requested as ``/v1/...``)."""
    root = base_url.rstrip("/")
    root = root[: -len("/v1")] if root.endswith("/v1") else root
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=root, headers=headers, timeout=_TIMEOUT)


def request(client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """``client.request(method, path, **kwargs)``, read and checked.

    Raises:
        click.ClickException: the server answered >= 400 (its error message, and the status),
            or could not be reached (naming the URL and how to point at another).
    """
    with _reaching(client):
        response = client.request(method, path, **kwargs)
    check(response)
    return response


@contextmanager
def stream(client: httpx.Client, method: str, path: str, **kwargs: Any
           ) -> Iterator[httpx.Response]:
    """Like ``request``, for a body to read in chunks (``response.iter_bytes()``)."""
    with _reaching(client), client.stream(method, path, **kwargs) as response:
        if response.status_code >= 400:
            response.read()
            check(response)
        yield response


def check(response: httpx.Response) -> None:
    """Raise ``click.ClickException`` with the server's message for a status >= 400."""
    if response.status_code < 400:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text.strip()[:500] or response.reason_phrase
    raise click.ClickException(f"{message} (HTTP {response.status_code})")


@contextmanager
def _reaching(client: httpx.Client) -> Iterator[None]:
    try:
        yield
    except httpx.TransportError as e:
        raise click.ClickException(
            f"Cannot reach the lmforge server at {client.base_url} ({type(e).__name__}: {e}). "
            "Start one with `lmforge serve`, or point at yours with --base-url or "
            "LMFORGE_BASE_URL.") from e


def echo_json(value: Any) -> None:
    """Print one JSON value, indented, for people and scripts alike."""
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


@click.group()
def files() -> None:
    """Upload, list, inspect, download and delete files (the server's /v1/files)."""


@files.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--purpose", required=True, type=click.Choice(UPLOAD_PURPOSES),
              help="What the file is for; batch and fine-tune files must be JSONL.")
@click.option("--expires-after", type=int, default=None,
              help="Delete the file this many seconds after upload (3600 to 2592000).")
@api_options
def upload(client: httpx.Client, path: Path, purpose: str, expires_after: int | None) -> None:
    """Upload PATH and print its file object."""
    data = {"purpose": purpose}
    if expires_after is not None:
        data |= {"expires_after[anchor]": "created_at",
                 "expires_after[seconds]": str(expires_after)}
    with open(path, "rb") as f:  # httpx streams it from disk
        echo_json(request(client, "POST", "/v1/files", data=data,
                          files={"file": (path.name, f)}).json())


@files.command("list")
@click.option("--purpose", type=click.Choice(UPLOAD_PURPOSES + OUTPUT_PURPOSES), default=None,
              help="Only files of this purpose.")
@click.option("--limit", type=click.IntRange(1, MAX_LIST_LIMIT), default=None,
              help=f"At most this many files (default and maximum {MAX_LIST_LIMIT}).")
@click.option("--after", default=None, help="A file id: list the files after it.")
@click.option("--order", type=click.Choice(["desc", "asc"]), default="desc", show_default=True,
              help="By creation time: desc = newest first.")
@api_options
def list_files(client: httpx.Client, **params: Any) -> None:
    """Print a page of files, newest first (the server's list object)."""
    given = {k: v for k, v in params.items() if v is not None}
    echo_json(request(client, "GET", "/v1/files", params=given).json())


@files.command("get")
@click.argument("file_id")
@api_options
def get(client: httpx.Client, file_id: str) -> None:
    """Print the file object of FILE_ID."""
    echo_json(request(client, "GET", f"/v1/files/{file_id}").json())


@files.command("download")
@click.argument("file_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the content here and print {id, path, bytes} (default: the raw "
                   "content to stdout).")
@api_options
def download(client: httpx.Client, file_id: str, output: Path | None) -> None:
    """Write the content of FILE_ID to stdout, or to --output."""
    with stream(client, "GET", f"/v1/files/{file_id}/content") as response:
        if output is None:
            with click.open_file("-", "wb") as sink:  # binary stdout, left open
                for chunk in response.iter_bytes():
                    sink.write(chunk)
            return
        # a partial download never takes the name: written aside, renamed once complete
        partial = output.with_name(output.name + ".part")
        size = 0
        try:
            with open(partial, "wb") as f:
                for chunk in response.iter_bytes():
                    size += f.write(chunk)
            os.replace(partial, output)
        finally:
            partial.unlink(missing_ok=True)
    echo_json({"id": file_id, "path": str(output), "bytes": size})


@files.command("delete")
@click.argument("file_id")
@api_options
def delete(client: httpx.Client, file_id: str) -> None:
    """Delete FILE_ID and print {id, object, deleted}."""
    echo_json(request(client, "DELETE", f"/v1/files/{file_id}").json())


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
