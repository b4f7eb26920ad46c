"""Data-parallel hooks of the training loop: what ``trainer.train(..., parallel=...)`` needs to
run as one rank of several, each training the same LoRA adapter on its share of every step.

The loop stays the single-process loop (``parallel=None`` changes nothing). With a
``DataParallel`` of ``world_size`` W, an optimizer step is ``gradient_accumulation_steps * W``
micro-batches of ``batch_size`` (Anyscale llmforge's global batch:
``train_batch_size_per_device * num_devices * gradient_accumulation_steps``); every rank collates
the whole step (cheap, on the CPU) and forwards/backwards micro-batches ``rank, rank + W, ...``
of it (``my_share``). Each micro-batch's summed loss is divided by the items of the whole step,
as in one process, so the sum over ranks of their adapter gradients (``sync_grads``, an
all-reduce) is exactly the gradient one process gets from the same step's micro-batches: every
rank then clips and steps the same gradient and keeps the same adapter (same seed, same LoRA
init). The step's loss and the method's metric sums are summed over the ranks too
(``sum_over_ranks``), and so is validation, which each rank runs on its share of the batches.
Rank 0 writes the checkpoints (``writes_files``); the caller gives only rank 0 an ``on_event``.

This is PyTorch DDP's arithmetic (``DistributedDataParallel`` all-reduces averaged gradients;
here the loss is already normalized by the global count, so the all-reduce sums), done by hand
because only the LoRA weights (a few MB) have gradients: one flat all-reduce per step.
``TorchDistributed`` implements it over an initialized ``torch.distributed`` process group
(``lmforge.cluster.data_parallel`` starts one on Ray workers); training never imports Ray.
LoRA dropout draws its masks from each rank's generator, so with dropout the ranks' masks differ
from one process's (as with DDP); without dropout the ranks reproduce one process up to float
summation order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

T = TypeVar("T")


class DataParallel(Protocol):
    """This process's place among ``world_size`` training ranks, and the collectives the loop
    needs. Every rank must call them in the same order (they block until all ranks do)."""

    rank: int  # 0..world_size-1; rank 0 writes checkpoints and emits events
    world_size: int

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Replace ``tensor`` (any shape, float) by its sum over the ranks, in place."""
        ...

    def sum_dicts(self, values: dict[str, float]) -> dict[str, float]:
        """The per-key sum of every rank's ``values`` (a key a rank lacks counts as 0): the
        same dict on every rank."""
        ...


@dataclass
class TorchDistributed:
    """``DataParallel`` over the default ``torch.distributed`` process group (gloo on the CPU,
    NCCL on GPUs), which the caller has initialized (``init_process_group``)."""

    rank: int
    world_size: int

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """``torch.distributed.all_reduce`` with SUM, in place."""
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)

    def sum_dicts(self, values: dict[str, float]) -> dict[str, float]:
        """Gathers every rank's dict (``all_gather_object``: a few floats) and sums per key."""
        gathered: list[dict[str, float] | None] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, values)
        total: dict[str, float] = {}
        for part in gathered:
            for name, value in (part or {}).items():
                total[name] = total.get(name, 0.0) + value
        return total


class MetricSums(dict):
    """Sums of per-item quantities over micro-batches (``LossOutput.metrics``: name -> float),
    and their means per item."""

    def add(self, metrics: dict[str, float]) -> None:
        """Add one micro-batch's sums."""
        for name, value in metrics.items():
            self[name] = self.get(name, 0.0) + value

    def means(self, num_items: int) -> dict[str, float]:
        """Each sum divided by ``num_items`` (at least 1)."""
        return {name: total / max(num_items, 1) for name, total in self.items()}


def world_size(parallel: DataParallel | None) -> int:
    """Ranks training together: 1 without ``parallel``."""
    return 1 if parallel is None else parallel.world_size


def writes_files(parallel: DataParallel | None) -> bool:
    """Whether this process writes checkpoints: the only process, or rank 0."""
    return parallel is None or parallel.rank == 0


def my_share(items: Sequence[T], parallel: DataParallel | None) -> Sequence[T]:
    """This rank's items: ``items[rank::world_size]`` (interleaved), all of them alone.
    E.g. 5 micro-batches on 2 ranks: rank 0 takes 0, 2, 4 and rank 1 takes 1, 3."""
    return items if parallel is None else items[parallel.rank::parallel.world_size]


def sync_grads(parallel: DataParallel | None, params: list[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over the ranks, in place, with one flat all-reduce; a
    rank whose share of the step was empty contributes zeros (its ``grad`` is None)."""
    if parallel is None or not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params])
    parallel.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def sum_over_ranks(parallel: DataParallel | None, values: dict[str, float]
                   ) -> dict[str, float]:
    """``values`` summed over the ranks (``DataParallel.sum_dicts``); ``values`` alone."""
    return dict(values) if parallel is None else parallel.sum_dicts(values)
