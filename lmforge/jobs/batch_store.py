"""Batches in the store: the batch rows and their per-line results.

Batch progress is durable per request: each finished line is one ``batch_results`` row, inserted
in the same transaction that bumps the batch's counts, so after a crash a batch resumes with
exactly the lines that have no row (``done_lines``). Status changes are conditional updates
(``transition``, from the statuses ``BATCH_FROM`` lists), so a status never goes backwards,
whoever writes it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import sqlalchemy as sa

from lmforge.jobs.schema import BATCH_RESULTS, BATCHES
from lmforge.jobs.statuses import BATCH_FROM, UNFINISHED_BATCHES
from lmforge.jobs.store import Store, new_id
from lmforge.protocol.statuses import BatchStatus


@dataclass
class BatchRecord:
    """One batch (the OpenAI batch object's fields; ``total``/``completed``/``failed`` are its
    ``request_counts``, ``metadata`` and ``errors`` decoded JSON)."""

    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    model: str | None
    metadata: dict[str, str] | None
    errors: list[dict[str, Any]] | None
    output_file_id: str | None
    error_file_id: str | None
    total: int
    completed: int
    failed: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    output_expires_s: int | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    rank: int


class BatchStore:
    """Batch rows over a ``Store``'s database (the tables of its migration 1).

    Args:
        store: the jobs store whose database holds the batches (and whose ``page`` lists them).
    """

    def __init__(self, store: Store):
        self.store = store
        self.db = store.db

    def add_batch(self, endpoint: str, input_file_id: str, completion_window: str,
                  window_s: int, metadata: dict[str, str] | None,
                  output_expires_s: int | None = None) -> BatchRecord:
        """A new ``validating`` batch of the input file ``input_file_id``, expiring
        ``window_s`` seconds from now; ``output_expires_s``: its output files' lifetime."""
        rank = time.time_ns()
        now = rank // 10**9
        values = dict(id=new_id("batch_"), endpoint=endpoint, input_file_id=input_file_id,
                      completion_window=completion_window, status=BatchStatus.VALIDATING,
                      metadata=json.dumps(metadata) if metadata is not None else None,
                      total=0, completed=0, failed=0, input_tokens=0, cached_tokens=0,
                      output_tokens=0, output_expires_s=output_expires_s, created_at=now,
                      expires_at=now + window_s, rank=rank)
        with self.db.begin() as conn:
            conn.execute(BATCHES.insert().values(**values))
        return self.get_batch(values["id"])  # type: ignore[return-value]

    def get_batch(self, batch_id: str) -> BatchRecord | None:
        """The batch ``batch_id``, or None if there is none."""
        with self.db.connect() as conn:
            row = conn.execute(BATCHES.select().where(BATCHES.c.id == batch_id)).first()
        return None if row is None else _batch(row)

    def list_batches(self, limit: int = 20, after: str | None = None
                     ) -> tuple[list[BatchRecord], bool]:
        """A page of batches, newest first, after the batch id ``after``."""
        rows, more = self.store.page(BATCHES, BATCHES.select(), limit, after, "desc")
        return [_batch(r) for r in rows], more

    def unfinished_batches(self) -> list[BatchRecord]:
        """Batches a worker still has to drive (also those a crash interrupted), oldest first."""
        with self.db.connect() as conn:
            rows = conn.execute(BATCHES.select().where(
                BATCHES.c.status.in_(UNFINISHED_BATCHES)).order_by(BATCHES.c.rank)).all()
        return [_batch(r) for r in rows]

    def transition(self, batch_id: str, status: BatchStatus, **values: Any) -> bool:
        """Move a batch to ``status`` (stamping ``<status>_at``) if its current status may
        precede it (``BATCH_FROM``), with other column ``values`` in the same update. Returns
        whether it moved: False means another writer moved it first, or it was finished.

        Raises:
            ValueError: ``status`` is not a ``BatchStatus`` (or one's value)."""
        status = BatchStatus(status)
        if "errors" in values and values["errors"] is not None:
            values["errors"] = json.dumps(values["errors"])
        stamp = int(time.time())
        with self.db.begin() as conn:
            moved = conn.execute(BATCHES.update().where(
                BATCHES.c.id == batch_id, BATCHES.c.status.in_(BATCH_FROM[status])).values(
                status=status, **{f"{status.value}_at": stamp}, **values)).rowcount
        return bool(moved)

    def set_batch(self, batch_id: str, **values: Any) -> None:
        """Update columns other than the status (e.g. ``total`` and ``model`` once validated)."""
        with self.db.begin() as conn:
            conn.execute(BATCHES.update().where(BATCHES.c.id == batch_id).values(**values))

    def add_result(self, batch_id: str, line: int, custom_id: str, ok: bool,
                   record: dict[str, Any], usage: tuple[int, int, int] = (0, 0, 0)) -> bool:
        """Record one finished line and count it (``completed`` if ok, else ``failed``; its
        ``usage`` = (input, cached, output) tokens added to the batch's), in one transaction.
        Returns False (and changes nothing) if the line already has a result."""
        counter = BATCHES.c.completed if ok else BATCHES.c.failed
        c = BATCHES.c
        try:
            with self.db.begin() as conn:
                conn.execute(BATCH_RESULTS.insert().values(
                    batch_id=batch_id, line=line, custom_id=custom_id, ok=ok,
                    record=json.dumps(record, ensure_ascii=False)))
                conn.execute(BATCHES.update().where(c.id == batch_id).values({
                    counter.name: counter + 1, "input_tokens": c.input_tokens + usage[0],
                    "cached_tokens": c.cached_tokens + usage[1],
                    "output_tokens": c.output_tokens + usage[2]}))
        except sa.exc.IntegrityError:
            return False
        return True

    def done_lines(self, batch_id: str) -> set[int]:
        """The 0-based input lines of the batch that already have a result."""
        with self.db.connect() as conn:
            return {line for (line,) in conn.execute(sa.select(BATCH_RESULTS.c.line).where(
                BATCH_RESULTS.c.batch_id == batch_id))}

    def results(self, batch_id: str) -> Iterator[tuple[int, bool, str]]:
        """``(line, ok, record JSON)`` of a batch's finished lines, in input order."""
        with self.db.connect() as conn:
            yield from conn.execute(sa.select(
                BATCH_RESULTS.c.line, BATCH_RESULTS.c.ok, BATCH_RESULTS.c.record).where(
                BATCH_RESULTS.c.batch_id == batch_id).order_by(BATCH_RESULTS.c.line))


def _batch(row: Any) -> BatchRecord:
    record = BatchRecord(**{f.name: getattr(row, f.name) for f in fields(BatchRecord)})
    record.metadata = json.loads(row.metadata) if row.metadata else None
    record.errors = json.loads(row.errors) if row.errors else None
    return record
