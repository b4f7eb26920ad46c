"""The fine-tune worker: drives fine-tuning jobs from ``validating_files`` to a served adapter.

::

    validating_files -> queued -> running -> succeeded   (the adapter is served at once)
           \\______________\\__________\\-> failed       (error: code, message, param)
                                        \\-> cancelled

One job runs at a time, oldest first, in a thread beside the serving engine (training is
CPU/GPU-bound; the event loop stays free). Validating the files also resolves the ``"auto"``
hyperparameters from the number of training examples (``training.hyperparameters``): the job
then shows numbers, and an event and a log line say what was picked. Its events (messages, and
metrics per optimizer step) and checkpoints (one per epoch) go to the store as they happen. On
success the best checkpoint (lowest validation loss) is copied to ``<home>/adapters/<job id>``
and registered with the engine as ``ft:<base>:<suffix>:<job id>``, and every checkpoint as
``ft:<base>:<suffix>:<job id>:ckpt-step-<step>`` (kept until the job's model is deleted); at
start-up the adapters of all succeeded jobs are registered again. A job that was ``running`` when
the server stopped continues from its last checkpoint (``training.trainer.train(resume=True)``)
in ``<home>/fine_tunes/<job id>``, or from step 1 if none was saved; an event and a log line say
which. With several servers on one store, a job is driven only under its lease (``jobs/lease.py``):
a server that loses it stops training at the next step, and one whose server died is taken over
(and resumed so) by another once the lease expires.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from pathlib import Path
from typing import Any

from lmforge.errors import LMForgeError
from lmforge.jobs.fine_tuning_store import (
    OPENAI_HYPERPARAMETERS,
    FineTuningStore,
    JobRecord,
    metrics_data,
    metrics_message,
    results_csv,
    resume_message,
)
from lmforge.jobs.lease import DEFAULT_TTL_S, JobLeases, Lease
from lmforge.jobs.schema import FINE_TUNING_JOBS
from lmforge.jobs.store import Store
from lmforge.jobs.worker import PollingWorker
from lmforge.protocol.fine_tuning import TRAINING_METHODS
from lmforge.protocol.statuses import FineTuningStatus
from lmforge.training.events import (
    CheckpointEvent,
    MessageEvent,
    ResumeEvent,
    StepEvent,
    TrainingEvent,
)
from lmforge.training.hyperparameters import auto_hyperparameters

logger = logging.getLogger(__name__)
RESULTS_PURPOSE = "fine-tune-results"
# what "auto" meant before validation resolved it: only a job validated by an older lmforge still
# holds "auto" here, and a resumed run must keep the settings it started with
_UNRESOLVED_DEFAULTS = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}
_CANCEL_CHECK_S = 1.0  # how often the training thread reads the job's status


def resolve_hyperparameters(requested: dict[str, Any], n_examples: int, method: str = "supervised"
                            ) -> tuple[dict[str, Any], int]:
    """``requested`` with OpenAI's three (and a DPO job's ``beta``) as numbers, and the
    optimizer steps they make.

    Absent and ``"auto"`` ones come from ``training.hyperparameters.auto_hyperparameters`` for
    ``n_examples`` training examples; given ones are kept, and a given ``learning_rate`` makes
    an auto multiplier 1. An auto ``beta`` is ``TrainingConfig``'s (0.1, the DPO paper's and
    TRL's).
    """
    from lmforge.training.training_config import TrainingConfig

    given = {k: None if requested.get(k, "auto") == "auto" else requested[k]
             for k in OPENAI_HYPERPARAMETERS}
    resolved = auto_hyperparameters(n_examples, **given,
                                    learning_rate_given="learning_rate" in requested)
    numbers = {k: getattr(resolved, k) for k in OPENAI_HYPERPARAMETERS}
    if method == "dpo":
        beta = requested.get("beta", "auto")
        numbers["beta"] = TrainingConfig.beta if beta == "auto" else beta
    return requested | numbers, resolved.steps


def training_config(job: JobRecord) -> Any:
    """The job's hyperparameters as a ``TrainingConfig`` (absent ones: its defaults; OpenAI's
    three are numbers once the files are validated)."""
    from lmforge.models.lora import LoRAConfig
    from lmforge.training.training_config import TrainingConfig

    hp = {k: v for k, v in job.hyperparameters.items() if v != "auto"}
    lora = {k: v for k, v in (("r", hp.get("lora_r")), ("lora_alpha", hp.get("lora_alpha")),
                              ("lora_dropout", hp.get("lora_dropout")),
                              ("target_modules", hp.get("target_modules"))) if v is not None}
    if "target_modules" in lora:
        lora["target_modules"] = tuple(lora["target_modules"])
    plain = {k: hp.get(k, _UNRESOLVED_DEFAULTS.get(k)) for k in (
        "n_epochs", "batch_size", "learning_rate_multiplier", "learning_rate", "warmup_ratio",
        "weight_decay", "max_seq_len", "beta", "label_smoothing", "rpo_alpha")}
    plain["dpo_loss_type"] = hp.get("loss_type")
    return TrainingConfig(seed=job.seed, lora=LoRAConfig(**lora),
                          method=TRAINING_METHODS[job.method_type],
                          **{k: v for k, v in plain.items() if v is not None})


class FineTuningWorker(PollingWorker):
    """Runs fine-tuning jobs on the served base model (see the module docstring).

    Args:
        store: the jobs store (files, and the fine-tuning tables).
        engine: the ``AsyncEngine`` serving the base model; adapters are registered with it.
        poll_s: how often an idle worker looks for new jobs.
        lease_s: the ttl of its job leases (seconds), as ``BatchWorker``'s.
    """

    def __init__(self, store: Store, engine: Any, poll_s: float = 1.0,
                 lease_s: float = DEFAULT_TTL_S):
        super().__init__(poll_s)
        self.store, self.jobs, self.engine = store, FineTuningStore(store), engine
        self.leases = JobLeases(store.db, FINE_TUNING_JOBS, lease_s)
        self.adapter_dir = store.home / "adapters"
        self._shutdown = threading.Event()  # read by the training thread
        self._registered = False

    async def register_adapters(self) -> None:
        """Serve the adapters of every succeeded job and of its checkpoints (at start-up); a
        missing job adapter is logged, a checkpoint deleted on its own is skipped."""
        for job in await asyncio.to_thread(self.jobs.succeeded_jobs):
            try:
                await self.engine.add_lora(job.fine_tuned_model, job.adapter_path)
            except LMForgeError as e:
                logger.error("cannot serve %s (%s): %s", job.fine_tuned_model, job.id, e.message)
                continue
            await self._serve_checkpoints(job)

    async def _serve_checkpoints(self, job: JobRecord) -> None:
        """Serve each checkpoint of a finished job as ``job.checkpoint_model(step)`` (OpenAI's
        checkpoints are models), without its resume state, which a finished job never reads."""
        from lmforge.models.lora_merge import export_adapter
        from lmforge.training.trainer import STATE_FILE

        parent = job.parent_job and await asyncio.to_thread(self.jobs.get_job, job.parent_job)
        for checkpoint in await asyncio.to_thread(self.jobs.all_checkpoints, job.id):
            path = Path(checkpoint.path)
            if not path.is_dir():
                continue  # deleted on its own (DELETE /v1/models/<checkpoint>)
            (path / STATE_FILE).unlink(missing_ok=True)
            if job.parent_job:  # trained on an ft: model: served stacked on it, written once
                stacked = path.parent / "served" / path.name
                if not stacked.is_dir():
                    if not parent or not parent.adapter_path:
                        continue  # that model was deleted before its checkpoints were stacked
                    await asyncio.to_thread(export_adapter, path, stacked, parent.adapter_path)
                path = stacked
            name = job.checkpoint_model(checkpoint.step_number)
            try:
                await self.engine.add_lora(name, str(path))
            except LMForgeError as e:
                logger.error("cannot serve checkpoint %s: %s", name, e.message)

    async def stop(self) -> None:
        self._shutdown.set()  # a training thread stops at its next step; it resumes on restart
        await super().stop()

    async def drive_all(self) -> None:
        if not self._registered:  # the first pass, at start-up
            await self.register_adapters()
            self._registered = True
        for job in await asyncio.to_thread(self.jobs.unfinished_jobs):
            await self.leases.drive(job.id, functools.partial(self._drive, job.id))

    async def _drive(self, job_id: str, lease: Lease) -> None:
        job = await self._get(job_id)  # as it is now that the lease is ours
        resumed = job.status is FineTuningStatus.RUNNING  # a server stopped while it trained
        if job.status is FineTuningStatus.VALIDATING_FILES:
            if not await self._validate(job):
                return
            job = await self._get(job.id)
        if job.status is FineTuningStatus.QUEUED and await self._move(
                job, FineTuningStatus.RUNNING, "Fine-tuning job started"):
            job = await self._get(job.id)
        if job.status is FineTuningStatus.RUNNING:
            await self._train(job, resumed, lease)

    async def _validate(self, job: JobRecord) -> bool:
        """Read and check the files now (a bad one fails the job at once, naming the line),
        then resolve the "auto" hyperparameters and queue the job with them."""
        await self._event(job, f"Validating training file: {job.training_file}")
        try:
            n_examples = await asyncio.to_thread(self._training_examples, job)
        except LMForgeError as e:
            await self._fail(job, "invalid_file", e.message, e.param)
            return False
        except OSError:
            await self._fail(job, "invalid_file", "the file was deleted", "training_file")
            return False
        hyperparameters, steps = resolve_hyperparameters(job.hyperparameters, n_examples,
                                                         job.method_type)
        if not await asyncio.to_thread(self.jobs.transition, job.id, FineTuningStatus.QUEUED,
                                       hyperparameters=hyperparameters):
            return False  # cancelled meanwhile
        job.hyperparameters = hyperparameters
        peak = training_config(job).peak_learning_rate
        shown = job.method_hyperparameters
        message = "Hyperparameters resolved: " + ", ".join(
            f"{k}={hyperparameters[k]}" for k in shown) + (
            f" (peak learning rate {peak:.3g}); {steps} optimizer steps on {n_examples} "
            "training examples")
        logger.info("fine-tuning job %s: %s", job.id, message)
        await asyncio.to_thread(self.jobs.add_event, job.id, message, data={
            **{k: hyperparameters[k] for k in shown},
            "learning_rate": peak, "steps": steps, "n_examples": n_examples})
        await self._event(job, "Files validated; the job is queued")
        return True

    def _training_examples(self, job: JobRecord) -> int:
        """Read and check the job's files; returns how many examples it trains on (the
        training file's, less the share held out for validation without a validation file,
        split as the trainer splits it).

        Raises:
            DataError: a bad file, naming the line. OSError: a file was deleted.
        """
        from lmforge.training.data import split_holdout
        from lmforge.training.methods import get_method

        config = training_config(job)
        read_examples, max_seq_len = get_method(config.method).read_examples, config.max_seq_len
        examples = read_examples(self.store.path(job.training_file), self.engine.tokenizer,
                                 max_seq_len, param="training_file")
        if job.validation_file is None:
            return len(split_holdout(examples, job.seed)[0])
        # OpenAI's minimum of 10 examples is the training file's; a validation file may be small
        read_examples(self.store.path(job.validation_file), self.engine.tokenizer, max_seq_len,
                      param="validation_file", min_rows=1)
        return len(examples)

    async def _train(self, job: JobRecord, resumed: bool, lease: Lease) -> None:
        """Train in a thread until done, failed, cancelled, stopped or ``lease`` is lost;
        ``resumed``: the job was running when a server stopped: it goes on from its last
        checkpoint. Cancelled, it waits for the thread to stop (at its next step), so the
        lease is released only once nothing trains here."""
        from lmforge.training.trainer import train

        config = training_config(job)
        base_adapter = await self._parent_adapter(job)
        if base_adapter is False:
            return
        last_check = [0.0, False]

        def should_stop() -> bool:
            if self._shutdown.is_set() or not lease.held:
                return True
            now = time.monotonic()
            if now - last_check[0] >= _CANCEL_CHECK_S:
                last_check[0] = now
                current = self.jobs.get_job(job.id)
                last_check[1] = current is None or current.status is not FineTuningStatus.RUNNING
            return bool(last_check[1])

        metrics: list[StepEvent] = []  # this run's, for the results file
        on_event = functools.partial(self._record, job, metrics)
        validation = self.store.path(job.validation_file) if job.validation_file else None
        thread = asyncio.ensure_future(asyncio.to_thread(
            train, self.engine.config.model.model, self.store.path(job.training_file),
            validation, config, self.jobs.work_dir(job.id), on_event=on_event,
            should_stop=should_stop, resume=resumed, base_adapter=base_adapter))
        try:
            result = await asyncio.shield(thread)
        except asyncio.CancelledError:  # stopping, or the lease is lost: should_stop says so
            await asyncio.wait({thread})
            raise
        except LMForgeError as e:
            await self._fail(job, "training_failed", e.message, e.param)
            return
        except Exception:
            logger.exception("fine-tuning job %s failed", job.id)
            await self._fail(job, "training_failed", "training failed with an internal error; "
                             "see the server log", None)
            return
        if result.stopped or result.best_checkpoint is None:
            return  # cancelled (its status says so) or the server is stopping (resumes later)
        await self._succeed(job, result, metrics)

    async def _parent_adapter(self, job: JobRecord) -> str | None | bool:
        """The adapter of the ``ft:`` model the job trains on (None: it trains the base);
        False when that model was deleted meanwhile (the job is failed)."""
        if job.parent_job is None:
            return None
        parent = await asyncio.to_thread(self.jobs.get_job, job.parent_job)
        if parent is None or parent.adapter_path is None:
            await self._fail(job, "invalid_model", f"the model {job.model} was deleted; it "
                             "cannot be fine-tuned further", "model")
            return False
        return parent.adapter_path

    def _record(self, job: JobRecord, metrics: list[StepEvent], event: TrainingEvent) -> None:
        """Store one trainer event (in the training thread) as the job's: a step's metrics, the
        checkpoint that ends an epoch, where a resumed run starts, or a message."""
        match event:
            case StepEvent():
                metrics.append(event)
                self.jobs.add_event(job.id, metrics_message(event), type="metrics",
                                    data=metrics_data(event))
            case CheckpointEvent():
                self.jobs.add_checkpoint(job.id, event.step, {
                    "step": event.step, "train_loss": event.train_loss,
                    "valid_loss": event.eval_loss, "full_valid_loss": event.eval_loss,
                    **{f"eval_{k}": v for k, v in event.eval_metrics.items()}},
                    str(event.path))
            case ResumeEvent():
                message = resume_message(event)
                logger.warning("fine-tuning job %s: %s", job.id, message)
                self.jobs.add_event(job.id, message, data={
                    "checkpoint": event.checkpoint, "epoch": event.epoch, "step": event.step})
            case MessageEvent(message=message) if message:
                self.jobs.add_event(job.id, message)

    async def _succeed(self, job: JobRecord, result: Any, metrics: list[StepEvent]) -> None:
        from lmforge.models.lora_merge import export_adapter

        name = job.model_name
        target = self.adapter_dir / job.id
        parent = await self._parent_adapter(job)
        if parent is False:
            return
        await asyncio.to_thread(export_adapter, Path(result.best_checkpoint), target, parent)
        results = await asyncio.to_thread(self.store.add_file, results_csv(metrics),
                                          f"{job.id}_results.csv", RESULTS_PURPOSE)
        await self.engine.add_lora(name, str(target))
        if await asyncio.to_thread(self.jobs.transition, job.id, FineTuningStatus.SUCCEEDED,
                                   fine_tuned_model=name, adapter_path=str(target),
                                   trained_tokens=result.trained_tokens,
                                   result_files=[results.id]):
            await self._serve_checkpoints(job)
            await self._event(job, f"The job has successfully completed: {name} is served, "
                              "and each checkpoint as <model>:ckpt-step-<step>")
        else:  # cancelled at the very end: do not serve it
            await self.engine.remove_lora(name)

    async def _fail(self, job: JobRecord, code: str, message: str, param: str | None) -> None:
        if await asyncio.to_thread(self.jobs.transition, job.id, FineTuningStatus.FAILED,
                                   error={"code": code, "message": message, "param": param}):
            await self._event(job, f"Fine-tuning job failed: {message}", level="error")

    async def _move(self, job: JobRecord, status: str, message: str) -> bool:
        moved = await asyncio.to_thread(self.jobs.transition, job.id, status)
        if moved:
            await self._event(job, message)
        return moved

    async def _event(self, job: JobRecord, message: str, level: str = "info") -> None:
        await asyncio.to_thread(self.jobs.add_event, job.id, message, level)

    async def _get(self, job_id: str) -> JobRecord:
        job = await asyncio.to_thread(self.jobs.get_job, job_id)
        assert job is not None, job_id  # jobs are never deleted
        return job
