"""OpenAI's ``"auto"`` fine-tuning hyperparameters, picked from the data size for LoRA.

OpenAI resolves ``n_epochs``, ``batch_size`` and ``learning_rate_multiplier`` left ``"auto"``
from the number of training examples when it validates the files, and the job object shows the
numbers from then on. ``auto_hyperparameters`` is that rule here, in three steps:

1. ``batch_size``: ~0.2% of the examples, at least 1 and at most 256 (OpenAI's documented
   default), so an epoch is ~500 optimizer steps once there are more than ~750 examples.
2. ``n_epochs``: the OpenAI cookbook's rule (``chat_finetuning_data_prep``): 3 epochs, more for
   a small file so that it makes at least 100 example passes, fewer for a large one so that it
   makes at most 25,000, within 1..25. Then raised (up to 25) until the run makes at least
   ``MIN_STEPS`` optimizer steps.
3. ``learning_rate_multiplier`` (the peak rate is ``learning_rate * multiplier``, base 2e-4):
   ``sqrt(batch_size)`` between 1 and 4 (the square-root scaling rule for Adam, Malladi et al.
   2022, arXiv:2205.10287; OpenAI's own multiplier also grows with the batch size), times
   ``MIN_STEPS / steps`` when explicit values leave fewer steps than ``MIN_STEPS``; at most 10.
   A ``learning_rate`` given without a multiplier is the rate wanted: the multiplier is then 1.

Why ``MIN_STEPS`` = 100 and the 2e-4 base (QLoRA's LoRA rate, Dettmers et al. 2023): measured
on SmolLM2-135M-Instruct, LoRA r=8, warmup + cosine, 43 training rows whose response is one
fixed sentence (``tests/server/test_fine_tune_smollm2.py``), what is learned tracks the peak
rate times the optimizer steps: 2e-4 x 129 steps (batch 1), 4e-4 x 99 (batch 4), 4.65e-4 x 43,
1e-3 x 33 and 1.2e-3 x 33 all answer held-out prompts with the sentence (validation loss
<= 0.013); 2e-4 x 33 (the former fixed defaults: batch 4, 3 epochs), 2e-4 x 43 (loss 1.77) and
4e-4 x 33 (2 of 4 prompts) do not. So ~100 steps at the base rate, or the same product, is the
least that teaches a short fixed answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# the OpenAI cookbook's default-epochs rule
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100  # example passes a small file gets at least
MAX_TARGET_EXAMPLES = 25_000  # example passes a large file gets at most
MIN_EPOCHS, MAX_EPOCHS = 1, 25
# OpenAI's default batch size: ~0.2% of the examples, capped at 256
BATCH_FRACTION = 0.002
MAX_BATCH_SIZE = 256
# lmforge's LoRA adaptation (the module docstring's measurements)
MIN_STEPS = 100  # optimizer steps a run makes at least (or makes up for with a higher rate)
MAX_BATCH_LR_FACTOR = 4.0  # sqrt(batch_size) stops growing at batch 16
MAX_MULTIPLIER = 10.0  # the API's upper bound on learning_rate_multiplier


@dataclass(frozen=True)
class ResolvedHyperparameters:
    """OpenAI's three hyperparameters as numbers, and the optimizer steps they make."""

    n_epochs: int
    batch_size: int  # examples per optimizer step
    learning_rate_multiplier: float  # the peak rate is the base learning_rate times this
    steps: int  # optimizer steps of the whole run: n_epochs * ceil(n_examples / batch_size)


def auto_hyperparameters(n_examples: int, *, n_epochs: int | None = None,
                         batch_size: int | None = None,
                         learning_rate_multiplier: float | None = None,
                         learning_rate_given: bool = False) -> ResolvedHyperparameters:
    """Fill in the hyperparameters left ``None`` ("auto") for ``n_examples`` training examples.

    Given values are kept as they are. The rule is the module docstring's; for example
    (``None`` everywhere but the count): 43 examples -> 3 epochs, batch 1, multiplier 1.0 (129
    steps); 30 -> 4, 1, 1.0 (120: the cookbook's 3 epochs make 90 steps); 1,000 -> 3, 2, 1.41;
    10,000 -> 2, 20, 4.0; 200,000 -> 1, 256, 4.0. With ``batch_size=4`` 43 examples get 10 epochs
    (110 steps) and multiplier 2.0; with ``n_epochs=3, batch_size=4`` (33 steps) 6.06.

    Args:
        n_examples: the examples trained on (after any validation hold-out).
        learning_rate_given: the job sets lmforge's ``learning_rate``; an auto multiplier is 1.

    Raises:
        ValueError: ``n_examples`` below 1.
    """
    if n_examples < 1:
        raise ValueError(f"n_examples ({n_examples}) must be at least 1")
    if batch_size is None:
        batch_size = min(MAX_BATCH_SIZE, max(1, round(BATCH_FRACTION * n_examples)))
    steps_per_epoch = math.ceil(n_examples / batch_size)
    if n_epochs is None:
        n_epochs = min(MAX_EPOCHS, max(cookbook_epochs(n_examples),
                                       math.ceil(MIN_STEPS / steps_per_epoch)))
    steps = n_epochs * steps_per_epoch
    if learning_rate_multiplier is None:
        learning_rate_multiplier = 1.0
        if not learning_rate_given:
            factor = min(MAX_BATCH_LR_FACTOR, math.sqrt(batch_size)) * max(1.0, MIN_STEPS / steps)
            learning_rate_multiplier = float(f"{min(MAX_MULTIPLIER, factor):.3g}")
    return ResolvedHyperparameters(n_epochs, batch_size, learning_rate_multiplier, steps)


def cookbook_epochs(n_examples: int) -> int:
    """The OpenAI cookbook's default epochs (``chat_finetuning_data_prep``, verbatim):
    ``TARGET_EPOCHS``, or ``MIN_TARGET_EXAMPLES // n`` (at most 25) for a small file, or
    ``MAX_TARGET_EXAMPLES // n`` (at least 1) for a large one. E.g. 10 -> 10, 43 -> 3,
    10,000 -> 2."""
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_EPOCHS, MIN_TARGET_EXAMPLES // n_examples)
    if n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return TARGET_EPOCHS
