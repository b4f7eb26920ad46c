"""The jobs store's migrations (``jobs/migrations.py``), on SQLite files.

A fresh database and databases built at every earlier version, holding rows, all end at the
latest version with the same schema (``sqlite_master``, ``PRAGMA table_info`` and
``index_info``), the schema that ``jobs/schema.py`` describes, and the old rows intact. The old
databases are built two ways: with the frozen migrations cut at that version, and with the
exact DDL that lmforge ran before the migrations were frozen (``PRE_FREEZE_DDL``, copied from
such databases' ``sqlite_master``). A migration appended with ``ALTER TABLE ... ADD COLUMN``
runs on a fresh database too: the migrations never build a table from the current definitions,
which would create that column already (the bug this layout fixes).
"""

from __future__ import annotations

import ast
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from lmforge.jobs import migrations
from lmforge.jobs.batch_store import BatchStore
from lmforge.jobs.fine_tuning_store import FineTuningStore
from lmforge.jobs.migrations import MIGRATIONS, ddl, migrate
from lmforge.jobs.schema import METADATA
from lmforge.jobs.store import Store
from lmforge.protocol.statuses import BatchStatus, FineTuningStatus

LATEST = MIGRATIONS[-1][0]

# What lmforge's migrations 1 and 2 created (SQLAlchemy's create_all over the table definitions
# of their day, unchanged until the migrations were frozen), as SQLite stored the statements.
PRE_FREEZE_DDL = {
    1: [
        "CREATE TABLE files (\n\tid VARCHAR(64) NOT NULL, \n\tbytes BIGINT NOT NULL, \n\t"
        "created_at BIGINT NOT NULL, \n\texpires_at BIGINT, \n\tfilename VARCHAR(255) NOT NULL, "
        "\n\tpurpose VARCHAR(32) NOT NULL, \n\trank BIGINT NOT NULL, \n\tPRIMARY KEY (id)\n)",
        "CREATE TABLE batches (\n\tid VARCHAR(64) NOT NULL, \n\tendpoint VARCHAR(64) NOT NULL, "
        "\n\tinput_file_id VARCHAR(64) NOT NULL, \n\tcompletion_window VARCHAR(16) NOT NULL, "
        "\n\tstatus VARCHAR(16) NOT NULL, \n\tmodel VARCHAR(255), \n\tmetadata TEXT, \n\t"
        "errors TEXT, \n\toutput_file_id VARCHAR(64), \n\terror_file_id VARCHAR(64), \n\t"
        "total INTEGER NOT NULL, \n\tcompleted INTEGER NOT NULL, \n\tfailed INTEGER NOT NULL, "
        "\n\tinput_tokens BIGINT NOT NULL, \n\tcached_tokens BIGINT NOT NULL, \n\t"
        "output_tokens BIGINT NOT NULL, \n\toutput_expires_s BIGINT, \n\tcreated_at BIGINT, "
        "\n\tin_progress_at BIGINT, \n\texpires_at BIGINT, \n\tfinalizing_at BIGINT, \n\t"
        "completed_at BIGINT, \n\tfailed_at BIGINT, \n\texpired_at BIGINT, \n\t"
        "cancelling_at BIGINT, \n\tcancelled_at BIGINT, \n\trank BIGINT NOT NULL, \n\t"
        "PRIMARY KEY (id)\n)",
        "CREATE TABLE batch_results (\n\tbatch_id VARCHAR(64) NOT NULL, \n\t"
        "line INTEGER NOT NULL, \n\tcustom_id VARCHAR(512) NOT NULL, \n\tok BOOLEAN NOT NULL, "
        "\n\trecord TEXT NOT NULL, \n\tPRIMARY KEY (batch_id, line)\n)",
    ],
    2: [
        "CREATE TABLE fine_tuning_jobs (\n\tid VARCHAR(64) NOT NULL, \n\t"
        "model VARCHAR(255) NOT NULL, \n\ttraining_file VARCHAR(64) NOT NULL, \n\t"
        "validation_file VARCHAR(64), \n\tsuffix VARCHAR(64), \n\tseed BIGINT NOT NULL, \n\t"
        "status VARCHAR(16) NOT NULL, \n\thyperparameters TEXT NOT NULL, \n\tmethod TEXT, \n\t"
        "metadata TEXT, \n\terror TEXT, \n\tfine_tuned_model VARCHAR(255), \n\t"
        "adapter_path TEXT, \n\ttrained_tokens BIGINT, \n\tresult_files TEXT, \n\t"
        "created_at BIGINT NOT NULL, \n\tfinished_at BIGINT, \n\trank BIGINT NOT NULL, \n\t"
        "PRIMARY KEY (id)\n)",
        "CREATE TABLE fine_tuning_events (\n\tid VARCHAR(64) NOT NULL, \n\t"
        "job_id VARCHAR(64) NOT NULL, \n\tcreated_at BIGINT NOT NULL, \n\t"
        "level VARCHAR(8) NOT NULL, \n\tmessage TEXT NOT NULL, \n\ttype VARCHAR(16) NOT NULL, "
        "\n\tdata TEXT, \n\trank BIGINT NOT NULL, \n\tPRIMARY KEY (id)\n)",
        "CREATE INDEX ix_fine_tuning_events_job_id ON fine_tuning_events (job_id)",
        "CREATE TABLE fine_tuning_checkpoints (\n\tid VARCHAR(64) NOT NULL, \n\t"
        "job_id VARCHAR(64) NOT NULL, \n\tcreated_at BIGINT NOT NULL, \n\t"
        "step_number INTEGER NOT NULL, \n\tmetrics TEXT NOT NULL, \n\tpath TEXT NOT NULL, \n\t"
        "rank BIGINT NOT NULL, \n\tPRIMARY KEY (id)\n)",
        "CREATE INDEX ix_fine_tuning_checkpoints_job_id ON fine_tuning_checkpoints (job_id)",
    ],
}
MIGRATIONS_TABLE = ("CREATE TABLE IF NOT EXISTS _migrations "
                    "(version INTEGER PRIMARY KEY, name VARCHAR(255) NOT NULL)")

