"""The jobs store's root: the state directory, its database, and the files kept in both.

``Store`` opens the database (SQLite under ``LMFORGE_HOME`` by default, ``lmforge.db`` with a
WAL journal; any SQLAlchemy URL, ``postgresql+psycopg://...``, by ``--database-url``), brings it
to the latest schema (``jobs/migrations.py``), and keeps the files: their rows, and their bytes
in ``<home>/files/<file id>``. Batches (``jobs/batch_store.py``) and fine-tuning jobs
(``jobs/fine_tuning_store.py``) are stores over its database; ``page`` is the cursor pagination all of
them share. The tables are described in ``jobs/schema.py``.

A file's bytes are written under a temporary name in the same directory and renamed into place,
so a file is never partially visible; its row is inserted only after the rename, and deleted
before the bytes are.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from lmforge.config import lmforge_home
from lmforge.jobs.migrations import migrate
from lmforge.jobs.schema import FILES


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


def new_id(prefix: str) -> str:
    """An OpenAI-style id: ``file-...``, ``batch_...``, 24 random hex digits."""
    return f"{prefix}{secrets.token_hex(12)}"


class Store:
    """The state directory and its database; the files, durable across restarts.

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
        migrate(self.db)

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
