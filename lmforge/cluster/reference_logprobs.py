"""DPO's reference log-probs on Ray actors while training runs: seed 002's "logprob processor".

Anyscale's llmforge computes the reference model's log-probs "asynchronously" on workers of
their own, overlapped with training (``preference_tuning_config.logprob_processor_scaling_config``:
``concurrency`` workers, ``batch_size`` pairs per call, ``custom_resources`` each), where most
implementations compute them in the trainer, first or between steps. Here:

- ``LogprobProcessor`` starts ``concurrency`` actors (``ReferenceWorker``). Each loads the base
  model once, exactly as ``trainer.train`` loads it (float32, unfused, a ``base_adapter``
  folded in when given) and never adds an adapter: it is the reference, the weights the
  in-process path uses with the adapter off. Each computes ``methods.dpo.reference_logps`` of
  the pairs it is handed, the in-process function itself, so the numbers are the same up to
  float rounding (another padding).
- Everything is submitted up front, in training order. ``trainer.train(...,
  reference_logprobs=processor)`` hands the processor to ``dpo.prepare``, which submits the
  training pairs in the order the first epoch visits them (then the validation pairs) and
  returns at once; ``submit`` cuts them into chunks of ``batch_size`` and deals the chunks
  round-robin to the actors, whose calls Ray queues. The trainer loads its model and starts its
  first step while the actors compute; a step waits only for its own pairs
  (``PendingLogps.result``), which the actors, starting earlier and working in that order,
  usually have by then. Later epochs reuse the results (the reference does not change).
  Asking for batch k+1 while training on batch k was the alternative: it leaves the actors
  idle whenever they are faster than the trainer and makes the first step wait for a whole
  round trip; submitting everything costs two floats per pair on the driver.

``run_on_ray(plan)`` runs an llmforge YAML's ``FinetuneRun`` (``training.llmforge_config``) on
a cluster: the processor when the YAML has ``logprob_processor_scaling_config``, and the
training itself as one Ray task on a node with ``worker_resources`` when it has those (its
events come back through a Ray queue), or on ``num_devices`` Ray workers data-parallel
(``data_parallel``; each with ``worker_resources``) when it has ``num_devices`` above 1.
Resources are Ray's (``ray_options``): ``CPU``, ``GPU``, or custom names such as
``accelerator_type:A10G``, which Ray gives nodes with that GPU and which then asks for one GPU
too (the seed's "runs ... on 2 GPUs" with concurrency 2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lmforge.cluster.ray_env import connect, import_ray
from lmforge.errors import LMForgeError
from lmforge.training.events import TrainingEvent
from lmforge.training.llmforge_config import FinetuneRun, LogprobProcessorConfig
from lmforge.training.preferences import PreferenceExample
from lmforge.training.trainer import TrainingResult

ACCELERATOR_PREFIX = "accelerator_type:"  # Ray's resource of a node's GPU model


class LogprobProcessorError(LMForgeError):
    """A logprob-processor actor failed (its model did not load, or it died), or the cluster
    lacks the resources asked for."""

    status_code = 503
    type = "server_error"


def ray_options(resources: dict[str, float] | None, default_cpus: float = 1.0
                ) -> dict[str, Any]:
    """Ray's ``.options(...)`` for resources ``{name: amount}``: ``CPU`` and ``GPU`` become
    ``num_cpus`` / ``num_gpus`` (``default_cpus`` CPUs when none is named), other names custom
    ``resources``; an ``accelerator_type:...`` without ``GPU`` asks for one GPU as well.
    E.g. ``{"accelerator_type:A10G": 1}`` -> ``{"num_cpus": 1.0, "num_gpus": 1.0,
    "resources": {"accelerator_type:A10G": 1}}``."""
    custom = dict(resources or {})
    options: dict[str, Any] = {"num_cpus": custom.pop("CPU", default_cpus)}
    if "GPU" in custom:
        options["num_gpus"] = custom.pop("GPU")
    elif any(name.startswith(ACCELERATOR_PREFIX) for name in custom):
        options["num_gpus"] = 1.0
    if custom:
        options["resources"] = custom
    return options


def check_resources(ray: Any, options: dict[str, Any], count: int, what: str) -> None:
    """Raise LogprobProcessorError when the cluster's total resources cannot hold ``count``
    workers with ``options`` (they would wait forever), naming what it has."""
    wanted = {"CPU": options.get("num_cpus", 0), "GPU": options.get("num_gpus", 0),
              **options.get("resources", {})}
    total = ray.cluster_resources()
    short = {name: amount * count for name, amount in wanted.items()
             if amount and total.get(name, 0) < amount * count}
    if short:
        have = {name: total.get(name, 0) for name in short}
        raise LogprobProcessorError(f"{what} needs {short} on the Ray cluster, which has {have}; "
                                    "lower the amounts (or concurrency) or add nodes with them")


class ReferenceWorker:
    """One logprob-processor actor: the reference model (the base, float32, no adapter), loaded
    once, on the GPU Ray gave it, else the CPU."""

    def __init__(self, model: str, base_adapter: str | None, threads: int):
        import torch

        from lmforge.training.forward import load_base
        from lmforge.training.trainer import pad_token_id

        torch.set_num_threads(max(1, threads))
        device = "cuda" if import_ray().get_gpu_ids() else "cpu"
        loaded = load_base(model, device, base_adapter)
        self.model, self.pad_id = loaded.model, pad_token_id(loaded)

    def logps(self, examples: list[PreferenceExample], average: bool) -> list[list[float]]:
        """``dpo.reference_logps`` of ``examples``: [[chosen, rejected], ...] in their order."""
        from lmforge.training.methods.dpo import reference_logps

        return reference_logps(self.model, examples, self.pad_id, average).tolist()


class _Chunk:
    """One actor call's result, fetched from the object store once."""

    def __init__(self, ref: Any):
        self.ref, self.rows = ref, None

    def get(self) -> list[list[float]]:
        if self.rows is None:
            ray = import_ray()
            try:
                self.rows = ray.get(self.ref)
            except ray.exceptions.RayError as e:
                raise LogprobProcessorError(f"a logprob-processor actor failed: {e}") from None
        return self.rows


