"""What a training method is: a reader, a collator and a loss, run by the one loop in ``trainer``.

A method turns a file into examples (``read_examples``), a list of examples into one
``MicroBatch`` (``collate``), and a micro-batch into a summed loss (``loss(model, batch, config)
-> LossOutput(loss, num_items, metrics)``; ``config`` is the run's ``TrainingConfig``, where a
method finds its own hyperparameters, e.g. DPO's ``beta``). The loop knows nothing else about
it: it shuffles the examples, cuts them into micro-batches of ``batch_size``, normalizes each
micro-batch's loss by the items of the whole optimizer step (gradient accumulation), and divides
the validation loss sum, and every metric's sum, by its items. A method that needs a pass over
its data before training (DPO's reference log-probs) gives ``prepare``; the loop calls it once
per dataset before the adapter is added, and the method keeps what it computed with the run.
This is TRL's shape (a data collator plus a ``compute_loss``), with the loss a plain function.

A loss takes everything it needs from the model and the batch. A method whose loss needs more
than the policy's logits carries it in its batch: DPO's collator puts the chosen and rejected
completions in one batch (``[chosen; rejected]``, split with ``.chunk(2)``) and, where the
reference log-probs were computed ahead of training (TRL's ``precompute_ref_log_probs``), the
batch holds them too (``ref_chosen_logps``, ``ref_rejected_logps``, (B,) each); otherwise the
loss computes them itself with the adapter disabled (the reference model is the same weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch


class MicroBatch(Protocol):
    """What the loop reads from any method's batch: one forward/backward's worth of examples
    (``batch_size`` of them; ``gradient_accumulation_steps`` micro-batches make an optimizer
    step, DeepSpeed's and Megatron's "micro-batch")."""

    @property
    def num_items(self) -> int:
        """What the loss is summed over (SFT: predicted completion tokens; DPO: pairs), the
        count ``loss`` returns; known before the forward, so that every micro-batch of a step is
        divided by the whole step's count (transformers' ``num_items_in_batch``)."""
        ...

    @property
    def num_tokens(self) -> int:
        """Tokens in the batch, padding excluded (the job's ``trained_tokens``)."""
        ...

    def to(self, device: torch.device) -> MicroBatch:
        """The same batch with its tensors on ``device``."""
        ...


class LossOutput(NamedTuple):
    """What a method's ``loss`` returns for one micro-batch."""

    loss: torch.Tensor  # float32 scalar: the SUM of the per-item losses (the loop divides)
    num_items: int  # the items summed (``batch.num_items``)
    metrics: dict[str, float] = {}  # more per-item quantities, summed over the items (floats)


ReadExamples = Callable[..., list[Any]]  # (path, tokenizer, max_seq_len, *, min_rows, param)
Collate = Callable[[Sequence[Any], int], MicroBatch]  # (examples, pad_id) -> batch
Loss = Callable[[torch.nn.Module, Any, Any], LossOutput]  # (model, batch, config)
# (model, examples, config, pad_id, cache, emit, should_stop) -> examples, or None when stopped
Prepare = Callable[..., list[Any] | None]


@dataclass(frozen=True)
class TrainingMethod:
    """One way of training, chosen by ``name`` (``TrainingConfig.method``).

    Attributes:
        name: the registry key, e.g. ``"sft"``.
        read_examples: ``(path, tokenizer, max_seq_len, *, min_rows, param) -> examples``;
            raises ``data.DataError`` naming the line of a bad row.
        collate: ``(examples, pad_id) -> MicroBatch``, on the CPU.
        loss: ``(model, batch, config) -> LossOutput``: the SUM of the per-item losses (the
            loop divides), the number of items summed (``batch.num_items``) and the sums of
            the method's metrics (logged under their names, e.g. TRL's ``rewards/chosen``).
            Called in train and eval mode; it must not step anything.
        prepare: None, or ``(model, examples, config, pad_id, cache, emit, should_stop) ->
            examples``: a pass over one dataset before training, on the base model (no adapter
            yet), whose result the method stores in ``cache`` (a file path in the run's
            directory) and reads back instead of recomputing when the run resumes; ``emit``
            takes ``events.MessageEvent``s; ``should_stop`` is polled between batches, and
            True makes it return None (a cancelled job or a stopping server does not wait for
            the whole pass). A method may take a keyword ``reference`` too, which ``train``
            passes on when its caller gives one (DPO: ``dpo.ReferenceLogprobs``, the reference
            log-probs computed elsewhere while training runs).
    """

    name: str
    read_examples: ReadExamples
    collate: Collate
    loss: Loss
    prepare: Prepare | None = None

