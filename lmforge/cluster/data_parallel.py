"""Data-parallel LoRA training on Ray workers: an llmforge YAML's ``num_devices: N`` (N > 1).

Anyscale's llmforge trains on ``num_devices`` Ray Train workers, each with
``train_batch_size_per_device`` examples per micro-batch, the gradients all-reduced. Here
``train_data_parallel`` starts N ``TrainingRank`` actors (each with ``worker_resources``, default
1 CPU), has them form one ``torch.distributed`` process group (gloo on CPUs, NCCL when Ray gave
each a GPU; rank 0's node and a free port are the rendezvous) and runs ``trainer.train(...,
parallel=TorchDistributed(rank, N))`` on every one: the same data, the same seed and so the same
LoRA init; each forwards its share of every step's micro-batches, the adapter gradients are
summed before each optimizer step, so every rank keeps the same adapter
(``training.distributed`` has the arithmetic). A step is ``batch_size * N *
gradient_accumulation_steps`` examples, llmforge's global batch: N workers take the steps one
worker takes with ``gradient_accumulation_steps`` N times larger, to float rounding. Rank 0
writes the checkpoints and its events come back through a Ray queue; every rank returns a
checksum of its adapter, and differing checksums fail the run (a desynchronized rank is a bug,
never a result).

Plain Ray actors rather than Ray Train's ``TorchTrainer``: that one sets up the same process group
(``_setup_torch_process_group``: rank 0's address, ``init_process_group``) but also brings its
own checkpointing, storage directory (``~/ray_results``) and reporting API, while ``train``
already checkpoints, resumes and reports events, and the loop's return value (the
``TrainingResult``) does not come back from a Ray Train worker.

DPO's reference log-probs: every rank runs the method's pass over the whole data (each rank's
share changes every epoch, and its batches need their pairs' log-probs), in-process into a cache
of its own (``prepared-rank<r>``), or, with ``logprob_processor_scaling_config``, by submitting
the pairs to the ``LogprobProcessor``'s actors, whose handles travel to every rank; a rank waits
only for the pairs of its own micro-batches. Either way the reference work is done N times
(in parallel, so not longer); computing it once and sharing it is left for later.
"""

from __future__ import annotations

import dataclasses
import math
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from lmforge.cluster.ray_env import import_ray
from lmforge.cluster.reference_logprobs import LogprobProcessor, check_resources, ray_options
from lmforge.errors import LMForgeError
from lmforge.training.events import MessageEvent, TrainingEvent
from lmforge.training.llmforge_config import FinetuneRun
from lmforge.training.trainer import TrainingResult

RENDEZVOUS_TIMEOUT_S = 300  # how long a rank waits for the others to join the process group


class DataParallelError(LMForgeError):
    """A data-parallel training worker failed to start or join, or the ranks' adapters differ."""

    status_code = 500
    type = "server_error"


