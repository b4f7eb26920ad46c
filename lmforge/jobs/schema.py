"""The jobs store's tables as they are now (SQLAlchemy Core), for the stores' queries.

These definitions describe the schema that ``jobs/migrations.py`` builds; they never build it
(the migrations state their own DDL, frozen at their version). Changing a table here means
appending a migration that makes the same change; ``tests/jobs/test_migrations.py`` checks that
the two agree. The ``status`` columns hold the values of ``jobs/statuses.py`` (a VARCHAR(16),
read back as the enum).
"""

from __future__ import annotations

import enum

import sqlalchemy as sa

from lmforge.protocol.statuses import BatchStatus, FineTuningStatus

METADATA = sa.MetaData()


def _lease() -> tuple[sa.Column, ...]:
    """The lease columns of a job table (``jobs/lease.py``; appended by migration 3). Never part
    of the OpenAI objects."""
    return (sa.Column("lease_owner", sa.String(255)),  # <host>:<pid>:<random>, NULL: free
            # the last renewal, and when the lease lapses: unix ms of the database's clock
            sa.Column("lease_heartbeat_ms", sa.BigInteger),
            sa.Column("lease_expires_ms", sa.BigInteger))


def _status(enum_class: type[enum.Enum]) -> sa.Enum:
    """A VARCHAR(16) column type that stores an enum's values and reads them back as members
    (no database enum type, no CHECK constraint: the DDL is a plain VARCHAR(16))."""
    return sa.Enum(enum_class, native_enum=False, create_constraint=False, length=16,
                   values_callable=lambda members: [m.value for m in members],
                   validate_strings=True)


FILES = sa.Table(
    "files", METADATA,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),  # unix seconds
    sa.Column("expires_at", sa.BigInteger),
    sa.Column("filename", sa.String(255), nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("rank", sa.BigInteger, nullable=False),  # creation time in ns: list order
)
BATCHES = sa.Table(
    "batches", METADATA,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("input_file_id", sa.String(64), nullable=False),
    sa.Column("completion_window", sa.String(16), nullable=False),
    sa.Column("status", _status(BatchStatus), nullable=False),
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
    # when the batch was created, expires, and reached each status (unix seconds)
    *(sa.Column(f"{name}_at", sa.BigInteger) for name in (
        "created", "in_progress", "expires", "finalizing", "completed", "failed", "expired",
        "cancelling", "cancelled")),
    sa.Column("rank", sa.BigInteger, nullable=False),
    *_lease(),
)
BATCH_RESULTS = sa.Table(
    "batch_results", METADATA,
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("line", sa.Integer, primary_key=True),  # 0-based line of the input file
    sa.Column("custom_id", sa.String(512), nullable=False),
    sa.Column("ok", sa.Boolean, nullable=False),  # goes to the output file (else the error file)
    sa.Column("record", sa.Text, nullable=False),  # the output line's JSON
)
FINE_TUNING_JOBS = sa.Table(
    "fine_tuning_jobs", METADATA,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("model", sa.String(255), nullable=False),
    sa.Column("training_file", sa.String(64), nullable=False),
    sa.Column("validation_file", sa.String(64)),
    sa.Column("suffix", sa.String(64)),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("status", _status(FineTuningStatus), nullable=False),
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
    *_lease(),
)
FINE_TUNING_EVENTS = sa.Table(
    "fine_tuning_events", METADATA,
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
    "fine_tuning_checkpoints", METADATA,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("job_id", sa.String(64), nullable=False, index=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("step_number", sa.Integer, nullable=False),
    sa.Column("metrics", sa.Text, nullable=False),  # JSON {step, train_loss, valid_loss, ...}
    sa.Column("path", sa.Text, nullable=False),  # its PEFT adapter directory
    sa.Column("rank", sa.BigInteger, nullable=False),
)
