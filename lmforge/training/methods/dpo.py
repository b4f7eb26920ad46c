"""Direct Preference Optimization (DPO; Rafailov et al. 2023): raise the policy's log-probability
of each preferred answer against the non-preferred one, relative to a frozen reference model.

The examples are ``preferences.PreferenceExample`` pairs (``preferences.read_preferences``).
``collate`` pads every pair's two sequences into one batch, chosen rows first
(``[chosen; rejected]``, split with ``.chunk(2)``), with SFT's right padding and prompt masking;
``loss`` sums ``losses.dpo_loss`` over the pairs (``config.beta``, ``config.dpo_loss_type``,
``config.label_smoothing``). The reference model is the policy with its LoRA adapter switched
off (``models.lora.lora_disabled``): the same weights, no second copy. Its log-probs come from
the batch when they were computed ahead of training (TRL's ``precompute_ref_log_probs``), else
from a no-grad forward here. Log-probs are summed over the answer's tokens (averaged for IPO,
as TRL does), the prompt masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmforge.models.lora import lora_disabled
from lmforge.training.data import Example
from lmforge.training.forward import causal_lm_logits
from lmforge.training.losses import dpo_loss, sequence_logps
from lmforge.training.methods import sft
from lmforge.training.methods.base import TrainingMethod
from lmforge.training.preferences import PreferenceExample, read_preferences


@dataclass
class DPOBatch:
    """B pairs as 2B right-padded rows, chosen first: tensors (2B, T); the reference log-probs
    (B,) each when computed ahead, else None."""

    input_ids: torch.Tensor
    labels: torch.Tensor  # the answers' ids; IGNORE_INDEX on prompts and padding
    attention_mask: torch.Tensor
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None

    @property
    def num_items(self) -> int:
        """Pairs: the loss is summed over pairs."""
        return self.input_ids.shape[0] // 2

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> DPOBatch:
        def move(t):
            return None if t is None else t.to(device)
        return DPOBatch(move(self.input_ids), move(self.labels), move(self.attention_mask),
                        move(self.ref_chosen_logps), move(self.ref_rejected_logps))


def collate(examples: Sequence[PreferenceExample], pad_id: int) -> DPOBatch:
    """Pad ``examples`` into one ``DPOBatch``: rows 0..B-1 are prompt + chosen, rows B..2B-1
    prompt + rejected, padded on the right as ``methods.sft.collate`` pads."""
    rows = ([Example(e.prompt_ids, e.chosen_ids, e.line) for e in examples]
            + [Example(e.prompt_ids, e.rejected_ids, e.line) for e in examples])
    padded = sft.collate(rows, pad_id)
    return DPOBatch(padded.input_ids, padded.labels, padded.attention_mask)


def sequence_logps_of(model: torch.nn.Module, batch: DPOBatch, average: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed (or averaged) answer log-probs under ``model``, (B,) each."""
    logits = causal_lm_logits(model, batch.input_ids, batch.attention_mask)  # (2B, T, V)
    return sequence_logps(logits, batch.labels, average=average).chunk(2)


def loss(model: torch.nn.Module, batch: DPOBatch, config) -> tuple[torch.Tensor, int]:
    """(the DPO losses summed over the pairs, the number of pairs).

    ``config``: the run's ``TrainingConfig`` (``beta``, ``dpo_loss_type``, ``label_smoothing``).
    """
    average = config.dpo_loss_type == "ipo"
    chosen, rejected = sequence_logps_of(model, batch, average)
    if batch.ref_chosen_logps is not None and batch.ref_rejected_logps is not None:
        ref_chosen, ref_rejected = batch.ref_chosen_logps, batch.ref_rejected_logps
    else:
        with torch.no_grad(), lora_disabled(model):
            ref_chosen, ref_rejected = sequence_logps_of(model, batch, average)
    out = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=config.beta,
                   loss_type=config.dpo_loss_type, label_smoothing=config.label_smoothing)
    return out.losses.sum(), batch.num_items


DPO = TrainingMethod(name="dpo", read_examples=read_preferences, collate=collate, loss=loss)