@dataclass(frozen=True)
class PendingLogps:
    """One pair's reference log-probs: row ``row`` of ``chunk`` (a ``PendingReference``)."""

    chunk: _Chunk
    row: int

    def result(self) -> tuple[float, float]:
        """(chosen, rejected) in nats; waits for the actor computing them.

        Raises:
            LogprobProcessorError: the actor failed."""
        chosen, rejected = self.chunk.get()[self.row]
        return chosen, rejected


class LogprobProcessor:
    """``concurrency`` Ray actors computing DPO reference log-probs (``dpo.ReferenceLogprobs``;
    the module docstring says how and why). Use as a context manager, or ``close()`` it.

    Args:
        model: what ``trainer.train`` loads (a GGUF file, HF directory or alias), reachable
            from every node the actors may run on.
        concurrency: actors; batch_size: pairs per actor call.
        resources: Ray resources of each actor (``ray_options``; default 1 CPU).
        base_adapter: the PEFT adapter ``train`` folds into the base (``ft:`` models).
        address: the cluster (``ray_env.connect``; None: the one joined, or ``RAY_ADDRESS``, or a
            local one).

    Raises:
        RayUnavailableError: Ray is missing or the cluster does not answer.
        LogprobProcessorError: the cluster lacks the resources for ``concurrency`` actors.
    """

    def __init__(self, model: str, *, concurrency: int = 1, batch_size: int = 8,
                 resources: dict[str, float] | None = None, base_adapter: str | None = None,
                 address: str | None = None):
        ray = connect(address)
        options = ray_options(resources)
        check_resources(ray, options, concurrency, "logprob_processor_scaling_config")
        actor = ray.remote(ReferenceWorker).options(**options)
        threads = int(options["num_cpus"])
        self.workers = [actor.remote(str(model), base_adapter and str(base_adapter), threads)
                        for _ in range(concurrency)]
        self.batch_size, self._next = batch_size, 0

    @classmethod
    def from_config(cls, model: str, config: LogprobProcessorConfig, **kwargs: Any
                    ) -> LogprobProcessor:
        """The processor an llmforge YAML's ``logprob_processor_scaling_config`` describes."""
        return cls(model, concurrency=config.concurrency, batch_size=config.batch_size,
                   resources=config.custom_resources, **kwargs)

    def submit(self, examples: Sequence[PreferenceExample], average: bool
               ) -> list[PendingLogps]:
        """Deal ``examples`` in chunks of ``batch_size`` to the actors, round-robin, in order;
        returns at once with one promise per pair, in order (``dpo.ReferenceLogprobs``)."""
        pending: list[PendingLogps] = []
        for start in range(0, len(examples), self.batch_size):
            chunk = [dataclasses.replace(e, ref_pending=None)
                     for e in examples[start:start + self.batch_size]]
            worker = self.workers[self._next % len(self.workers)]
            self._next += 1
            ref = _Chunk(worker.logps.remote(chunk, average))
            pending.extend(PendingLogps(ref, row) for row in range(len(chunk)))
        return pending

    def close(self) -> None:
        """Stop the actors (results already fetched stay valid)."""
        ray = import_ray()
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []

    def __enter__(self) -> LogprobProcessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __str__(self) -> str:
        return f"{len(self.workers)} logprob-processor actor(s) on Ray"


