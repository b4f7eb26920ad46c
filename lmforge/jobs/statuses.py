"""Which status of a batch or fine-tuning job may follow which, and which are unfinished.

The statuses themselves are the wire's (``protocol/statuses.py``): they are stored as they are in
the ``status`` columns and sent as they are in the JSON objects.

A status only moves forward: the stores move a row to a status only from one listed in
``BATCH_FROM`` / ``FINE_TUNING_FROM`` (a conditional update), so two writers racing cannot send a
finished batch or job back.
"""

from __future__ import annotations

from lmforge.protocol.statuses import BatchStatus, FineTuningStatus

# The statuses a worker still has to drive (also those a crash interrupted).
UNFINISHED_BATCHES = tuple(s for s in BatchStatus if not s.is_final())
UNFINISHED_FINE_TUNES = tuple(s for s in FineTuningStatus if not s.is_final())

# status -> the statuses it may follow
BATCH_FROM: dict[BatchStatus, tuple[BatchStatus, ...]] = {
    BatchStatus.IN_PROGRESS: (BatchStatus.VALIDATING,),
    BatchStatus.FINALIZING: (BatchStatus.IN_PROGRESS,),
    BatchStatus.COMPLETED: (BatchStatus.FINALIZING,),
    # from in_progress: its input file was deleted before it ran
    BatchStatus.FAILED: (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS),
    BatchStatus.EXPIRED: (BatchStatus.IN_PROGRESS,),
    BatchStatus.CANCELLING: (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS),
    BatchStatus.CANCELLED: (BatchStatus.CANCELLING,),
}
FINE_TUNING_FROM: dict[FineTuningStatus, tuple[FineTuningStatus, ...]] = {
    FineTuningStatus.QUEUED: (FineTuningStatus.VALIDATING_FILES,),
    FineTuningStatus.RUNNING: (FineTuningStatus.QUEUED,),
    FineTuningStatus.SUCCEEDED: (FineTuningStatus.RUNNING,),
    FineTuningStatus.FAILED: UNFINISHED_FINE_TUNES,
    FineTuningStatus.CANCELLED: UNFINISHED_FINE_TUNES,
}
