"""The statuses of batches and fine-tuning jobs, with OpenAI's values (API reference, "Batch" and
"Fine-tuning"): the wire schemas, the jobs store and the client all use these enums.

Both mix in ``str``, so a member equals its value (``BatchStatus.COMPLETED == "completed"``),
serializes to it with ``json`` and pydantic, and prints as it (``f"{status}"`` gives
``completed``). Which status may follow which is the jobs layer's business
(``jobs/statuses.py``).
"""

from __future__ import annotations

from enum import Enum


class StatusEnum(str, Enum):
    """A status that is its plain string: ``str()`` and f-strings give the value (as
    ``enum.StrEnum`` does, which Python 3.10 lacks), so messages read as before."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class BatchStatus(StatusEnum):
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


class FineTuningStatus(StatusEnum):
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
