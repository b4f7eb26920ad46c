"""``lmforge batches ...``: the server's batch jobs, over ``lmforge.client.Batch``::

    lmforge batches create --input requests.jsonl --endpoint /v1/chat/completions
    lmforge batches wait batch_abc123
    lmforge files download <output_file_id> -o results.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from lmforge.cli.common import api_options, json_option, show, show_list
from lmforge.client import Batch, BatchJob, BatchStatus
from lmforge.client.batch import ENDPOINTS

BATCH_COLUMNS = (("id", "id"), ("status", "status"), ("endpoint", "endpoint"),
                 ("done/total", lambda b: _progress(b["request_counts"])),
                 ("output file", "output_file_id"), ("error file", "error_file_id"),
                 ("created", "created_at"))


@click.group()
def batches() -> None:
    """Create, list, cancel and wait for batches (/v1/batches)."""


def _metadata(ctx: click.Context, param: click.Parameter, pairs: tuple[str, ...]
              ) -> dict[str, str]:
    """``("k=v", ...)`` -> {k: v}; a pair without ``=`` is a usage error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE")
        out[key] = value
    return out


@batches.command("create")
@click.option("--input", "input_path", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A local JSONL file: uploaded first (purpose batch), then used.")
@click.option("--input-file-id", default=None, help="An uploaded file of purpose batch.")
@click.option("--endpoint", type=click.Choice(ENDPOINTS), default=ENDPOINTS[0],
              show_default=True, help="The url of every line.")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", callback=_metadata,
              help="Kept with the batch (repeatable, 16 at most).")
@json_option
@api_options
def create(input_path: Path | None, input_file_id: str | None, endpoint: str,
           metadata: dict[str, str], as_json: bool) -> None:
    """Start a batch (completion window 24h) and print it."""
    if (input_path is None) == (input_file_id is None):
        raise click.UsageError("give exactly one of --input and --input-file-id")
    source = input_path if input_path is not None else input_file_id
    show(Batch.create(source, endpoint=endpoint, metadata=metadata or None), as_json)


@batches.command("get")
@click.argument("batch_id")
@json_option
@api_options
def get(batch_id: str, as_json: bool) -> None:
    """Show the batch BATCH_ID."""
    show(Batch.get(batch_id), as_json)


@batches.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="At most N batches (the newest).")
@json_option
@api_options
def list_batches(limit: int | None, as_json: bool) -> None:
    """List batches, newest first."""
    show_list(Batch.list().batches[:limit], as_json, BATCH_COLUMNS, "batches")


@batches.command("cancel")
@click.argument("batch_id")
@json_option
@api_options
def cancel(batch_id: str, as_json: bool) -> None:
    """Cancel BATCH_ID (cancelling, then cancelled) and print it."""
    show(Batch.cancel(batch_id), as_json)


@batches.command("wait")
@click.argument("batch_id")
@click.option("--poll", type=float, default=2.0, show_default=True, metavar="S",
              help="Seconds between polls.")
@click.option("--timeout", type=float, default=None, metavar="S",
              help="Give up after S seconds (the batch keeps running).")
@json_option
@api_options
def wait(batch_id: str, poll: float, timeout: float | None, as_json: bool) -> None:
    """Wait for BATCH_ID to finish, with a progress bar on stderr; print the final batch.
    Exits 1 unless it completed."""
    with tqdm(desc=batch_id, unit="req", file=sys.stderr) as bar:
        def update(batch: BatchJob) -> None:
            counts = batch.request_counts
            bar.total = counts.total or None
            bar.n = counts.completed + counts.failed
            bar.set_postfix_str(batch.status.value)  # also redraws the bar

        batch = Batch.wait(batch_id, poll_interval=poll, timeout=timeout, on_update=update)
    show(batch, as_json)
    if batch.status is not BatchStatus.COMPLETED:
        raise click.ClickException(f"batch {batch_id} ended {batch.status.value}")


def _progress(counts: dict[str, Any]) -> str:
    done = counts["completed"] + counts["failed"]
    failed = f" ({counts['failed']} failed)" if counts["failed"] else ""
    return f"{done}/{counts['total']}{failed}"
