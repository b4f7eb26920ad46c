"""``lmforge batches ...``: the server's batch jobs, over ``lmforge.client.Batch``, and ``run``,
the same input file run in this process without a server (like ``vllm run-batch``)::

    lmforge batches create --input requests.jsonl --endpoint /v1/chat/completions
    lmforge batches wait batch_abc123
    lmforge files download <output_file_id> -o results.jsonl
    lmforge batches run requests.jsonl -o results.jsonl
    lmforge batch run --ray --ray-address auto --replicas 4 requests.jsonl -o results.jsonl

``run --ray`` puts the lines on Ray Data, one engine per actor (``cluster/batch_data.py``: how a
rerun after a failure finishes the file with every line once). ``batch`` is an alias of
``batches``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from tqdm import tqdm

from lmforge.cli.common import api_options, json_option, show, show_list
from lmforge.cli.serve import StartupError, precheck
from lmforge.client import Batch, BatchJob, BatchStatus
from lmforge.client.batch import ENDPOINTS
from lmforge.config import DEFAULT_MODEL, EngineConfig, ModelConfig, ServerConfig
from lmforge.errors import ModelLoadError

if TYPE_CHECKING:
    from lmforge.cluster.batch_data import RayBatchOptions

BATCH_COLUMNS = (("id", "id"), ("status", "status"), ("endpoint", "endpoint"),
                 ("done/total", lambda b: _progress(b["request_counts"])),
                 ("output file", "output_file_id"), ("error file", "error_file_id"),
                 ("created", "created_at"))


@click.group()
def batches() -> None:
    """Create, list, cancel and wait for batches (/v1/batches), or run one here (run)."""


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


@batches.command("run")
@click.argument("input_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "output_file", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write one result line per input line (JSONL, input order).")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="A GGUF file, a Hugging Face model directory, or a known alias.")
@click.option("--served-model-name", default=None,
              help="The model name the lines' bodies use (default: the alias or directory name).")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--device", default="cpu", show_default=True)
@click.option("--max-model-len", type=int, default=None, help="Context length in tokens.")
@click.option("--concurrency", type=click.IntRange(min=1), default=64, show_default=True,
              help="Lines in flight at once per engine (the engine batches them).")
@click.option("--ray", "on_ray", is_flag=True,
              help="Run on a Ray cluster (Ray Data, one engine per actor); a rerun of a killed "
                   "run resumes from <output>.parts/. Needs the lmforge[ray] extra.")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="The Ray cluster to join (implies --ray; default: RAY_ADDRESS, else the "
                   "cluster `ray start` made on this machine, else a new local one).")
@click.option("--replicas", "--concurrency-actors", "replicas", type=click.IntRange(min=1),
              default=None, help="With --ray: actors, each holding one engine [default: 1].")
@click.option("--actor-cpus", type=click.FloatRange(min=0), default=None,
              help="With --ray: CPUs per actor [default: 1].")
@click.option("--actor-gpus", type=click.FloatRange(min=0), default=None,
              help="With --ray: GPUs per actor [default: 1 if --device is cuda, else 0].")
def run(input_file: Path, output_file: Path, model: str, served_model_name: str | None,
        dtype: str, device: str, max_model_len: int | None, concurrency: int, on_ray: bool,
        ray_address: str | None, replicas: int | None, actor_cpus: float | None,
        actor_gpus: float | None) -> None:
    """Run a batch input file (OpenAI's format: one {"custom_id", "method", "url", "body"} per
    line, url /v1/chat/completions, /v1/completions or /v1/embeddings) in-process, like
    `vllm run-batch`, without a server. Each output line is OpenAI's batch output record; bodies are exactly what
    the server's endpoints return. Invalid lines stop the run before any request (exit 2).

    With --ray the lines run on Ray Data, --replicas engines at once, and each finished batch
    of results is committed to <output>.parts/: the same command run again after a failure
    runs only the lines without a result, and the output has every custom_id once."""
    config = EngineConfig(model=ModelConfig(model=model, served_model_name=served_model_name,
                                            dtype=dtype, device=device,
                                            max_model_len=max_model_len))
    ray_flags = {"--replicas": replicas, "--actor-cpus": actor_cpus, "--actor-gpus": actor_gpus}
    if not (on_ray or ray_address):
        given = [name for name, value in ray_flags.items() if value is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)}: only with --ray (add --ray to run on "
                                   "a Ray cluster)")
        _run_here(input_file, output_file, config, concurrency)
        return
    from lmforge.cluster.batch_data import RayBatchOptions

    gpus = actor_gpus if actor_gpus is not None else float(device.startswith("cuda"))
    _run_on_ray(input_file, output_file, config, RayBatchOptions(
        address=ray_address, replicas=replicas or 1,
        actor_cpus=1.0 if actor_cpus is None else actor_cpus, actor_gpus=gpus,
        concurrency=concurrency))


def _run_here(input_file: Path, output_file: Path, config: EngineConfig,
              concurrency: int) -> None:
    """``batches run`` in this process: load the engine, run every line, write the output."""
    from lmforge.engine.async_engine import AsyncEngine
    from lmforge.jobs.batch_lines import jsonl, parse_input
    from lmforge.jobs.offline import run_lines
    from lmforge.server import build_app
    from lmforge.startup import StartupProfile

    profile = StartupProfile()
    profile.since_start("imports")
    try:
        with profile.phase("jobs store"):
            precheck(config, ServerConfig())
        engine = AsyncEngine.load_in_background(config, profile).result()
    except (ModelLoadError, ValueError) as e:
        raise StartupError(str(e)) from e
    click.echo(f"lmforge {profile.summary()}", err=True)
    try:
        lines, errors = parse_input(input_file.read_bytes(), None, {engine.model_name})
        if errors:
            raise StartupError("the input file has invalid lines:\n" + "\n".join(
                f"  line {e['line']}: {e['message']}" for e in errors[:20]))
        engine.start()
        app = build_app(engine, ServerConfig())
        results, summary = asyncio.run(run_lines(app, lines, concurrency))
    finally:
        engine.shutdown()
    output_file.write_bytes(jsonl([json.dumps(r.record, ensure_ascii=False) for r in results]))
    click.echo(f"{summary}; wrote {output_file}")


def _run_on_ray(input_file: Path, output_file: Path, config: EngineConfig,
                options: RayBatchOptions) -> None:
    """``batches run --ray``: check Ray and the model here (before any actor starts), then
    ``cluster.batch_data.run_file_on_ray``."""
    from lmforge.cluster.batch_data import run_file_on_ray
    from lmforge.cluster.ray_env import RayUnavailableError, import_ray

    try:
        import_ray()  # without the extra: one line naming it, before anything loads
        model_name = precheck(config, ServerConfig())
        summary, resumed = run_file_on_ray(input_file, output_file, config, model_name,
                                           options)
    except RayUnavailableError as e:
        raise click.ClickException(str(e)) from e
    except (ModelLoadError, ValueError) as e:
        raise StartupError(str(e)) from e
    earlier = f" ({resumed} lines were committed by an earlier run)" if resumed else ""
    click.echo(f"{summary}; wrote {output_file}{earlier}")
