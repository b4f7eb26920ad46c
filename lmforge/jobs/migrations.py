"""The jobs store's schema changes: an append-only list, each entry run once, in order.

In the manner of simonw/llm's ``migrations.py``: ``migrate`` applies the entries of
``MIGRATIONS`` not yet recorded in the ``_migrations`` table and records them. Never edit or
reorder an entry; append a new one.

Each migration states its own DDL as it was at its version, frozen here as SQL text that SQLite
and PostgreSQL both accept. None may build a table from the current definitions in
``jobs/schema.py``: migration 1 would then create a column that a later ``ALTER TABLE ... ADD
COLUMN`` adds again, and a fresh database would fail to migrate. The DDL of 1 and 2 declares
exactly the columns, types and indexes that earlier versions created (through SQLAlchemy's
``create_all``, which also skipped existing tables: hence ``IF NOT EXISTS``), so databases of
every version end with the same schema.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

# -- version 1: files, batches and their per-line results -----------------------------------

_V1_FILES = """
CREATE TABLE IF NOT EXISTS files (
    id VARCHAR(64) NOT NULL,
    bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    filename VARCHAR(255) NOT NULL,
    purpose VARCHAR(32) NOT NULL,
    rank BIGINT NOT NULL,
    PRIMARY KEY (id)
)"""
_V1_BATCHES = """
CREATE TABLE IF NOT EXISTS batches (
    id VARCHAR(64) NOT NULL,
    endpoint VARCHAR(64) NOT NULL,
    input_file_id VARCHAR(64) NOT NULL,
    completion_window VARCHAR(16) NOT NULL,
    status VARCHAR(16) NOT NULL,
    model VARCHAR(255),
    metadata TEXT,
    errors TEXT,
    output_file_id VARCHAR(64),
    error_file_id VARCHAR(64),
    total INTEGER NOT NULL,
    completed INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    input_tokens BIGINT NOT NULL,
    cached_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    output_expires_s BIGINT,
    created_at BIGINT,
    in_progress_at BIGINT,
    expires_at BIGINT,
    finalizing_at BIGINT,
    completed_at BIGINT,
    failed_at BIGINT,
    expired_at BIGINT,
    cancelling_at BIGINT,
    cancelled_at BIGINT,
    rank BIGINT NOT NULL,
    PRIMARY KEY (id)
)"""
_V1_BATCH_RESULTS = """
CREATE TABLE IF NOT EXISTS batch_results (
    batch_id VARCHAR(64) NOT NULL,
    line INTEGER NOT NULL,
    custom_id VARCHAR(512) NOT NULL,
    ok BOOLEAN NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (batch_id, line)
)"""

# -- version 2: fine-tuning jobs, their events and checkpoints ------------------------------

_V2_FINE_TUNING_JOBS = """
CREATE TABLE IF NOT EXISTS fine_tuning_jobs (
    id VARCHAR(64) NOT NULL,
    model VARCHAR(255) NOT NULL,
    training_file VARCHAR(64) NOT NULL,
    validation_file VARCHAR(64),
    suffix VARCHAR(64),
    seed BIGINT NOT NULL,
    status VARCHAR(16) NOT NULL,
    hyperparameters TEXT NOT NULL,
    method TEXT,
    metadata TEXT,
    error TEXT,
    fine_tuned_model VARCHAR(255),
    adapter_path TEXT,
    trained_tokens BIGINT,
    result_files TEXT,
    created_at BIGINT NOT NULL,
    finished_at BIGINT,
    rank BIGINT NOT NULL,
    PRIMARY KEY (id)
)"""
_V2_FINE_TUNING_EVENTS = """
CREATE TABLE IF NOT EXISTS fine_tuning_events (
    id VARCHAR(64) NOT NULL,
    job_id VARCHAR(64) NOT NULL,
    created_at BIGINT NOT NULL,
    level VARCHAR(8) NOT NULL,
    message TEXT NOT NULL,
    type VARCHAR(16) NOT NULL,
    data TEXT,
    rank BIGINT NOT NULL,
    PRIMARY KEY (id)
)"""
_V2_FINE_TUNING_EVENTS_INDEX = (
    "CREATE INDEX IF NOT EXISTS ix_fine_tuning_events_job_id ON fine_tuning_events (job_id)")
_V2_FINE_TUNING_CHECKPOINTS = """
CREATE TABLE IF NOT EXISTS fine_tuning_checkpoints (
    id VARCHAR(64) NOT NULL,
    job_id VARCHAR(64) NOT NULL,
    created_at BIGINT NOT NULL,
    step_number INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    path TEXT NOT NULL,
    rank BIGINT NOT NULL,
    PRIMARY KEY (id)
)"""
_V2_FINE_TUNING_CHECKPOINTS_INDEX = (
    "CREATE INDEX IF NOT EXISTS ix_fine_tuning_checkpoints_job_id "
    "ON fine_tuning_checkpoints (job_id)")

# -- version 3: job leases (``jobs/lease.py``): the worker driving a batch or fine-tuning job ---

_V3_LEASES = (
    "ALTER TABLE batches ADD COLUMN lease_owner VARCHAR(255)",
    "ALTER TABLE batches ADD COLUMN lease_heartbeat_ms BIGINT",
    "ALTER TABLE batches ADD COLUMN lease_expires_ms BIGINT",
    "ALTER TABLE fine_tuning_jobs ADD COLUMN lease_owner VARCHAR(255)",
    "ALTER TABLE fine_tuning_jobs ADD COLUMN lease_heartbeat_ms BIGINT",
    "ALTER TABLE fine_tuning_jobs ADD COLUMN lease_expires_ms BIGINT",
)


def ddl(*statements: str) -> Callable[[Connection], None]:
    """A migration step that executes ``statements`` (SQL text) in order."""
    def change(conn: Connection) -> None:
        for statement in statements:
            conn.execute(sa.text(statement))
    return change


# Append-only: (version, what it does, the change). Never edit or reorder an entry.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "files, batches and batch_results",
     ddl(_V1_FILES, _V1_BATCHES, _V1_BATCH_RESULTS)),
    (2, "fine-tuning jobs, their events and checkpoints",
     ddl(_V2_FINE_TUNING_JOBS, _V2_FINE_TUNING_EVENTS, _V2_FINE_TUNING_EVENTS_INDEX,
         _V2_FINE_TUNING_CHECKPOINTS, _V2_FINE_TUNING_CHECKPOINTS_INDEX)),
    (3, "leases of batches and fine-tuning jobs", ddl(*_V3_LEASES)),
]


def migrate(db: Engine) -> list[int]:
    """Apply the migrations that ``db`` has not recorded yet, each recorded as it is applied.

    Returns:
        The versions applied now, ascending (empty when the database was up to date).

    Raises:
        sqlalchemy.exc.DBAPIError: a migration failed (it stays unrecorded, so the next
            start tries it again).
    """
    applied = []
    with db.begin() as conn:
        if db.dialect.name == "postgresql":  # servers starting together migrate one at a time
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(7510642)"))
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