# Rows an old install holds, by the version that created their table, as it wrote them.
OLD_ROWS = {
    1: [
        "INSERT INTO files VALUES ('file-old', 9, 1700000000, NULL, 'in.jsonl', 'batch', "
        "1700000000000000000)",
        "INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, metadata, "
        "total, completed, failed, input_tokens, cached_tokens, output_tokens, created_at, "
        "in_progress_at, expires_at, rank) VALUES ('batch_old', '/v1/completions', 'file-old', "
        "'24h', 'in_progress', '{\"k\": \"v\"}', 2, 1, 0, 10, 4, 5, 1700000000, 1700000001, "
        "1700086400, 1700000000000000001)",
        "INSERT INTO batch_results VALUES ('batch_old', 0, 'a', 1, '{\"x\": 1}')",
    ],
    2: [
        "INSERT INTO fine_tuning_jobs (id, model, training_file, seed, status, hyperparameters, "
        "created_at, rank) VALUES ('ftjob-old', 'base', 'file-old', 42, 'running', "
        "'{\"n_epochs\": 2}', 1700000000, 1700000000000000002)",
        "INSERT INTO fine_tuning_events VALUES ('ftevent-old', 'ftjob-old', 1700000000, 'info', "
        "'Fine-tuning job started', 'message', NULL, 1700000000000000003)",
        "INSERT INTO fine_tuning_checkpoints VALUES ('ftckpt-old', 'ftjob-old', 1700000000, 10, "
        "'{\"valid_loss\": 1.5}', '/x/10', 1700000000000000004)",
    ],
}


def build_old(home: Path, version: int, how: str) -> Path:
    """A database at ``version`` in ``home`` (as ``Store`` finds it), holding ``OLD_ROWS``:
    built with the frozen migrations 1..version (``how="frozen"``) or with the statements that
    lmforge ran before they were frozen (``how="pre-freeze"``)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "lmforge.db"
    if how == "frozen":
        db = sa.create_engine(f"sqlite:///{path}")
        _migrate_with(db, MIGRATIONS[:version])
        db.dispose()
    with sqlite3.connect(path) as conn:
        if how == "pre-freeze":
            conn.execute(MIGRATIONS_TABLE)
            for v, name, _ in MIGRATIONS[:version]:
                for statement in PRE_FREEZE_DDL[v]:
                    conn.execute(statement)
                conn.execute("INSERT INTO _migrations VALUES (?, ?)", (v, name))
        for v in range(1, version + 1):
            for statement in OLD_ROWS.get(v, []):
                conn.execute(statement)
    conn.close()
    return path


def _migrate_with(db: sa.Engine, entries: list) -> list[int]:
    saved = migrations.MIGRATIONS
    migrations.MIGRATIONS = entries
    try:
        return migrate(db)
    finally:
        migrations.MIGRATIONS = saved


def schema(path: Path) -> dict[str, tuple]:
    """Every table and index of the SQLite file: (type, table, its statement with whitespace
    collapsed, ``PRAGMA table_info`` or ``index_info`` rows)."""
    with sqlite3.connect(path) as conn:
        objects = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
        result = {}
        for kind, name, table, sql in objects:
            pragma = "table_info" if kind == "table" else "index_info"
            result[name] = (kind, table, " ".join(sql.split()) if sql else None,
                            conn.execute(f"PRAGMA {pragma}({name})").fetchall())
    conn.close()
    return result


def columns(path: Path) -> dict[str, tuple]:
    """The tables' columns and indexes only (what ALTER TABLE and create_all agree on)."""
    return {name: (kind, table, info) for name, (kind, table, _, info) in schema(path).items()
            if name != "_migrations"}