def run_on_ray(plan: FinetuneRun, *, address: str | None = None,
               on_event: Callable[[TrainingEvent], None] | None = None) -> TrainingResult:
    """Run ``plan`` as ``lmforge fine-tune run`` does, with its Ray parts: the reference
    log-probs on a ``LogprobProcessor`` (``plan.logprob_processor``), the training on
    ``plan.num_devices`` workers data-parallel (``data_parallel.train_data_parallel``) when
    above 1, else in one Ray task on a node with ``plan.worker_resources`` (else in this
    process); every training worker gets the processor. Checkpoints go to
    ``plan.output_dir / "checkpoints"`` (on the training worker's node: on a cluster of several
    machines make it shared storage).

    Raises:
        RayUnavailableError: Ray is missing or the cluster does not answer.
        LogprobProcessorError: missing resources, or an actor failed.
        LMForgeError: whatever ``trainer.train`` raises.
    """
    ray = connect(address)
    plan = dataclasses.replace(plan, train_path=plan.train_path.resolve(),
                               output_dir=plan.output_dir.resolve(),
                               valid_path=plan.valid_path and plan.valid_path.resolve())
    processor = None
    if plan.logprob_processor is not None and plan.config.method == "dpo":
        processor = LogprobProcessor.from_config(plan.model, plan.logprob_processor)
    try:
        if plan.num_devices > 1:
            from lmforge.cluster.data_parallel import train_data_parallel

            return train_data_parallel(ray, plan, processor, on_event or (lambda event: None))
        if plan.worker_resources is None:
            return _train(plan, processor, on_event)
        return _train_as_task(ray, plan, processor, on_event or (lambda event: None))
    finally:
        if processor is not None:
            processor.close()


def _train(plan: FinetuneRun, processor: LogprobProcessor | None,
           on_event: Callable[[TrainingEvent], None] | None) -> TrainingResult:
    from lmforge.training.trainer import train

    return train(plan.model, plan.train_path, plan.valid_path, plan.config,
                 plan.output_dir / "checkpoints", on_event=on_event, resume=True,
                 reference_logprobs=processor)


def _train_as_task(ray: Any, plan: FinetuneRun, processor: LogprobProcessor | None,
                   on_event: Callable[[TrainingEvent], None]) -> TrainingResult:
    """``_train`` in a Ray task with ``plan.worker_resources``; its events are forwarded to
    ``on_event`` from a Ray queue while it runs."""
    from ray.util.queue import Queue

    options = ray_options(plan.worker_resources)
    check_resources(ray, options, 1, "worker_resources")
    events = Queue(actor_options={"num_cpus": 0})
    task = ray.remote(_train_task).options(max_retries=0, **options).remote(plan, processor,
                                                                            events)
    try:
        while True:
            done, _ = ray.wait([task], timeout=0.2)
            for event in events.get_nowait_batch(events.qsize()):
                on_event(event)
            if done:
                return ray.get(task)
    finally:
        events.shutdown(force=True)


def _train_task(plan: FinetuneRun, processor: LogprobProcessor | None, events: Any
                ) -> TrainingResult:
    """The training worker (a Ray task): ``_train``, its events put on ``events``."""
    return _train(plan, processor, events.put)
