"""The durable store of files and batches: rows in SQL (SQLAlchemy), file bytes on disk.

SQLite under ``LMFORGE_HOME`` by default (``lmforge.db``, WAL journal), any SQLAlchemy URL
(``postgresql://...``) by ``--database-url``. The schema changes only through the append-only
``MIGRATIONS`` list (in the manner of simonw/llm's ``migrations.py``): each entry runs once, in
order, and is recorded in ``_migrations``; never edit or reorder an entry, append a new one.

File bytes live in ``<home>/files/<file id>``: written under a temporary name in the same
directory and renamed into place, so a file is never partially visible; its row is inserted
only after the rename, and deleted before the bytes are.

Batch progress is durable per request: each finished line is one ``batch_results`` row, inserted
in the same transaction that bumps the batch's counts, so after a crash a batch resumes with
exactly the lines that have no row (``done_lines``). Status changes are conditional updates
(``transition``), so a status never goes backwards, whoever writes it.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from lmforge.config import lmforge_home

_M = sa.MetaData()
FILES = sa.Table(
    "files", _M,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),  # unix seconds
    sa.Column("expires_at", sa.BigInteger),
    sa.Column("filename", sa.String(255), nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("rank", sa.BigInteger, nullable=False),  # creation time in ns: list order
)
BATCHES = sa.Table(
    "batches", _M,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("input_file_id", sa.String(64), nullable=False),
    sa.Column("completion_window", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("model", sa.String(255)),
    sa.Column("metadata", sa.Text),  # JSON object or NULL
    sa.Column("errors", sa.Text),  # JSON list of {code, message, param, line} or NULL
    sa.Column("output_file_id", sa.String(64)),
    sa.Column("error_file_id", sa.String(64)),
    sa.Column("total", sa.Integer, nullable=False, default=0),
    sa.Column("completed", sa.Integer, nullable=False, default=0),
    sa.Column("failed", sa.Integer, nullable=False, default=0),
    # usage summed over the finished lines
    sa.Column("input_tokens", sa.BigInteger, nullable=False, default=0),
    sa.Column("cached_tokens", sa.BigInteger, nullable=False, default=0),
    sa.Column("output_tokens", sa.BigInteger, nullable=False, default=0),
    sa.Column("output_expires_s", sa.BigInteger),  # output files' lifetime, None = forever
    *(sa.Column(f"{name}_at", sa.BigInteger) for name in (
        "created", "in_progress", "expires", "finalizing", "completed", "failed", "expired",
        "cancelling", "cancelled")),
    sa.Column("rank", sa.BigInteger, nullable=False),
)
BATCH_RESULTS = sa.Table(
    "batch_results", _M,
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("line", sa.Integer, primary_key=True),  # 0-based line of the input file
    sa.Column("custom_id", sa.String(512), nullable=False),
    sa.Column("ok", sa.Boolean, nullable=False),  # goes to the output file (else the error file)
    sa.Column("record", sa.Text, nullable=False),  # the output line's JSON
)


FINE_TUNING_JOBS = sa.Table(
    "fine_tuning_jobs", _M,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("model", sa.String(255), nullable=False),
    sa.Column("training_file", sa.String(64), nullable=False),
    sa.Column("validation_file", sa.String(64)),
    sa.Column("suffix", sa.String(64)),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("hyperparameters", sa.Text, nullable=False),  # JSON: the request's, flat
    sa.Column("method", sa.Text),  # JSON: the request's method object
    sa.Column("metadata", sa.Text),  # JSON object or NULL
    sa.Column("error", sa.Text),  # JSON {code, message, param} or NULL
    sa.Column("fine_tuned_model", sa.String(255)),
    sa.Column("adapter_path", sa.Text),  # the best checkpoint's PEFT directory once succeeded
    sa.Column("trained_tokens", sa.BigInteger),
    sa.Column("result_files", sa.Text),  # JSON list of file ids
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("finished_at", sa.BigInteger),
    sa.Column("rank", sa.BigInteger, nullable=False),
)
FINE_TUNING_EVENTS = sa.Table(
    "fine_tuning_events", _M,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("job_id", sa.String(64), nullable=False, index=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("level", sa.String(8), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("type", sa.String(16), nullable=False),  # message | metrics
    sa.Column("data", sa.Text),  # JSON or NULL
    sa.Column("rank", sa.BigInteger, nullable=False),
)
FINE_TUNING_CHECKPOINTS = sa.Table(
    "fine_tuning_checkpoints", _M,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("job_id", sa.String(64), nullable=False, index=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("step_number", sa.Integer, nullable=False),
    sa.Column("metrics", sa.Text, nullable=False),  # JSON {step, train_loss, valid_loss, ...}
    sa.Column("path", sa.Text, nullable=False),  # its PEFT adapter directory
    sa.Column("rank", sa.BigInteger, nullable=False),
)


def _create_tables(conn: Connection) -> None:
    _M.create_all(conn, tables=[FILES, BATCHES, BATCH_RESULTS])


def _create_fine_tuning_tables(conn: Connection) -> None:
    _M.create_all(conn, tables=[FINE_TUNING_JOBS, FINE_TUNING_EVENTS, FINE_TUNING_CHECKPOINTS])


# Append-only: (version, what it does, the change). Never edit or reorder an entry.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "files, batches and batch_results", _create_tables),
    (2, "fine-tuning jobs, their events and checkpoints", _create_fine_tuning_tables),
]

# The statuses a batch moves through; the map says which statuses may precede each one.
BATCH_FROM = {
    "in_progress": ("validating",),
    "finalizing": ("in_progress",),
    "completed": ("finalizing",),
    "failed": ("validating", "in_progress"),  # in_progress: its input file was deleted
    "expired": ("in_progress",),
    "cancelling": ("validating", "in_progress"),
    "cancelled": ("cancelling",),
}
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")


@dataclass
class FileRecord:
    """One stored file (the OpenAI file object's fields)."""

    id: str
    bytes: int
    created_at: int
    expires_at: int | None
    filename: str
    purpose: str
    rank: int


@dataclass
class BatchRecord:
    """One batch (the OpenAI batch object's fields; ``total``/``completed``/``failed`` are its
    ``request_counts``, ``metadata`` and ``errors`` decoded JSON)."""

    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
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


def new_id(prefix: str) -> str:
    """An OpenAI-style id: ``file-...``, ``batch_...``, 24 random hex digits."""
    return f"{prefix}{secrets.token_hex(12)}"


class Store:
    """Files and batches, durable across restarts.

    Args:
        url: a SQLAlchemy database URL; None = SQLite at ``<home>/lmforge.db``.
        home: the state directory; None = ``lmforge_home()``. File bytes go to ``<home>/files``.

    Raises:
        sqlalchemy.exc.ArgumentError / OperationalError: a malformed or unreachable URL.
    """

    def __init__(self, url: str | None = None, home: Path | None = None):
        self.home = Path(home) if home is not None else lmforge_home()
        self.files_dir = self.home / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._sweep_temporaries()
        self.url = url or f"sqlite:///{self.home / 'lmforge.db'}"
        self.db: Engine = sa.create_engine(self.url, future=True)
        if self.db.dialect.name == "sqlite":
            sa.event.listen(self.db, "connect", _sqlite_pragmas)
        self.migrate()

    def migrate(self) -> list[int]:
        """Apply the migrations not yet recorded; returns the versions applied now."""
        applied = []
        with self.db.begin() as conn:
            conn.execute(sa.text("CREATE TABLE IF NOT EXISTS _migrations "
                                 "(version INTEGER PRIMARY KEY, name VARCHAR(255) NOT NULL)"))
            done = {v for (v,) in conn.execute(sa.text("SELECT version FROM _migrations"))}
            for version, name, change in MIGRATIONS:
                if version not in done:
                    change(conn)
                    conn.execute(sa.text("INSERT INTO _migrations VALUES (:v, :n)"),
                                 {"v": version, "n": name})
                    applied.append(version)
        return applied

    def close(self) -> None:
        self.db.dispose()

    # -- files -------------------------------------------------------------------------------

    def _sweep_temporaries(self, older_than_s: float = 3600.0) -> None:
        """Delete upload temporaries a crash left behind (old enough that no live upload, of
        this process or another sharing the home, can still be writing them)."""
        limit = time.time() - older_than_s
        for path in self.files_dir.glob(".upload-*"):
            try:
                if path.stat().st_mtime < limit:
                    path.unlink()
            except FileNotFoundError:
                pass

    def temp_path(self) -> Path:
        """A fresh temporary path inside the files directory (so ``add_file`` can rename it)."""
        fd, name = tempfile.mkstemp(dir=self.files_dir, prefix=".upload-")
        os.close(fd)
        return Path(name)

    def add_file(self, source: Path | bytes, filename: str, purpose: str,
                 expires_at: int | None = None, file_id: str | None = None,
                 expires_after: int | None = None) -> FileRecord:
        """Store a file: ``source`` is a temporary path from ``temp_path()`` (moved into place)
        or the bytes themselves (written to a temporary file, fsynced, then renamed).
        ``expires_after``: seconds from ``created_at`` to ``expires_at`` (instead of the latter).

        ``file_id``: a chosen id (the batch worker names its output files after the batch, so
        finalizing again after a crash replaces them instead of leaving orphans)."""
        if isinstance(source, bytes):
            data, source = source, self.temp_path()
            with open(source, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        rank = time.time_ns()
        if expires_after is not None:
            expires_at = rank // 10**9 + expires_after
        record = FileRecord(file_id or new_id("file-"), source.stat().st_size, rank // 10**9,
                            expires_at, filename, purpose, rank)
        os.replace(source, self.path(record.id))
        with self.db.begin() as conn:
            if file_id is not None:
                conn.execute(FILES.delete().where(FILES.c.id == file_id))
            conn.execute(FILES.insert().values(**_row(record)))
        return record

    def path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def get_file(self, file_id: str) -> FileRecord | None:
        with self.db.connect() as conn:
            row = conn.execute(FILES.select().where(FILES.c.id == file_id)).first()
        return None if row is None else _record(FileRecord, row)

    def list_files(self, purpose: str | None = None, limit: int = 10000, after: str | None = None,
                   order: str = "desc") -> tuple[list[FileRecord], bool]:
        """A page of files, newest first (``order="desc"``) or oldest first, after the file id
        ``after`` (a cursor); returns ``(files, has_more)``."""
        query = FILES.select()
        if purpose is not None:
            query = query.where(FILES.c.purpose == purpose)
        rows, more = self.page(FILES, query, limit, after, order)
        return [_record(FileRecord, r) for r in rows], more

    def delete_file(self, file_id: str) -> bool:
        """Delete a file's row, then its bytes; False if there was no such file."""
        with self.db.begin() as conn:
            deleted = conn.execute(FILES.delete().where(FILES.c.id == file_id)).rowcount
        if deleted:
            self.path(file_id).unlink(missing_ok=True)
        return bool(deleted)

    def expired_files(self, now: int) -> list[str]:
        with self.db.connect() as conn:
            return [i for (i,) in conn.execute(sa.select(FILES.c.id).where(
                FILES.c.expires_at.is_not(None), FILES.c.expires_at <= now))]

    # -- batches -----------------------------------------------------------------------------

    def add_batch(self, endpoint: str, input_file_id: str, completion_window: str,
                  window_s: int, metadata: dict[str, str] | None,
                  output_expires_s: int | None = None) -> BatchRecord:
        rank = time.time_ns()
        now = rank // 10**9
        values = dict(id=new_id("batch_"), endpoint=endpoint, input_file_id=input_file_id,
                      completion_window=completion_window, status="validating",
                      metadata=json.dumps(metadata) if metadata is not None else None,
                      total=0, completed=0, failed=0, input_tokens=0, cached_tokens=0,
                      output_tokens=0, output_expires_s=output_expires_s, created_at=now,
                      expires_at=now + window_s, rank=rank)
        with self.db.begin() as conn:
            conn.execute(BATCHES.insert().values(**values))
        return self.get_batch(values["id"])  # type: ignore[return-value]

    def get_batch(self, batch_id: str) -> BatchRecord | None:
        with self.db.connect() as conn:
            row = conn.execute(BATCHES.select().where(BATCHES.c.id == batch_id)).first()
        return None if row is None else _batch(row)

    def list_batches(self, limit: int = 20, after: str | None = None
                     ) -> tuple[list[BatchRecord], bool]:
        """A page of batches, newest first, after the batch id ``after``."""
        rows, more = self.page(BATCHES, BATCHES.select(), limit, after, "desc")
        return [_batch(r) for r in rows], more

    def unfinished_batches(self) -> list[BatchRecord]:
        """Batches a worker still has to drive (also those a crash interrupted), oldest first."""
        with self.db.connect() as conn:
            rows = conn.execute(BATCHES.select().where(BATCHES.c.status.in_(UNFINISHED))
                                .order_by(BATCHES.c.rank)).all()
        return [_batch(r) for r in rows]

    def transition(self, batch_id: str, status: str, **values: Any) -> bool:
        """Move a batch to ``status`` (stamping ``<status>_at``) if its current status may
        precede it (``BATCH_FROM``), with other column ``values`` in the same update. Returns
        whether it moved: False means another writer moved it first, or it was finished."""
        if "errors" in values and values["errors"] is not None:
            values["errors"] = json.dumps(values["errors"])
        stamp = int(time.time())
        with self.db.begin() as conn:
            moved = conn.execute(BATCHES.update().where(
                BATCHES.c.id == batch_id, BATCHES.c.status.in_(BATCH_FROM[status])).values(
                status=status, **{f"{status}_at": stamp}, **values)).rowcount
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
        with self.db.connect() as conn:
            return {line for (line,) in conn.execute(sa.select(BATCH_RESULTS.c.line).where(
                BATCH_RESULTS.c.batch_id == batch_id))}

    def results(self, batch_id: str) -> Iterator[tuple[int, bool, str]]:
        """``(line, ok, record JSON)`` of a batch's finished lines, in input order."""
        with self.db.connect() as conn:
            yield from conn.execute(sa.select(
                BATCH_RESULTS.c.line, BATCH_RESULTS.c.ok, BATCH_RESULTS.c.record).where(
                BATCH_RESULTS.c.batch_id == batch_id).order_by(BATCH_RESULTS.c.line))

    # -- shared ------------------------------------------------------------------------------

    def page(self, table: sa.Table, query: Any, limit: int, after: str | None, order: str
             ) -> tuple[list[Any], bool]:
        """Rows of ``query`` over ``table`` ordered by (rank, id), ``order`` "desc" or "asc",
        after the row with id ``after``; returns ``(rows, has_more)``."""
        desc = order == "desc"
        key = sa.tuple_(table.c.rank, table.c.id)  # the id breaks ties of a coarse clock
        if after is not None:
            with self.db.connect() as conn:
                cursor = conn.execute(sa.select(table.c.rank, table.c.id).where(
                    table.c.id == after)).first()
            if cursor is not None:
                query = query.where(key < tuple(cursor) if desc else key > tuple(cursor))
        order_by = (table.c.rank.desc(), table.c.id.desc()) if desc else (table.c.rank,
                                                                          table.c.id)
        query = query.order_by(*order_by).limit(limit + 1)
        with self.db.connect() as conn:
            rows = conn.execute(query).all()
        return rows[:limit], len(rows) > limit


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL: readers (the API) never block the writer (the batch worker); synchronous=FULL: a
    # committed result survives a power loss, not only a crash of the process.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _row(record: Any) -> dict[str, Any]:
    return {f.name: getattr(record, f.name) for f in fields(record)}


def _record(cls: type, row: Any) -> Any:
    return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})


def _batch(row: Any) -> BatchRecord:
    record = _record(BatchRecord, row)
    record.metadata = json.loads(row.metadata) if row.metadata else None
    record.errors = json.loads(row.errors) if row.errors else None
    return record
