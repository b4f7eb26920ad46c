"""``lmforge batches run --ray``: a batch input file on Ray Data, one engine per actor, with
results committed as they arrive so that a run killed midway resumes without redoing or
duplicating a line.

Data flow::

    input.jsonl --parse_input (driver)--> lines without a result yet
        --ray.data.from_items--> map_batches(LineRunner, concurrency=replicas)   one engine each
        --iter_batches (driver)--> <output>.parts/part-*.jsonl   each finished batch, atomically
        --merge in input order--> <output>                       then the parts are removed

``LineRunner`` builds what ``lmforge batches run`` builds (the in-process app over an
``AsyncEngine``, ``jobs.offline.run_lines``), so every record is the one the single-process
runner writes for the same line (ids and timestamps aside; same greedy text).

Exactly once per ``custom_id``, across reruns:

- the staging directory ``<output>.parts/`` holds ``manifest.json`` (the input's SHA-256 and the
  model) and one ``part-*.jsonl`` per batch of results the driver received; each line of a part
  is ``{"pos", "ok", "usage", "record"}``, ``pos`` being the line's position among the input's
  requests. A part is written to a temporary name and renamed, so it exists whole or not at all;
- a rerun with the same arguments reads the parts, and only the lines whose ``pos`` no part
  holds go to Ray; a rerun over another input or model is refused (the message names the
  directory to delete);
- the output is written (temporary name, renamed) from the parts in input order, one record per
  ``pos``, and only then is the staging directory removed: a run killed after the rename just
  merges again.

The driver commits, not the actors, so the cluster needs no filesystem shared with the driver
(the model, though, must load on every node: the same path, or an alias each node has cached).
A line whose batch was in flight when the run died is run again by the rerun; its earlier
result was never committed, so it is still written once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmforge.cluster.ray_env import connect
from lmforge.config import EngineConfig, ServerConfig
from lmforge.jobs.batch_lines import BatchLine, LineResult, jsonl, parse_input
from lmforge.jobs.offline import Summary, run_lines

MANIFEST = "manifest.json"


@dataclass
class RayBatchOptions:
    """Where and how wide the run goes on Ray."""

    address: str | None = None  # None: RAY_ADDRESS, the cluster `ray start` made here, or a new one
    replicas: int = 1  # actors, each holding one engine (Ray Data's ``concurrency``)
    actor_cpus: float = 1.0  # ``num_cpus`` per actor
    actor_gpus: float = 0.0  # ``num_gpus`` per actor
    concurrency: int = 64  # lines in flight per engine; also the lines an actor takes at once


class LineRunner:
    """A Ray Data callable class: one engine per actor, loaded once in ``__init__``; each call
    runs a batch of lines through the in-process app (as ``lmforge batches run`` does).

    A batch is Ray Data's ``dict[str, numpy.ndarray]`` with columns ``pos``, ``index``,
    ``custom_id``, ``url``, ``body`` (JSON text); the result has ``pos``, ``ok``, ``record``
    (JSON text) and the token counts ``input_tokens``, ``cached_tokens``, ``output_tokens``.
    """

    def __init__(self, config: EngineConfig, concurrency: int) -> None:
        # imported here, in the actor: the driver never loads torch or the model
        from lmforge.engine.async_engine import AsyncEngine
        from lmforge.server import build_app

        self.engine = AsyncEngine.from_config(config)
        self.engine.start()
        self.app = build_app(self.engine, ServerConfig())
        self.concurrency = concurrency
        # one loop for the actor's life: the app's asyncio objects stay on the loop they met
        self.loop = asyncio.new_event_loop()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        lines = [BatchLine(int(index), str(custom_id), json.loads(body), str(url))
                 for index, custom_id, url, body in zip(batch["index"], batch["custom_id"],
                                                        batch["url"], batch["body"])]
        results, _ = self.loop.run_until_complete(
            run_lines(self.app, lines, self.concurrency, progress=False))
        return {"pos": [int(p) for p in batch["pos"]], "ok": [r.ok for r in results],
                "record": [json.dumps(r.record, ensure_ascii=False) for r in results],
                "input_tokens": [r.usage[0] for r in results],
                "cached_tokens": [r.usage[1] for r in results],
                "output_tokens": [r.usage[2] for r in results]}

    def __del__(self) -> None:
        # Ray Data drops the UDF when it retires the actor (``__ray_shutdown__``): stop the
        # engine's loop thread, which would otherwise keep the worker process from exiting
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def run_file_on_ray(input_file: Path, output_file: Path, config: EngineConfig, model_name: str,
                    options: RayBatchOptions) -> tuple[Summary, int]:
    """Run ``input_file`` (OpenAI batch lines, validated as ``lmforge batches run`` does) on
    the Ray cluster and write ``output_file``: one record per line, in input order. Resumes a
    killed run with the same arguments from ``<output_file>.parts/`` (see the module docstring).

    Returns:
        ``(summary, resumed)``: the summary of the lines this run executed, and how many lines
        an earlier run had committed (in the output, not in the summary).

    Raises:
        RayUnavailableError: Ray is missing, or the cluster cannot be joined.
        ValueError: invalid input lines (each named with its 1-based number), or a staging
            directory left by a run over another input or model.
    """
    data = input_file.read_bytes()
    lines, errors = parse_input(data, None, {model_name})
    if errors:
        raise ValueError("the input file has invalid lines:\n" + "\n".join(
            f"  line {e['line']}: {e['message']}" for e in errors[:20]))
    parts = staging_dir(output_file)
    done = open_staging(parts, {"input_sha256": hashlib.sha256(data).hexdigest(),
                                "model": config.model.model, "model_name": model_name,
                                "lines": len(lines)})
    todo = [(pos, line) for pos, line in enumerate(lines) if pos not in done]
    summary = Summary()
    if todo:
        ray = connect(options.address)
        _run_missing(ray, todo, config, options, parts, summary, initial=len(done))
    merge_parts(parts, len(lines), output_file)
    return summary, len(done)


def staging_dir(output_file: Path) -> Path:
    """``<output>.parts/``, next to the output (same filesystem: its renames are atomic)."""
    return output_file.with_name(output_file.name + ".parts")


def open_staging(parts: Path, manifest: dict[str, Any]) -> set[int]:
    """Create ``parts`` with ``manifest``, or check an existing one's; return the ``pos`` of
    every committed result.

    Raises:
        ValueError: ``parts`` holds a run over another input, model or served name.
    """
    path = parts / MANIFEST
    if path.exists():
        found = json.loads(path.read_text())
        if found != manifest:
            raise ValueError(f"{parts} holds the results of a run over another input or model "
                             f"({found}); delete it to start over, or use another --output")
        for stale in parts.glob("*.tmp"):  # a part being written when the run died
            stale.unlink()
        return set(_read_parts(parts))
    parts.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(manifest).encode())
    return set()


def commit_part(parts: Path, rows: list[dict[str, Any]]) -> Path:
    """Write one batch of results (``{"pos", "ok", "usage", "record"}`` rows) as a new part,
    atomically; returns its path."""
    first = min(r["pos"] for r in rows)
    path = parts / f"part-{first:06d}-{secrets.token_hex(4)}.jsonl"
    _write_atomic(path, jsonl([json.dumps(r, ensure_ascii=False) for r in rows]))
    return path


def merge_parts(parts: Path, total: int, output_file: Path) -> None:
    """Write ``output_file`` from the parts, in input order, then remove ``parts``.

    Raises:
        RuntimeError: a line has no committed result (a bug: the run would have raised first).
    """
    records = _read_parts(parts)
    missing = [pos for pos in range(total) if pos not in records]
    if missing:
        raise RuntimeError(f"{len(missing)} lines have no result in {parts} (first: line "
                           f"position {missing[0]}); rerun the same command to finish them")
    lines = [json.dumps(records[pos]["record"], ensure_ascii=False) for pos in range(total)]
    _write_atomic(output_file, jsonl(lines))
    shutil.rmtree(parts)


def _run_missing(ray: Any, todo: list[tuple[int, BatchLine]], config: EngineConfig,
                 options: RayBatchOptions, parts: Path, summary: Summary, initial: int) -> None:
    """Run the ``todo`` lines on Ray Data and commit each batch of results as it arrives."""
    items = [{"pos": pos, "index": line.index, "custom_id": line.custom_id, "url": line.url,
              "body": json.dumps(line.body, ensure_ascii=False)} for pos, line in todo]
    results = ray.data.from_items(items).map_batches(
        LineRunner, fn_constructor_kwargs={"config": config,
                                           "concurrency": options.concurrency},
        batch_size=options.concurrency, concurrency=options.replicas,
        num_cpus=options.actor_cpus, num_gpus=options.actor_gpus)
    start = time.perf_counter()
    with tqdm(total=initial + len(todo), initial=initial, desc="batch (ray)", unit="req") as bar:
        for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
            rows = _result_rows(batch)
            commit_part(parts, rows)
            for row in rows:
                summary.add(LineResult(row["ok"], row["record"], tuple(row["usage"])))
            bar.update(len(rows))
    summary.seconds = time.perf_counter() - start


def _result_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """``LineRunner``'s columns -> one plain row per line, as a part stores it."""
    return [{"pos": int(pos), "ok": bool(ok), "usage": [int(i), int(c), int(o)],
             "record": json.loads(record)}
            for pos, ok, record, i, c, o in zip(batch["pos"], batch["ok"], batch["record"],
                                                batch["input_tokens"], batch["cached_tokens"],
                                                batch["output_tokens"])]


def _read_parts(parts: Path) -> dict[int, dict[str, Any]]:
    """``pos`` -> committed row, over every part (the first part holding a ``pos`` wins; no
    two do, since a rerun only runs what no part holds)."""
    rows: dict[int, dict[str, Any]] = {}
    for path in sorted(parts.glob("part-*.jsonl")):
        for raw in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(raw)
            rows.setdefault(int(row["pos"]), row)
    return rows


def _write_atomic(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a temporary file renamed over it (fsynced first)."""
    partial = path.with_name(path.name + ".tmp")
    with partial.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)
