"""The statuses of batches and fine-tuning jobs, and which status may follow which.

The values are OpenAI's (API reference, "Batch" and "Fine-tuning"): they are stored as they are
in the ``status`` columns and sent as they are in the JSON objects. Both enums mix in ``str``, so
a member equals its value (``BatchStatus.COMPLETED == "completed"``), serializes to it with
``json`` and pydantic, and prints as it (``f"{status}"`` gives ``completed``).

A status only moves forward: the stores move a row to a status only from one listed in
``BATCH_FROM`` / ``FINE_TUNING_FROM`` (a conditional update), so two writers racing cannot send a
finished batch or job back.
"""

from __future__ import annotations

from enum import Enum


class _Status(str, Enum):
    """A status that is its plain string: ``str()`` and f-strings give the value (as
    ``enum.StrEnum`` does, which Python 3.10 lacks), so messages read as before."""

    def __str__(self) -> str:
        return str(self.value)


class BatchStatus(_Status):
    """A batch's status::

        validating -> in_progress -> finalizing -> completed
            |              |  \\--> expired     (its completion window passed)
            v              v
          failed       cancelling -> cancelled
    """

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    def is_final(self) -> bool:
        """Whether the batch is over (no worker drives it any more)."""
        return self in (BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED,
                        BatchStatus.CANCELLED)


class FineTuningStatus(_Status):
    """A fine-tuning job's status::

        validating_files -> queued -> running -> succeeded
               \\______________\\__________\\-> failed | cancelled
    """

    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_final(self) -> bool:
        """Whether the job is over (``finished_at`` is stamped when it gets here)."""
        return self in (FineTuningStatus.SUCCEEDED, FineTuningStatus.FAILED,
                        FineTuningStatus.CANCELLED)


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
