"""Job leases: which worker drives a batch or a fine-tuning job when several servers share one
jobs store (``lmforge serve --database-url``, or one SQLite file under one ``LMFORGE_HOME``).

A lease is three columns of the job's row (migration 3): ``lease_owner`` (the holding worker,
``host:pid:random``), ``lease_heartbeat_ms`` (its last renewal) and ``lease_expires_ms`` (when
it lapses unless renewed), in milliseconds of the *database's* clock, so that servers on hosts
whose clocks differ still agree on when a lease has expired. Each step is one statement::

    acquire: UPDATE t SET owner = me, expires = now + ttl
             WHERE id = :id AND (owner IS NULL OR expires < now)    -- rowcount 1: ours
    renew:   UPDATE t SET expires = now + ttl WHERE id = :id AND owner = me  -- 0: taken over
    release: UPDATE t SET owner = NULL ... WHERE id = :id AND owner = me

Of two workers racing to acquire, exactly one sees rowcount 1: SQLite runs one writer at a time,
and PostgreSQL (READ COMMITTED) makes the second UPDATE wait for the first to commit and then
evaluates its WHERE again on the row the first wrote, which no longer matches.

``JobLeases.drive`` puts them together, as Kubernetes' leader-election leases do: it runs a
job's drive only while it holds the job's lease, renews it every ``ttl_s / 3`` seconds, and
cancels the drive at once when a renewal finds another owner (or when none succeeded for a whole
``ttl_s``: the store is unreachable, so another worker may have taken over). It releases the
lease when the drive ends or the worker stops, so another server can go on at once. When the
owner dies (``kill -9``) its lease expires ``ttl_s`` after its last renewal; another worker then
acquires it and resumes the job as a restart would.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 15.0  # ServerConfig.job_lease_s's default; a lease is renewed every ttl / 3


def new_owner() -> str:
    """A worker id unique across hosts and processes: ``<hostname>:<pid>:<8 hex digits>``."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def db_now_ms(dialect: str) -> Any:
    """The database's clock in unix milliseconds, as an SQL expression (BIGINT). Dialects other
    than SQLite and PostgreSQL get this process's clock, as a bound value."""
    if dialect == "postgresql":
        return sa.literal_column(
            "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)", sa.BigInteger)
    if dialect == "sqlite":  # julianday('now') has millisecond precision; 2440587.5 = 1970-01-01
        return sa.literal_column(
            "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)", sa.BigInteger)
    return sa.literal(int(time.time() * 1000), sa.BigInteger)


class Lease:
    """A lease this worker holds on one job, as its drive sees it.

    ``held`` is what a drive checks before it goes on (from any thread: the fine-tuning worker's
    training thread reads it at every step). It turns False once a renewal found another owner
    (``lost``), or when no renewal succeeded for ``ttl_s`` (by this process's monotonic clock,
    counted from before the last successful statement was sent, so never later than the
    database's expiry).
    """

    def __init__(self, job_id: str, ttl_s: float, since: float, previous_owner: str | None):
        self.job_id = job_id
        self.ttl_s = ttl_s
        self.previous_owner = previous_owner  # whose expired lease this took over (None: free)
        self.lost = False
        self._renewed = since  # time.monotonic() before the last successful acquire/renew

    @property
    def held(self) -> bool:
        return not self.lost and time.monotonic() - self._renewed < self.ttl_s


