"""The batch worker: drives every unfinished batch through its statuses, durably.

::

    validating -> in_progress -> finalizing -> completed      (``statuses.BatchStatus``)
        |              |  \\--> expired     (window passed: unrun lines reported batch_expired)
        v              v
      failed       cancelling -> cancelled  (unrun lines reported batch_cancelled)

One batch runs at a time, oldest first, with up to ``concurrency`` of its lines in flight. A
second loop (``BatchWorker.intake_all``) runs beside it, so a batch created meanwhile is
validated at once (``failed`` with its errors, or ``in_progress`` with its ``total`` known,
waiting for its turn), and one cancelled while it waits is ``cancelled`` at once.

Each line is an HTTP request to the serving app itself, in-process (``in_process_client``),
marked in the ASGI scope with the batch priority, so the engine serves online requests first. A
finished line is committed at once (``BatchStore.add_result``); after a crash or a restart the
worker finds the batch still ``in_progress`` and runs exactly the lines without a result, so
every ``custom_id`` ends up once in the output or error file; each such resume is logged (a
warning) with the lines already done. Output files get ids derived from the batch id, so
finalizing twice (a crash between writing them and the status change) replaces, never doubles.

Several servers may share one store: a batch is validated, run or closed only by the worker
holding its lease (``jobs/lease.py``), so each server runs a different batch, and a batch whose
server died (its lease expired) is taken over by another and resumed as after a restart.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from lmforge.engine.request import BATCH_PRIORITY
from lmforge.jobs.batch_lines import (
    BatchLine,
    LineResult,
    jsonl,
    parse_input,
    run_line,
    unrun_result,
)
from lmforge.jobs.batch_store import BatchRecord, BatchStore
from lmforge.jobs.lease import DEFAULT_TTL_S, JobLeases, Lease
from lmforge.jobs.schema import BATCHES
from lmforge.jobs.store import Store
from lmforge.jobs.worker import PollingWorker, in_process_client
from lmforge.protocol.statuses import BatchStatus

logger = logging.getLogger(__name__)

OUTPUT_PURPOSE = "batch_output"


class BatchWorker(PollingWorker):
    """Runs batches in the server's event loop (started and stopped by the app's lifespan);
    its ``intake`` loop validates new ones and closes cancelled waiting ones meanwhile.

    Args:
        store: the jobs store.
        app: the serving ASGI app (lines are posted to it in-process).
        model_names: the models the server serves now (batch lines must name one).
        concurrency: lines in flight at once.
        poll_s: how often a running batch checks for cancel and expiry, and an idle worker for
            new batches (``wake()`` cuts the idle wait short).
        lease_s: the ttl of its batch leases (seconds): how long after this server dies
            another one takes over its batch.
    """

    def __init__(self, store: Store, app: Any, model_names: Callable[[], set[str]],
                 concurrency: int = 8, poll_s: float = 0.5, lease_s: float = DEFAULT_TTL_S):
        super().__init__(poll_s)
        self.store, self.batches = store, BatchStore(store)
        self.leases = JobLeases(store.db, BATCHES, lease_s)
        self.app, self.model_names = app, model_names
        self.concurrency = concurrency
        self.intake = _Intake(self, poll_s)
        self.validated: dict[str, list[BatchLine]] = {}  # batch id -> its lines, until run
        self.running: str | None = None  # the batch whose lines run now
        self._closing = asyncio.Lock()  # one _close at a time (the runner's or the intake's)
        self._interrupted: set[str] | None = None  # batches a stop left unfinished

    def start(self) -> None:
        super().start()
        self.intake.start()

    def wake(self) -> None:
        super().wake()
        self.intake.wake()

    async def stop(self) -> None:
        await self.intake.stop()
        await super().stop()

    async def intake_all(self) -> None:
        """What happens to batches before their turn, whatever batch runs meanwhile: a new
        batch is validated at once (``failed`` with its errors, or ``in_progress`` with
        ``total`` and ``model`` set, its lines kept for the run), and one cancelled while it
        waits is closed at once (``cancelled``, every line reported ``batch_cancelled``).
        Each under the batch's lease: a batch another server validates or runs is skipped."""
        for batch in await asyncio.to_thread(self.batches.unfinished_batches):
            if batch.status is BatchStatus.VALIDATING:
                await self.leases.drive(batch.id, functools.partial(self._validate, batch.id))
            elif batch.status is BatchStatus.CANCELLING and batch.id != self.running:
                await self.leases.drive(batch.id, functools.partial(self._close_cancelled,
                                                                    batch.id))

    async def _close_cancelled(self, batch_id: str, lease: Lease) -> None:
        batch = await self._get(batch_id)  # as it is now that the lease is ours
        await self._close(batch, await self._lines(batch) or [], "batch_cancelled",
                          BatchStatus.CANCELLED)

    async def _validate(self, batch_id: str, lease: Lease) -> None:
        """Validate a new batch; each outcome is one conditional update (``transition``), so a
        batch is validated once even if two servers race to."""
        batch = await self._get(batch_id)
        if batch.status is not BatchStatus.VALIDATING:  # another server validated it meanwhile
            return
        names = self.model_names()
        parsed = await read_lines(self.batches, batch, names)
        if parsed is None:
            return
        lines, errors = parsed
        if errors:
            if await self._transition(batch, BatchStatus.FAILED, errors=errors):
                logger.info("batch %s: failed validation (%d errors)", batch.id, len(errors))
            return
        default = next(iter(names)) if len(names) == 1 else None  # lines may omit the model
        self.validated[batch.id] = lines
        if not await self._transition(batch, BatchStatus.IN_PROGRESS, total=len(lines),
                                      model=lines[0].body.get("model") or default):
            self.validated.pop(batch.id, None)  # cancelled meanwhile

    async def drive_all(self) -> None:
        batches = await asyncio.to_thread(self.batches.unfinished_batches)
        if self._interrupted is None:  # the first pass: what a stop or crash interrupted
            self._interrupted = {b.id for b in batches if b.status is not BatchStatus.VALIDATING}
        unfinished = {b.id for b in batches}  # forget the lines of batches run elsewhere
        self.validated = {k: v for k, v in self.validated.items() if k in unfinished}
        for batch in batches:
            if batch.status is not BatchStatus.VALIDATING:  # the intake's
                self.running = batch.id
                try:  # skipped while another server (or this one's intake) holds its lease
                    await self.leases.drive(batch.id, functools.partial(self._drive, batch.id))
                finally:
                    self.running = None

    async def _drive(self, batch_id: str, lease: Lease) -> None:
        """Advance one validated batch as far as it goes now (to a final status, normally)."""
        batch = await self._get(batch_id)  # as it is now that the lease is ours
        if batch.status.is_final():  # another server finished it meanwhile
            return
        interrupted = self._interrupted if self._interrupted is not None else set()
        if batch_id in interrupted or lease.previous_owner:  # a restart, or a takeover
            interrupted.discard(batch_id)
            await self._log_resume(batch)
        if batch.status is BatchStatus.CANCELLING:
            await self._close(batch, await self._lines(batch) or [], "batch_cancelled",
                              BatchStatus.CANCELLED)
        elif batch.status is BatchStatus.IN_PROGRESS:
            lines = await self._lines(batch)
            if lines is not None:  # None: the input file vanished; the batch is failed
                await self._run_lines(batch, lines)
        elif batch.status is BatchStatus.FINALIZING:
            await self._write_outputs(batch)
            await self._transition(batch, BatchStatus.COMPLETED)

    async def _log_resume(self, batch: BatchRecord) -> None:
        done = len(await asyncio.to_thread(self.batches.done_lines, batch.id))
        logger.warning("batch %s: resuming after the server stopped while it was %s; %d of %d "
                       "lines already have a result, the others run now", batch.id,
                       batch.status, done, batch.total)

    async def _lines(self, batch: BatchRecord) -> list[BatchLine] | None:
        """A validated batch's lines (read again from its input file: lines are not stored),
        or None when its input file is gone (the batch is then failed)."""
        lines = self.validated.pop(batch.id, None)
        if lines is not None:
            return lines
        parsed = await read_lines(self.batches, batch, self.model_names())
        return None if parsed is None else parsed[0]

    async def _run_lines(self, batch: BatchRecord, lines: list[BatchLine]) -> None:
        done = await asyncio.to_thread(self.batches.done_lines, batch.id)
        pending = iter([line for line in lines if line.index not in done])
        in_flight: dict[asyncio.Future, BatchLine] = {}
        stop = await self._stop_reason(batch)
        async with in_process_client(self.app, BATCH_PRIORITY) as client:
            try:
                while stop is None:
                    for line in itertools.islice(pending, self.concurrency - len(in_flight)):
                        in_flight[asyncio.ensure_future(
                            run_line(client, line))] = line
                    if not in_flight:
                        break
                    finished, _ = await asyncio.wait(in_flight, timeout=self.poll_s,
                                                     return_when=asyncio.FIRST_COMPLETED)
                    for task in finished:
                        await self._record(batch, in_flight.pop(task), task.result())
                    stop = await self._stop_reason(batch)
            finally:  # cancelled, expired, or the worker stops: abort what is still running
                for task in in_flight:
                    task.cancel()
                await asyncio.gather(*in_flight, return_exceptions=True)
        if stop is BatchStatus.CANCELLING:
            await self._close(await self._get(batch.id), lines, "batch_cancelled",
                              BatchStatus.CANCELLED)
        elif stop is BatchStatus.EXPIRED:
            await self._close(batch, lines, "batch_expired", BatchStatus.EXPIRED)
        elif await self._transition(batch, BatchStatus.FINALIZING):
            await self._write_outputs(batch)
            await self._transition(batch, BatchStatus.COMPLETED)

    async def _stop_reason(self, batch: BatchRecord) -> BatchStatus | None:
        """CANCELLING if the batch was cancelled, EXPIRED if its window passed, else None."""
        current = await self._get(batch.id)
        if current.status is BatchStatus.CANCELLING:
            return BatchStatus.CANCELLING
        if current.expires_at is not None and time.time() >= current.expires_at:
            return BatchStatus.EXPIRED
        return None

    async def _close(self, batch: BatchRecord, lines: list[BatchLine], code: str,
                     status: BatchStatus) -> None:
        """End a batch early: each line without a result gets the ``code`` error record, the
        files are written, and the batch moves to ``status`` (cancelled or expired)."""
        async with self._closing:
            if (await self._get(batch.id)).status in (BatchStatus.CANCELLING,
                                                      BatchStatus.IN_PROGRESS):
                await self._close_now(batch, lines, code, status)

    async def _close_now(self, batch: BatchRecord, lines: list[BatchLine], code: str,
                         status: BatchStatus) -> None:
        if batch.total == 0:  # cancelled while validating
            await asyncio.to_thread(self.batches.set_batch, batch.id, total=len(lines))
        done = await asyncio.to_thread(self.batches.done_lines, batch.id)
        for line in lines:
            if line.index not in done:
                await self._record(batch, line, unrun_result(line, code))
        await self._write_outputs(batch)
        await self._transition(batch, status)

    async def _record(self, batch: BatchRecord, line: BatchLine, result: LineResult) -> None:
        await asyncio.to_thread(self.batches.add_result, batch.id, line.index, line.custom_id,
                                result.ok, result.record, result.usage)

    async def _write_outputs(self, batch: BatchRecord) -> None:
        """The output file (successes) and error file (failures), in input order; their ids are
        set on the batch. Files with no lines are not created (their id stays null)."""
        results = await asyncio.to_thread(lambda: list(self.batches.results(batch.id)))
        expires_at = (int(time.time()) + batch.output_expires_s
                      if batch.output_expires_s is not None else None)
        ids: dict[str, str | None] = {}
        for kind, ok in (("output", True), ("error", False)):
            records = [record for _, good, record in results if good == ok]
            file_id = f"file-{batch.id.removeprefix('batch_')}-{kind}"
            if records:
                await asyncio.to_thread(self.store.add_file, jsonl(records),
                                        f"{batch.id}_{kind}.jsonl", OUTPUT_PURPOSE, expires_at,
                                        file_id)
            ids[f"{kind}_file_id"] = file_id if records else None
        await asyncio.to_thread(self.batches.set_batch, batch.id, **ids)

    async def _transition(self, batch: BatchRecord, status: BatchStatus, **values: Any) -> bool:
        moved = await asyncio.to_thread(self.batches.transition, batch.id, status, **values)
        if moved:
            logger.info("batch %s: %s", batch.id, status)
        return moved

    async def _get(self, batch_id: str) -> BatchRecord:
        batch = await asyncio.to_thread(self.batches.get_batch, batch_id)
        assert batch is not None, batch_id  # batches are never deleted
        return batch


class _Intake(PollingWorker):
    """The second loop of a ``BatchWorker``: its ``intake_all`` on every wake and poll."""

    def __init__(self, worker: BatchWorker, poll_s: float):
        super().__init__(poll_s)
        self.worker = worker

    async def drive_all(self) -> None:
        await self.worker.intake_all()


async def read_lines(batches: BatchStore, batch: BatchRecord, model_names: set[str]
                     ) -> tuple[list[BatchLine], list[dict[str, Any]]] | None:
    """(valid lines, errors) of a batch's input file (``parse_input``), or None when the file
    is gone, in which case a batch still running is moved to ``failed``."""
    try:
        data = await asyncio.to_thread(batches.store.path(batch.input_file_id).read_bytes)
    except FileNotFoundError:
        await asyncio.to_thread(batches.transition, batch.id, BatchStatus.FAILED, errors=[{
            "code": "input_file_missing", "line": None, "param": "input_file_id",
            "message": f"the input file {batch.input_file_id} was deleted"}])
        return None
    return await asyncio.to_thread(parse_input, data, batch.endpoint, model_names)