def rows(path: Path) -> dict[str, list[tuple]]:
    with sqlite3.connect(path) as conn:
        tables = [t for (t,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name != '_migrations'")]
        result = {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall()) for t in tables}
    conn.close()
    return result


def recorded(store: Store) -> list[tuple[int, str]]:
    with store.db.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(
            "SELECT version, name FROM _migrations ORDER BY version"))]


def fresh(home: Path) -> Path:
    Store(home=home).close()
    return home / "lmforge.db"


def test_migrations_apply_once_and_are_recorded(tmp_path, monkeypatch):
    first = Store(home=tmp_path)
    assert recorded(first) == [(v, name) for v, name, _ in MIGRATIONS]
    assert sa.inspect(first.db).has_table("files")
    assert migrate(first.db) == []  # nothing left to apply
    first.close()
    calls = []
    monkeypatch.setattr(migrations, "MIGRATIONS", [
        *MIGRATIONS, (LATEST + 1, "a test column", lambda conn: calls.append(conn.execute(
            sa.text("ALTER TABLE files ADD COLUMN note VARCHAR(8)"))))])
    second = Store(home=tmp_path)  # the same home: only the new entry runs
    assert len(calls) == 1 and recorded(second)[-1][1] == "a test column"
    second.close()
    third = Store(home=tmp_path)
    assert migrate(third.db) == [] and len(calls) == 1
    third.close()


def test_a_fresh_database_has_the_schema_the_tables_describe(tmp_path):
    described = tmp_path / "described.db"
    db = sa.create_engine(f"sqlite:///{described}")
    METADATA.create_all(db)
    db.dispose()
    assert columns(fresh(tmp_path / "home")) == columns(described)


@pytest.mark.parametrize("version, how", [
    (v, how) for v, _, _ in MIGRATIONS for how in ("frozen", "pre-freeze")
    if how == "frozen" or v in PRE_FREEZE_DDL])
def test_an_old_database_upgrades_to_the_fresh_schema_and_keeps_its_rows(tmp_path, version, how):
    path = build_old(tmp_path / "old", version, how)
    before = rows(path)
    store = Store(home=tmp_path / "old")  # upgrades it
    assert recorded(store) == [(v, name) for v, name, _ in MIGRATIONS]
    assert schema(path) == schema(fresh(tmp_path / "fresh"))
    after = rows(path)
    # every old row, unchanged; the columns added since (the leases, migration 3) are NULL
    assert {t: [r[:len(before[t][0])] for r in after[t]] for t in before} == before
    assert {v for t in before for r in after[t] for v in r[len(before[t][0]):]} <= {None}
    assert store.get_file("file-old").filename == "in.jsonl"
    batch = BatchStore(store).get_batch("batch_old")
    assert (batch.status, batch.metadata, batch.completed, batch.cached_tokens) == (
        BatchStatus.IN_PROGRESS, {"k": "v"}, 1, 4)
    assert BatchStore(store).done_lines("batch_old") == {0}
    if version >= 2:
        jobs = FineTuningStore(store)
        assert jobs.get_job("ftjob-old").status is FineTuningStatus.RUNNING
        assert [e.message for e in jobs.list_events("ftjob-old")[0]] == [
            "Fine-tuning job started"]
        assert [c.step_number for c in jobs.list_checkpoints("ftjob-old")[0]] == [10]
    store.close()


@pytest.mark.parametrize("version", sorted(PRE_FREEZE_DDL))
def test_the_frozen_ddl_is_what_lmforge_ran_before_it_was_frozen(tmp_path, version):
    assert schema(build_old(tmp_path / "frozen", version, "frozen")) == schema(
        build_old(tmp_path / "pre", version, "pre-freeze"))


def test_an_added_column_migration_runs_on_fresh_and_old_databases(tmp_path, monkeypatch):
    """The latent bug: had migration 1 built ``files`` from the current definitions, a fresh
    database would get ``note`` from it, and this ALTER TABLE would then fail."""
    monkeypatch.setattr(migrations, "MIGRATIONS", [
        *MIGRATIONS, (LATEST + 1, "files.note", ddl("ALTER TABLE files ADD COLUMN note "
                                                     "VARCHAR(8)"))])
    new = fresh(tmp_path / "fresh")
    assert "note" in [column[1] for column in schema(new)["files"][3]]
    old = build_old(tmp_path / "old", max(PRE_FREEZE_DDL), "pre-freeze")
    before = rows(old)
    Store(home=tmp_path / "old").close()
    assert schema(old) == schema(new)
    assert rows(old)["files"] == [row + (None,) for row in before["files"]]


def test_migrations_never_read_the_current_tables():
    """Each migration states its DDL; none imports the package's table definitions."""
    source = Path(migrations.__file__).read_text(encoding="utf-8")
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not [name for name in imported if name.startswith("lmforge")], imported
