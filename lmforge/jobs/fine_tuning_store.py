"""Fine-tuning jobs in the store: the job rows, their events and checkpoints.

Statuses (``jobs/statuses.py``) move forward only (``FINE_TUNING_FROM``: the statuses each one may
follow), through conditional updates, as batches do: ``validating_files -> queued -> running ->
succeeded``, ``failed`` or ``cancelled`` from any unfinished status. A job that was ``running`` when
the server died is found by ``unfinished_jobs`` and resumed from its last checkpoint (or failed
with a reason) by the fine-tune worker. The functions at the end say what the trainer's events
become here: event messages and data, and the results CSV.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.jobs.schema import (
    FINE_TUNING_CHECKPOINTS,
    FINE_TUNING_EVENTS,
    FINE_TUNING_JOBS,
)
from lmforge.jobs.statuses import FINE_TUNING_FROM, UNFINISHED_FINE_TUNES
from lmforge.jobs.store import Store, new_id
from lmforge.protocol.statuses import FineTuningStatus

if TYPE_CHECKING:
    from lmforge.training.events import ResumeEvent, StepEvent

_JSON_COLUMNS = ("hyperparameters", "method", "metadata", "error", "result_files")
OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
CHECKPOINT_TAG = "ckpt-step-"  # a checkpoint's model: <fine-tuned model>:ckpt-step-<step>
WORK_DIR = "fine_tunes"  # <home>/fine_tunes/<job id>: a job's checkpoints and prepared data


@dataclass
class JobRecord:
    """One fine-tuning job (JSON columns decoded)."""

    id: str
    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    status: FineTuningStatus
    hyperparameters: dict[str, Any]
    method: dict[str, Any] | None
    metadata: dict[str, str] | None
    error: dict[str, Any] | None
    fine_tuned_model: str | None
    adapter_path: str | None
    trained_tokens: int | None
    result_files: list[str] | None
    created_at: int
    finished_at: int | None
    rank: int

    @property
    def method_type(self) -> str:
        """OpenAI's method type: ``"supervised"`` (also for jobs stored without one) or
        ``"dpo"``."""
        return (self.method or {}).get("type", "supervised")

    @property
    def base_model(self) -> str:
        """The served base model the job's adapter applies to: ``model``, or, for a job that
        fine-tunes an ``ft:`` model, that model's base."""
        return (self.method or {}).get("base_model", self.model)

    @property
    def parent_job(self) -> str | None:
        """The job whose ``ft:`` model this job fine-tunes further (None: it trains the base)."""
        return (self.method or {}).get("parent_job")

    @property
    def model_name(self) -> str:
        """The name its result is served as: ``ft:<base>:<suffix>:<job id>`` (without a
        suffix ``ft:<base>:<job id>``); set as ``fine_tuned_model`` when the job succeeds."""
        return ":".join(["ft", self.base_model, *([self.suffix] if self.suffix else []),
                         self.id])

    def checkpoint_model(self, step: int) -> str:
        """The name the checkpoint after optimizer step ``step`` is served as (OpenAI's):
        ``<model_name>:ckpt-step-<step>``."""
        return f"{self.model_name}:{CHECKPOINT_TAG}{step}"

    @property
    def method_hyperparameters(self) -> list[str]:
        """The hyperparameters OpenAI shows for the method: its three, and DPO's ``beta``."""
        return [*OPENAI_HYPERPARAMETERS, *(["beta"] if self.method_type == "dpo" else [])]


@dataclass
class EventRecord:
    id: str
    job_id: str
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None
    rank: int


@dataclass
class CheckpointRecord:
    id: str
    job_id: str
    created_at: int
    step_number: int
    metrics: dict[str, Any]
    path: str
    rank: int


