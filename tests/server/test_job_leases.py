"""Two real ``lmforge serve`` processes on one jobs store (``jobs/lease.py``): one PostgreSQL
database (``LMFORGE_TEST_DATABASE_URL``; ``.ci/run`` starts one with ``scripts/postgres.sh``) or
one SQLite file, and one ``LMFORGE_HOME`` for the file bytes. A batch is created through one;
whichever server holds its lease is killed with SIGKILL mid-batch; the other takes it over only
once the lease has expired, and completes it with every ``custom_id`` exactly once."""

from __future__ import annotations

import os
import time

import pytest
import sqlalchemy as sa
from support.batching import ServerProcess, line, results, upload, wait_status

POSTGRES_URL = os.environ.get("LMFORGE_TEST_DATABASE_URL")
LEASE_S = 3.0  # --job-lease-s: renewed every 1 s, so it lapses 2 to 3 s after a kill
SLOW = {"temperature": 0, "max_tokens": 48, "ignore_eos": True}
TABLES = ("fine_tuning_checkpoints", "fine_tuning_events", "fine_tuning_jobs", "batch_results",
          "batches", "files", "_migrations")


@pytest.fixture(params=[pytest.param("postgresql", marks=pytest.mark.skipif(
    not POSTGRES_URL, reason="set LMFORGE_TEST_DATABASE_URL to a PostgreSQL database (e.g. "
    "eval \"$(scripts/postgres.sh start)\") to run two servers on one database")),
    # the same processes on one SQLite file: run where no PostgreSQL is (its 25 s would push
    # CI, which has one, past its time budget)
    pytest.param("sqlite", marks=pytest.mark.skipif(
        bool(POSTGRES_URL), reason="ran on PostgreSQL; unset LMFORGE_TEST_DATABASE_URL to run "
        "two servers on one SQLite file"))])
def database(request, tmp_path):
    """(the ``--database-url`` arguments, a SQLAlchemy engine on that store), empty at start
    and dropped after (the PostgreSQL database is shared with tests/jobs)."""
    if request.param == "sqlite":
        (tmp_path / "home").mkdir()
        yield [], sa.create_engine(f"sqlite:///{tmp_path / 'home' / 'lmforge.db'}")
        return
    db = sa.create_engine(POSTGRES_URL)
    drop(db)
    yield ["--database-url", POSTGRES_URL], db
    drop(db)
    db.dispose()


def drop(db: sa.Engine) -> None:
    with db.begin() as conn:
        for table in TABLES:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))


def lease_owner(db: sa.Engine, batch_id: str) -> str | None:
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT lease_owner FROM batches WHERE id = :id"),
                            {"id": batch_id}).scalar()


def wait_for_owner(db: sa.Engine, batch_id: str, servers: list[ServerProcess]) -> int:
    """The index in ``servers`` of the server whose worker holds the batch's lease (owner ids
    are ``host:pid:random``)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        owner = lease_owner(db, batch_id)
        pids = [s.proc.pid for s in servers]
        if owner is not None and int(owner.split(":")[1]) in pids:
            return pids.index(int(owner.split(":")[1]))
        time.sleep(0.05)
    raise AssertionError(f"no server holds batch {batch_id}'s lease: {owner}")


def test_a_killed_servers_batch_is_taken_over_after_its_lease_expires(
        tiny_llama_dir, tmp_path, database):
    urls, db = database
    args = [*urls, "--job-lease-s", str(LEASE_S), "--batch-concurrency", "2", "--no-fine-tuning"]
    servers = [ServerProcess(tiny_llama_dir, tmp_path / "home", *args) for _ in range(2)]
    ids = [f"r{i}" for i in range(10)]
    try:
        clients = [s.start() for s in servers]  # one after the other: each migrates at start
        lines = [line(i, {"model": "tiny", "messages": [{"role": "user", "content": f"story {i}"}],
                          **SLOW}) for i in ids]
        batch = clients[0].batches.create(input_file_id=upload(clients[0], lines, tmp_path),
                                          endpoint="/v1/chat/completions",
                                          completion_window="24h")
        while (before := clients[0].batches.retrieve(batch.id)).request_counts.completed < 3:
            assert before.status in ("validating", "in_progress"), before.status
            time.sleep(0.05)
        holder = wait_for_owner(db, batch.id, servers)  # the runner's (no longer the intake's)
        survivor = clients[1 - holder]
        dead_owner = lease_owner(db, batch.id)
        servers[holder].kill()
        killed_at = time.monotonic()
        at_kill = survivor.batches.retrieve(batch.id).request_counts.completed
        assert at_kill < len(ids), "finished before the kill; slow it down"
        while survivor.batches.retrieve(batch.id).request_counts.completed == at_kill:
            assert time.monotonic() - killed_at < 60, "nobody took the batch over"
            time.sleep(0.05)
        # the last renewal was at most LEASE_S / 3 before the kill: no line ran before expiry
        assert time.monotonic() - killed_at >= LEASE_S * 2 / 3 - 0.1
        done = wait_status(survivor, batch.id, timeout_s=120)
        assert done.status == "completed"
        out, err = results(survivor, done)
        assert sorted(r["custom_id"] for r in out + err) == sorted(ids)  # each exactly once
        assert not err and all(r["response"]["status_code"] == 200 for r in out)
        counts = done.request_counts
        assert (counts.total, counts.completed, counts.failed) == (len(ids), len(ids), 0)
        log = "".join(servers[1 - holder].output)
        assert f"job {batch.id}: taking over from {dead_owner}, whose lease expired" in log
        assert f"batch {batch.id}: resuming" in log
        assert lease_owner(db, batch.id) is None  # released once completed
    finally:
        for server in servers:
            server.kill()
        db.dispose()
