"""What a training run reports while it runs: one frozen dataclass per kind of event.

``trainer.train(..., on_event=...)`` calls ``on_event`` with these, in this order for a run:
a ``ResumeEvent`` first (only with ``resume=True``), ``MessageEvent`` lines, one ``StepEvent``
after every optimizer step and, after an epoch's last step, a ``MessageEvent`` about the
evaluation, the step's ``StepEvent`` (with ``eval_loss``) and a ``CheckpointEvent``. Consumers
dispatch on the class (``match event: case StepEvent(): ...``), never on a string field.

No torch here: the jobs worker imports this module without loading the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class StepEvent:
    """One optimizer step done (transformers' ``on_log`` metrics of a step)."""

    step: int  # optimizer steps done, 1-based, counting resumed ones
    epoch: int  # the epoch this step belongs to, 1-based
    train_loss: float  # the step's mean loss per item (SFT: per completion token)
    learning_rate: float  # the rate the step used (before the scheduler moved it)
    eval_loss: float | None = None  # mean validation loss per item; set on an epoch's last step
    # the method's own metrics, means per item (DPO: TRL's "rewards/chosen", ...); empty for SFT
    metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] | None = None  # the same on the validation set, with eval_loss


@dataclass(frozen=True)
class CheckpointEvent:
    """An epoch ended: its adapter and resume state are saved in ``path``."""

    step: int  # the optimizer step the checkpoint was taken after
    epoch: int  # epochs completed, 1-based
    path: Path  # ``<output_dir>/checkpoint-<step>``: a PEFT adapter + ``trainer_state.pt``
    train_loss: float  # the last step's training loss
    eval_loss: float  # the mean validation loss per item at this checkpoint
    eval_metrics: dict[str, float] = field(default_factory=dict)  # the method's, on validation


@dataclass(frozen=True)
class ResumeEvent:
    """Where a ``resume=True`` run starts: after ``checkpoint`` (None: none was complete, so
    at step 1 with ``epoch`` and ``step`` 0)."""

    checkpoint: str | None  # the checkpoint directory's name, e.g. ``"checkpoint-3"``
    epoch: int  # epochs completed before this run
    step: int  # optimizer steps completed before this run


@dataclass(frozen=True)
class MessageEvent:
    """A human-readable line about the run (what it trains on, an epoch's result, a stop)."""

    message: str


TrainingEvent = StepEvent | CheckpointEvent | ResumeEvent | MessageEvent