class FineTuningStore:
    """Fine-tuning rows over a ``Store``'s database (the tables are its migration 2)."""

    def __init__(self, store: Store):
        self.store = store
        self.db = store.db

    def add_job(self, model: str, training_file: str, validation_file: str | None,
                suffix: str | None, seed: int, hyperparameters: dict[str, Any],
                method: dict[str, Any] | None, metadata: dict[str, str] | None) -> JobRecord:
        rank = time.time_ns()
        values = dict(id=new_id("ftjob-"), model=model, training_file=training_file,
                      validation_file=validation_file, suffix=suffix, seed=seed,
                      status=FineTuningStatus.VALIDATING_FILES,
                      hyperparameters=json.dumps(hyperparameters), method=_dumps(method),
                      metadata=_dumps(metadata),
                      created_at=rank // 10**9, rank=rank)
        with self.db.begin() as conn:
            conn.execute(FINE_TUNING_JOBS.insert().values(**values))
        return self.get_job(values["id"])  # type: ignore[return-value]

    def get_job(self, job_id: str) -> JobRecord | None:
        with self.db.connect() as conn:
            row = conn.execute(FINE_TUNING_JOBS.select().where(
                FINE_TUNING_JOBS.c.id == job_id)).first()
        return None if row is None else _job(row)

    def list_jobs(self, limit: int = 20, after: str | None = None
                  ) -> tuple[list[JobRecord], bool]:
        rows, more = self.store.page(FINE_TUNING_JOBS, FINE_TUNING_JOBS.select(), limit, after,
                                     "desc")
        return [_job(r) for r in rows], more

    def served_job(self, fine_tuned_model: str) -> JobRecord | None:
        """The succeeded job whose model is served as ``fine_tuned_model`` (None: none is)."""
        with self.db.connect() as conn:
            row = conn.execute(FINE_TUNING_JOBS.select().where(
                FINE_TUNING_JOBS.c.fine_tuned_model == fine_tuned_model,
                FINE_TUNING_JOBS.c.status == FineTuningStatus.SUCCEEDED,
                FINE_TUNING_JOBS.c.adapter_path.is_not(None))).first()
        return None if row is None else _job(row)

    def unfinished_jobs(self) -> list[JobRecord]:
        """Jobs a worker still has to drive, oldest first."""
        with self.db.connect() as conn:
            rows = conn.execute(FINE_TUNING_JOBS.select().where(
                FINE_TUNING_JOBS.c.status.in_(UNFINISHED_FINE_TUNES)).order_by(
                FINE_TUNING_JOBS.c.rank)).all()
        return [_job(r) for r in rows]

    def succeeded_jobs(self) -> list[JobRecord]:
        """Jobs whose adapter is served (re-registered at every start-up), oldest first."""
        with self.db.connect() as conn:
            rows = conn.execute(FINE_TUNING_JOBS.select().where(
                FINE_TUNING_JOBS.c.status == FineTuningStatus.SUCCEEDED,
                FINE_TUNING_JOBS.c.adapter_path.is_not(None)).order_by(
                FINE_TUNING_JOBS.c.rank)).all()
        return [_job(r) for r in rows]

    def work_dir(self, job_id: str) -> Path:
        """Where the job trains: its checkpoints (each a servable adapter) and prepared data."""
        return self.store.home / WORK_DIR / job_id

    def unserve(self, fine_tuned_model: str) -> JobRecord | None:
        """Stop serving a fine-tuned model at start-up (``DELETE /v1/models``): its job keeps
        its record but loses ``adapter_path``; returns the job as it was (None: no such job)."""
        with self.db.begin() as conn:
            row = conn.execute(FINE_TUNING_JOBS.select().where(
                FINE_TUNING_JOBS.c.fine_tuned_model == fine_tuned_model)).first()
            if row is None:
                return None
            conn.execute(FINE_TUNING_JOBS.update().where(FINE_TUNING_JOBS.c.id == row.id)
                         .values(adapter_path=None))
        return _job(row)

    def checkpoint_of(self, model: str) -> CheckpointRecord | None:
        """The checkpoint served as ``model`` (``JobRecord.checkpoint_model``), if any."""
        fine_tuned, tag, step = model.rpartition(":" + CHECKPOINT_TAG)
        if not tag or not step.isdigit():
            return None
        with self.db.connect() as conn:
            row = conn.execute(FINE_TUNING_JOBS.select().where(
                FINE_TUNING_JOBS.c.fine_tuned_model == fine_tuned)).first()
        if row is None:
            return None
        return next((c for c in self.all_checkpoints(row.id) if c.step_number == int(step)),
                    None)

    def all_checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        """A job's checkpoints, oldest first."""
        with self.db.connect() as conn:
            rows = conn.execute(FINE_TUNING_CHECKPOINTS.select().where(
                FINE_TUNING_CHECKPOINTS.c.job_id == job_id).order_by(
                FINE_TUNING_CHECKPOINTS.c.rank)).all()
        return [_checkpoint(r) for r in rows]

    def transition(self, job_id: str, status: FineTuningStatus, **values: Any) -> bool:
        """Move a job to ``status`` if its current status may precede it (``FINE_TUNING_FROM``),
        with other columns in the same update (JSON ones encoded); a final status stamps
        ``finished_at``. Returns whether it moved.

        Raises:
            ValueError: ``status`` is not a ``FineTuningStatus`` (or one's value)."""
        status = FineTuningStatus(status)
        values = {k: _dumps(v) if k in _JSON_COLUMNS else v for k, v in values.items()}
        if status.is_final():
            values["finished_at"] = int(time.time())
        with self.db.begin() as conn:
            moved = conn.execute(FINE_TUNING_JOBS.update().where(
                FINE_TUNING_JOBS.c.id == job_id,
                FINE_TUNING_JOBS.c.status.in_(FINE_TUNING_FROM[status])).values(
                status=status, **values)).rowcount
        return bool(moved)

    def add_event(self, job_id: str, message: str, level: str = "info", type: str = "message",
                  data: dict[str, Any] | None = None) -> EventRecord:
        rank = time.time_ns()
        record = EventRecord(new_id("ftevent-"), job_id, rank // 10**9, level, message, type,
                             data, rank)
        with self.db.begin() as conn:
            conn.execute(FINE_TUNING_EVENTS.insert().values(
                **{f.name: getattr(record, f.name) for f in fields(record)} | {
                    "data": _dumps(data)}))
        return record

    def list_events(self, job_id: str, limit: int = 20, after: str | None = None
                    ) -> tuple[list[EventRecord], bool]:
        """A job's events, newest first (OpenAI's order), after the event id ``after``."""
        query = FINE_TUNING_EVENTS.select().where(FINE_TUNING_EVENTS.c.job_id == job_id)
        rows, more = self.store.page(FINE_TUNING_EVENTS, query, limit, after, "desc")
        return [_event(r) for r in rows], more

    def add_checkpoint(self, job_id: str, step_number: int, metrics: dict[str, Any],
                       path: str) -> CheckpointRecord:
        rank = time.time_ns()
        record = CheckpointRecord(new_id("ftckpt-"), job_id, rank // 10**9, step_number,
                                  metrics, path, rank)
        with self.db.begin() as conn:
            conn.execute(FINE_TUNING_CHECKPOINTS.insert().values(
                **{f.name: getattr(record, f.name) for f in fields(record)} | {
                    "metrics": json.dumps(metrics)}))
        return record

    def list_checkpoints(self, job_id: str, limit: int = 10, after: str | None = None
                         ) -> tuple[list[CheckpointRecord], bool]:
        query = FINE_TUNING_CHECKPOINTS.select().where(
            FINE_TUNING_CHECKPOINTS.c.job_id == job_id)
        rows, more = self.store.page(FINE_TUNING_CHECKPOINTS, query, limit, after, "desc")
        return [_checkpoint(r) for r in rows], more


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _job(row: Any) -> JobRecord:
    values = {f.name: getattr(row, f.name) for f in fields(JobRecord)}
    for name in _JSON_COLUMNS:
        values[name] = json.loads(values[name]) if values[name] else None
    values["hyperparameters"] = values["hyperparameters"] or {}
    return JobRecord(**values)


def _event(row: Any) -> EventRecord:
    values = {f.name: getattr(row, f.name) for f in fields(EventRecord)}
    values["data"] = json.loads(values["data"]) if values["data"] else None
    return EventRecord(**values)


def _checkpoint(row: Any) -> CheckpointRecord:
    return CheckpointRecord(**{f.name: getattr(row, f.name) for f in fields(CheckpointRecord)}
                            | {"metrics": json.loads(row.metrics)})


# -- what the trainer's events become in the store: event messages and the results file --


def resume_message(event: ResumeEvent) -> str:
    """The job event of the trainer's ``ResumeEvent``."""
    if event.checkpoint is None:
        return "Restarting from step 1: no checkpoint was saved before the server stopped"
    return f"Resuming from {event.checkpoint} (epoch {event.epoch}, step {event.step})"


def metrics_message(event: StepEvent) -> str:
    """The message of a ``metrics`` job event: ``Step 3: training loss=1.2345`` and, when the
    step has them, reward accuracy and validation values."""
    text = f"Step {event.step}: training loss={event.train_loss:.4f}"
    if "rewards/accuracies" in event.metrics:
        text += f", reward accuracy={event.metrics['rewards/accuracies']:.2f}"
    if event.eval_loss is not None:
        text += f", validation loss={event.eval_loss:.4f}"
    if event.eval_metrics and "rewards/accuracies" in event.eval_metrics:
        text += f", validation reward accuracy={event.eval_metrics['rewards/accuracies']:.2f}"
    return text


def metrics_data(event: StepEvent) -> dict[str, Any]:
    """The ``data`` of a ``metrics`` job event: step, epoch, train_loss, learning_rate, the
    method's metrics under their names (DPO: TRL's ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``), and
    only on the step that ends an epoch eval_loss and the metrics on the validation set
    (``eval_rewards/chosen``, ..., TRL's names)."""
    data: dict[str, Any] = {"step": event.step, "epoch": event.epoch,
                            "train_loss": event.train_loss, "learning_rate": event.learning_rate,
                            **event.metrics}
    if event.eval_loss is not None:
        data["eval_loss"] = event.eval_loss
    data |= {f"eval_{k}": v for k, v in (event.eval_metrics or {}).items()}
    return data


def results_csv(metrics: list[StepEvent]) -> bytes:
    """OpenAI's result file: one row per step (step, epoch, train_loss, valid_loss,
    learning_rate), then the method's metrics and their validation values, if any."""
    names = list(dict.fromkeys(k for m in metrics for k in m.metrics))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["step", "epoch", "train_loss", "valid_loss", "learning_rate", *names,
                     *(f"valid_{k}" for k in names)])
    for m in metrics:
        evaluated = m.eval_metrics or {}
        writer.writerow([m.step, m.epoch, m.train_loss,
                         "" if m.eval_loss is None else m.eval_loss, m.learning_rate,
                         *(m.metrics.get(k, "") for k in names),
                         *(evaluated.get(k, "") for k in names)])
    return out.getvalue().encode()