class TrainingRank:
    """One data-parallel training worker (a Ray actor): rank ``rank`` of ``world_size``."""

    def __init__(self, rank: int, world_size: int, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.rank, self.world_size = rank, world_size
        self.gpu = bool(import_ray().get_gpu_ids())

    def endpoint(self) -> tuple[str, int]:
        """This worker's node address and a free TCP port there (rank 0's: the rendezvous)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return import_ray().util.get_node_ip_address(), port

    def join(self, host: str, port: int) -> None:
        """Join the process group at ``host:port``; returns once every rank has."""
        import torch

        if self.gpu:
            torch.cuda.set_device(0)  # Ray's CUDA_VISIBLE_DEVICES shows this actor its GPU alone
        torch.distributed.init_process_group(
            "nccl" if self.gpu else "gloo", init_method=f"tcp://{host}:{port}", rank=self.rank,
            world_size=self.world_size, timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S))

    def train(self, plan: FinetuneRun, processor: LogprobProcessor | None, events: Any
              ) -> tuple[TrainingResult, float]:
        """``trainer.train`` as this rank (``events``: rank 0's Ray queue, else None); returns
        its result and the sum of its adapter's weights (float64), equal on every rank."""
        import torch

        from lmforge.training.distributed import TorchDistributed
        from lmforge.training.forward import load_base
        from lmforge.training.trainer import train

        config = dataclasses.replace(plan.config, device="cuda") if self.gpu else plan.config
        loaded = load_base(plan.model, config.device)
        emit = None if events is None else events.put  # a Ray Queue: len() 0 is falsy
        result = train(loaded, plan.train_path, plan.valid_path, config,
                       plan.output_dir / "checkpoints", on_event=emit, resume=True,
                       reference_logprobs=processor,
                       parallel=TorchDistributed(self.rank, self.world_size))
        with torch.no_grad():
            checksum = sum(float(p.double().sum()) for p in loaded.model.parameters()
                           if p.requires_grad)
        torch.distributed.destroy_process_group()
        return result, checksum


def train_data_parallel(ray: Any, plan: FinetuneRun, processor: LogprobProcessor | None,
                        on_event: Callable[[TrainingEvent], None]) -> TrainingResult:
    """Train ``plan`` on ``plan.num_devices`` Ray workers (module docstring); rank 0's result.
    Checkpoints go to ``plan.output_dir / "checkpoints"`` from rank 0's node (shared storage
    on a cluster of several machines: every rank reads it back when the run resumes).

    Raises:
        LogprobProcessorError: the cluster cannot hold ``num_devices`` workers with
            ``worker_resources``.
        DataParallelError: a worker failed to start or join, or the ranks' adapters differ.
        LMForgeError: whatever ``trainer.train`` raises on a worker.
    """
    from ray.util.queue import Queue

    n = plan.num_devices
    options = ray_options(plan.worker_resources)
    check_resources(ray, options, n, f"num_devices: {n} (each worker with worker_resources)")
    actor = ray.remote(TrainingRank).options(max_restarts=0, **options)
    ranks = [actor.remote(rank, n, int(options["num_cpus"])) for rank in range(n)]
    events = Queue(actor_options={"num_cpus": 0})
    try:
        try:
            host, port = ray.get(ranks[0].endpoint.remote())
            ray.get([rank.join.remote(host, port) for rank in ranks])
        except ray.exceptions.RayError as e:
            raise DataParallelError(f"the {n} data-parallel training workers did not start: "
                                    f"{e}") from None
        runs = [rank.train.remote(plan, processor, events if i == 0 else None)
                for i, rank in enumerate(ranks)]
        outputs = _follow(ray, runs, events, on_event)
    finally:
        events.shutdown(force=True)
        for rank in ranks:
            ray.kill(rank)
    return _checked(outputs, on_event)


def _follow(ray: Any, runs: list[Any], events: Any, on_event: Callable[[TrainingEvent], None]
            ) -> list[tuple[TrainingResult, float]]:
    """Forward ``events`` to ``on_event`` until every run is done; the first failed run raises
    its error at once (the caller kills the others, which would wait for it forever)."""
    while True:
        done, _ = ray.wait(runs, num_returns=len(runs), timeout=0.2)
        for event in events.get_nowait_batch(events.qsize()):
            on_event(event)
        for ref in done:
            ray.get(ref)  # raises the worker's error
        if len(done) == len(runs):
            return ray.get(runs)


def _checked(outputs: list[tuple[TrainingResult, float]],
             on_event: Callable[[TrainingEvent], None]) -> TrainingResult:
    """Rank 0's result, once every rank's adapter checksum matches rank 0's."""
    sums = [checksum for _, checksum in outputs]
    if not all(math.isclose(s, sums[0], rel_tol=1e-6, abs_tol=1e-9) for s in sums):
        raise DataParallelError(f"the data-parallel ranks ended with different adapters "
                                f"(weight sums {sums}); this is a bug, please report it")
    on_event(MessageEvent(f"{len(outputs)} data-parallel workers ended with the same adapter "
                          f"(weight sum {sums[0]:.6g})"))
    return outputs[0][0]