class JobLeases:
    """Leases on the rows of one job table (``schema.BATCHES`` or ``schema.FINE_TUNING_JOBS``).

    Args:
        db: the jobs store's database (``Store.db``).
        table: the job table; it has ``id`` and the three lease columns.
        ttl_s: how long a lease lasts after its last renewal (seconds, > 0).
        owner: this worker's id; None = ``new_owner()``.
    """

    def __init__(self, db: Engine, table: sa.Table, ttl_s: float = DEFAULT_TTL_S,
                 owner: str | None = None):
        if ttl_s <= 0:
            raise ValueError(f"the job lease ttl must be > 0 seconds, got {ttl_s}")
        self.db, self.table, self.ttl_s = db, table, ttl_s
        self.owner = owner or new_owner()
        self.heartbeat_s = ttl_s / 3  # two renewals may fail before the lease lapses

    def holder(self, job_id: str) -> tuple[str | None, int | None, int]:
        """``(owner, expires_ms, now_ms)`` of the job's lease on the database's clock (owner
        None: free). Raises KeyError when there is no such job."""
        c = self.table.c
        now = db_now_ms(self.db.dialect.name)
        with self.db.connect() as conn:
            row = conn.execute(sa.select(c.lease_owner, c.lease_expires_ms, now).where(
                c.id == job_id)).first()
        if row is None:
            raise KeyError(job_id)
        return row[0], row[1], row[2]

    def acquire(self, job_id: str) -> Lease | None:
        """Take the job's lease if it is free or expired (one conditional UPDATE); None when
        another worker holds it (or the job is gone). A held lease is read first, so that
        polling a busy job takes no write lock."""
        owner, expires_ms, now_ms = self.holder(job_id)
        if owner is not None and expires_ms is not None and expires_ms >= now_ms:
            return None
        since = time.monotonic()
        c, now = self.table.c, db_now_ms(self.db.dialect.name)
        with self.db.begin() as conn:
            taken = conn.execute(self.table.update().where(
                c.id == job_id, sa.or_(c.lease_owner.is_(None), c.lease_expires_ms < now)
            ).values(lease_owner=self.owner, lease_heartbeat_ms=now,
                     lease_expires_ms=now + int(self.ttl_s * 1000))).rowcount
        if not taken:
            return None
        if owner is not None:
            logger.warning("job %s: taking over from %s, whose lease expired %.1f s ago",
                           job_id, owner, (now_ms - (expires_ms or now_ms)) / 1000)
        return Lease(job_id, self.ttl_s, since, owner)

    def renew(self, job_id: str) -> bool:
        """Extend this worker's lease by ``ttl_s`` from now; False when another worker owns it
        (it expired and was taken over) or it was released."""
        c, now = self.table.c, db_now_ms(self.db.dialect.name)
        with self.db.begin() as conn:
            return bool(conn.execute(self.table.update().where(
                c.id == job_id, c.lease_owner == self.owner).values(
                lease_heartbeat_ms=now, lease_expires_ms=now + int(self.ttl_s * 1000))
            ).rowcount)

    def release(self, job_id: str) -> bool:
        """Free this worker's lease; False when it was not this worker's (any more)."""
        c = self.table.c
        with self.db.begin() as conn:
            return bool(conn.execute(self.table.update().where(
                c.id == job_id, c.lease_owner == self.owner).values(
                lease_owner=None, lease_heartbeat_ms=None, lease_expires_ms=None)).rowcount)

    async def drive(self, job_id: str, drive: Callable[[Lease], Awaitable[Any]]) -> bool:
        """Run ``drive(lease)`` holding the job's lease, renewed every ``heartbeat_s``; cancel
        it at once when the lease is lost; release the lease when it ends, fails or this task
        is cancelled (the worker stops). Returns False, without running it, when another worker
        holds the lease. An exception of ``drive`` propagates."""
        lease = await asyncio.to_thread(self.acquire, job_id)
        if lease is None:
            return False
        task = asyncio.ensure_future(drive(lease))
        try:
            await self._heartbeat(lease, task)
            if not lease.lost:
                task.result()
        finally:
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if not lease.lost:
                await self._release(job_id)
        return True

    async def _heartbeat(self, lease: Lease, task: asyncio.Future) -> None:
        """Renew ``lease`` until ``task`` ends; mark it lost and cancel ``task`` when a renewal
        finds another owner, or when none succeeded for ``ttl_s`` (store errors are retried)."""
        while True:
            await asyncio.wait({task}, timeout=self.heartbeat_s)
            if task.done():
                return
            since = time.monotonic()
            try:
                renewed: bool | None = await asyncio.to_thread(self.renew, lease.job_id)
            except sa.exc.SQLAlchemyError as e:
                logger.warning("job %s: cannot renew the lease (%s); retrying", lease.job_id,
                               type(e).__name__)
                renewed = None
            if renewed:
                lease._renewed = since
            elif renewed is False or not lease.held:
                lease.lost = True
                logger.warning("job %s: lost the lease (another worker took it over, or the "
                               "store was unreachable for %g s); stopping it here",
                               lease.job_id, self.ttl_s)
                task.cancel()
                return

    async def _release(self, job_id: str) -> None:
        try:
            await asyncio.to_thread(self.release, job_id)
        except sa.exc.SQLAlchemyError as e:  # it then lapses after ttl_s
            logger.warning("job %s: cannot release the lease (%s)", job_id, type(e).__name__)
