"""Supervised fine-tuning (SFT): the negative log-likelihood of each example's completion.

The examples are ``data.Example`` rows (prompt ids, completion ids) read by
``data.read_examples``; ``collate`` pads them on the right into an ``SFTBatch`` whose labels
mask the prompt and the padding, and ``loss`` is ``losses.sft_loss`` summed over the predicted
completion tokens (the loop divides by the step's count, so every token weighs the same with
gradient accumulation). Causal language modelling as in transformers' ``ForCausalLMLoss`` and
TRL's ``SFTTrainer`` with ``completion_only_loss``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmforge.training.data import Example, read_examples
from lmforge.training.forward import label_logps
from lmforge.training.losses import IGNORE_INDEX
from lmforge.training.methods.base import LossOutput, TrainingMethod


@dataclass
class SFTBatch:
    """A right-padded SFT micro-batch. All tensors are (B, T), T the longest example's length."""

    input_ids: torch.Tensor  # int64, pad_id after each example's tokens
    labels: torch.Tensor  # int64, the completion's ids where they are; IGNORE_INDEX elsewhere
    attention_mask: torch.Tensor  # int64, 1 on tokens, 0 on padding

    @property
    def num_items(self) -> int:
        """Labelled tokens the loss predicts (a row's first token is never predicted)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        """Prompt and completion tokens, padding excluded."""
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> SFTBatch:
        """The same batch with its tensors on ``device``."""
        return SFTBatch(self.input_ids.to(device), self.labels.to(device),
                        self.attention_mask.to(device))


def collate(examples: Sequence[Example], pad_id: int) -> SFTBatch:
    """Pad ``examples`` on the right into one ``SFTBatch``.

    Example: prompt [5, 6], completion [7, 2] and prompt [5], completion [8] with pad 0 give
    ``input_ids [[5, 6, 7, 2], [5, 8, 0, 0]]``, ``labels [[-100, -100, 7, 2], [-100, 8, -100,
    -100]]``, ``attention_mask [[1, 1, 1, 1], [1, 1, 0, 0]]``.
    """
    width = max(e.num_tokens for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        p, n = len(e.prompt_ids), e.num_tokens
        input_ids[row, :n] = torch.tensor(e.prompt_ids + e.completion_ids)
        labels[row, p:n] = torch.tensor(e.completion_ids)
        attention_mask[row, :n] = 1
    return SFTBatch(input_ids, labels, attention_mask)


def loss(model: torch.nn.Module, batch: SFTBatch, config: object = None) -> LossOutput:
    """(summed negative log-likelihood of the completion tokens, their count, no metrics); SFT
    has no hyperparameters of its own, so ``config`` is unused.

    Returns:
        A float32 scalar with a gradient, and ``batch.num_items``; the mean per token is
        ``loss / num_items``, which equals ``sft_loss(logits, batch.labels)``.
    """
    logps, _ = label_logps(model, batch.input_ids, batch.attention_mask, batch.labels)
    return LossOutput(-logps.sum(), batch.num_items)  # the summed NLL; LM head on labels only


SFT = TrainingMethod(name="sft", read_examples=read_examples, collate=collate, loss=loss)
