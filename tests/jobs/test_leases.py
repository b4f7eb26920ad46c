"""Job leases (``jobs/lease.py``) on the ``store`` fixture (SQLite, and PostgreSQL when
``LMFORGE_TEST_DATABASE_URL`` names one): one owner at a time, renewal only by the owner, takeover
only after expiry (on the database's clock), exactly one winner among racing workers, and
``JobLeases.drive``'s heartbeat: renewed while it runs, the drive cancelled at once when the lease
is lost, released when it ends or is cancelled. The servers that use them: ``tests/server/
test_job_leases.py``."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
import sqlalchemy as sa

from lmforge.jobs.batch_store import BatchStore
from lmforge.jobs.fine_tuning_store import FineTuningStore
from lmforge.jobs.lease import JobLeases, new_owner
from lmforge.jobs.migrations import MIGRATIONS, migrate
from lmforge.jobs.schema import BATCHES, FINE_TUNING_JOBS
from lmforge.jobs.store import Store

POSTGRES_URL = os.environ.get("LMFORGE_TEST_DATABASE_URL")


def new_batch(store) -> str:
    return BatchStore(store).add_batch("/v1/completions", "file-x", "24h", 60, None).id


def new_job(store) -> str:
    return FineTuningStore(store).add_job("base", "file-x", None, None, 1, {}, None, None).id


@pytest.fixture(params=["batches", "fine_tuning_jobs"])
def job(request, store):
    """(table, a new job's id) of either kind."""
    if request.param == "batches":
        return BATCHES, new_batch(store)
    return FINE_TUNING_JOBS, new_job(store)


def set_owner(store, table, job_id: str, owner: str) -> None:
    """Another worker's lease, written straight to the row (a takeover elsewhere)."""
    with store.db.begin() as conn:
        conn.execute(table.update().where(table.c.id == job_id).values(lease_owner=owner))


def test_one_owner_at_a_time_renewed_and_released_only_by_it(store, job):
    table, job_id = job
    a, b = (JobLeases(store.db, table, ttl_s=30) for _ in range(2))
    assert a.owner != b.owner and a.holder(job_id)[0] is None  # a new job's lease is free
    lease = a.acquire(job_id)
    assert lease is not None and lease.held and lease.previous_owner is None
    owner, expires_ms, now_ms = a.holder(job_id)
    assert owner == a.owner and 29_000 <= expires_ms - now_ms <= 30_000  # the database's clock
    assert a.acquire(job_id) is None  # not re-entrant: a second drive here waits too
    assert b.acquire(job_id) is None and not b.renew(job_id) and not b.release(job_id)
    assert a.holder(job_id)[0] == a.owner
    assert a.renew(job_id) and a.release(job_id)
    assert a.holder(job_id)[:2] == (None, None) and not a.renew(job_id)
    assert b.acquire(job_id) is not None and b.holder(job_id)[0] == b.owner


def test_an_expired_lease_is_taken_over_and_its_old_owner_cannot_renew_it(store, job):
    table, job_id = job
    a, b = JobLeases(store.db, table, ttl_s=0.4), JobLeases(store.db, table, ttl_s=0.4)
    lease = a.acquire(job_id)
    assert b.acquire(job_id) is None
    time.sleep(0.5)
    assert not lease.held  # a's own clock says so too, without asking the store
    taken = b.acquire(job_id)
    assert taken is not None and taken.previous_owner == a.owner
    assert not a.renew(job_id) and not a.release(job_id)  # a lost it; b's lease stays
    assert b.holder(job_id)[0] == b.owner and b.renew(job_id)


def test_of_racing_workers_exactly_one_acquires(store, job):
    table, job_id = job
    workers = [JobLeases(store.db, table, ttl_s=30) for _ in range(8)]
    barrier = threading.Barrier(len(workers))
    won = []

    def race(leases: JobLeases) -> None:
        barrier.wait()
        if leases.acquire(job_id) is not None:
            won.append(leases.owner)

    for _ in range(3):  # a free lease, then an expired one, twice
        won.clear()
        threads = [threading.Thread(target=race, args=(w,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and workers[0].holder(job_id)[0] == won[0]
        with store.db.begin() as conn:  # expire it: the next round takes it over
            conn.execute(table.update().where(table.c.id == job_id).values(lease_expires_ms=0))


def test_leases_are_per_job_and_the_lease_columns_stay_off_the_records(store):
    a, b = JobLeases(store.db, BATCHES), JobLeases(store.db, BATCHES)
    first, second = new_batch(store), new_batch(store)
    assert a.acquire(first) and b.acquire(second)
    record = BatchStore(store).get_batch(first)
    assert not [k for k in vars(record) if k.startswith("lease")]
    with pytest.raises(KeyError):
        a.holder("batch_missing")
    with pytest.raises(ValueError, match="must be > 0"):
        JobLeases(store.db, BATCHES, ttl_s=0)
    assert new_owner().count(":") == 2


def test_drive_renews_while_it_runs_and_releases_after(store, job):
    table, job_id = job
    leases, other = JobLeases(store.db, table, ttl_s=0.6), JobLeases(store.db, table, ttl_s=0.6)
    seen = []

    async def drive(lease):
        for _ in range(6):  # 1.2 s: twice the ttl, so it lasts only if it is renewed
            await asyncio.sleep(0.2)
            seen.append((lease.held, other.acquire(job_id)))
        return "done"

    assert asyncio.run(leases.drive(job_id, drive))
    assert seen == [(True, None)] * 6  # never lapsed, never taken
    assert leases.holder(job_id)[:2] == (None, None)  # released


def test_drive_skips_a_job_leased_elsewhere(store, job):
    table, job_id = job
    JobLeases(store.db, table).acquire(job_id)
    ran = []

    async def drive(lease):
        ran.append(lease)

    assert not asyncio.run(JobLeases(store.db, table).drive(job_id, drive)) and not ran


def test_a_lost_lease_cancels_the_drive_at_once(store, job):
    table, job_id = job
    leases = JobLeases(store.db, table, ttl_s=0.6)
    got = {}

    async def drive(lease):
        got["lease"] = lease
        got["started"] = time.monotonic()
        set_owner(store, table, job_id, "elsewhere:1:x")  # it expired and was taken over
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            got["cancelled"] = time.monotonic()
            raise

    assert asyncio.run(leases.drive(job_id, drive))
    assert got["lease"].lost and not got["lease"].held
    assert got["cancelled"] - got["started"] < 0.6  # at the first renewal, every ttl / 3
    assert leases.holder(job_id)[0] == "elsewhere:1:x"  # not released: it is not ours


def test_an_unreachable_store_stops_the_drive_within_a_ttl(store, job, monkeypatch):
    table, job_id = job
    leases = JobLeases(store.db, table, ttl_s=0.6)
    got = []

    def down(job_id):
        raise sa.exc.OperationalError("UPDATE", {}, Exception("connection refused"))

    async def drive(lease):
        monkeypatch.setattr(leases, "renew", down)
        started = time.monotonic()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            got.append(time.monotonic() - started)
            raise

    assert asyncio.run(leases.drive(job_id, drive))
    assert 0.5 <= got[0] < 1.2  # the renewals failed; it stopped once the ttl had passed


def test_a_drive_cancelled_from_outside_releases_the_lease(store, job):
    """The worker stops (its task is cancelled): the lease is free for another server at once."""
    table, job_id = job
    leases = JobLeases(store.db, table, ttl_s=30)
    state = []

    async def drive(lease):
        state.append("running")
        try:
            await asyncio.sleep(30)
        finally:
            state.append("stopped")

    async def main():
        task = asyncio.ensure_future(leases.drive(job_id, drive))
        while not state:
            await asyncio.sleep(0.01)
        assert leases.holder(job_id)[0] == leases.owner
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert state == ["running", "stopped"] and leases.holder(job_id)[0] is None


def test_an_error_of_the_drive_propagates_and_releases(store, job):
    table, job_id = job
    leases = JobLeases(store.db, table)

    async def drive(lease):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(leases.drive(job_id, drive))
    assert leases.holder(job_id)[0] is None


@pytest.mark.skipif(not POSTGRES_URL, reason="set LMFORGE_TEST_DATABASE_URL to test servers "
                    "starting together on one PostgreSQL database")
def test_servers_starting_together_migrate_one_at_a_time(tmp_path):
    """Without migrate's advisory lock, the second ALTER TABLE of migration 3 would fail."""
    db = sa.create_engine(POSTGRES_URL)
    drop_all(db)
    barrier, errors = threading.Barrier(4), []

    def start() -> None:
        barrier.wait()
        try:
            migrate(db)
        except sa.exc.SQLAlchemyError as e:
            errors.append(e)

    try:
        threads = [threading.Thread(target=start) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        store = Store(POSTGRES_URL, home=tmp_path)
        with store.db.connect() as conn:
            versions = [v for (v,) in conn.execute(sa.text("SELECT version FROM _migrations"))]
        assert sorted(versions) == [v for v, _, _ in MIGRATIONS]
        assert JobLeases(store.db, BATCHES).acquire(new_batch(store)) is not None
        store.close()
    finally:
        drop_all(db)
        db.dispose()


def drop_all(db: sa.Engine) -> None:
    with db.begin() as conn:
        for table in ("fine_tuning_checkpoints", "fine_tuning_events", "fine_tuning_jobs",
                      "batch_results", "batches", "files", "_migrations"):
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
