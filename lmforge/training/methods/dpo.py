"""Direct Preference Optimization (DPO; Rafailov et al. 2023): raise the policy's log-probability
of each preferred answer against the non-preferred one, relative to a frozen reference model.

The examples are ``preferences.PreferenceExample`` pairs (``preferences.read_preferences``).
``collate`` pads every pair's two sequences into one batch, chosen rows first
(``[chosen; rejected]``, split with ``.chunk(2)``), with SFT's right padding and prompt masking;
``loss`` sums ``losses.dpo_loss`` over the pairs (``config.beta``, ``config.dpo_loss_type``,
``config.label_smoothing``), plus ``config.rpo_alpha`` times each chosen answer's mean token NLL
(RPO, TRL's ``rpo_alpha``; why it is on by default: ``TrainingConfig.rpo_alpha``), and TRL's
metrics (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected``, ``nll_loss``).

The reference model is the base the adapter is trained on: the same weights, no second copy.
``prepare`` computes its log-probs of every pair once, before training (TRL's
``precompute_ref_log_probs``; the seed's "reference model log-probability calculation" apart from
training), with the training forward under ``no_grad`` in eval mode, longest pairs first in
batches of ``REFERENCE_BATCH_PAIRS``, and saves them in the run's directory, so a run that
resumes after a restart reads them back (``benchmarks/dpo.py`` measures this path against the
serving engine's prompt-logprob path). Pairs without them (a caller's own examples) get them
from a no-grad forward with the adapter switched off (``models.lora.lora_disabled``) inside
``loss``. Log-probs are summed over the answer's tokens (averaged for IPO, as TRL does), the
prompt masked.

Or other workers compute them while training runs (seed 002's "logprob processor": Anyscale's
llmforge overlaps the reference model's log-probs with training on their own Ray workers):
``prepare`` given a ``ReferenceLogprobs`` (``lmforge.cluster.reference_logprobs`` implements it
on Ray actors; training never imports the cluster) submits every pair to it in the order the
first epoch visits them and returns at once; each pair carries a ``PendingReference``, and
``loss`` waits for a batch's own pairs only. Those log-probs are not saved: a resumed run asks
for them again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from lmforge.models.lora import lora_disabled
from lmforge.training.data import Example, epoch_order
from lmforge.training.events import MessageEvent
from lmforge.training.forward import label_logps
from lmforge.training.losses import dpo_loss
from lmforge.training.methods import sft
from lmforge.training.methods.base import LossOutput, TrainingMethod
from lmforge.training.preferences import (
    PendingReference,
    PreferenceExample,
    read_preferences,
)

REFERENCE_BATCH_PAIRS = 8  # pairs per no-grad forward of the reference pass


class ReferenceLogprobs(Protocol):
    """Computes reference log-probs of pairs elsewhere while the loop trains (the seed's
    "logprob processor"; ``lmforge.cluster.reference_logprobs.LogprobProcessor`` on Ray)."""

    def submit(self, examples: Sequence[PreferenceExample], average: bool
               ) -> list[PendingReference]:
        """Start computing each pair's answer log-probs under the base model without any
        adapter, exactly as ``reference_logps`` (summed over the answer's tokens, averaged when
        ``average``), in the order given, and return at once: one promise per pair, in order."""
        ...


@dataclass
class DPOBatch:
    """B pairs as 2B right-padded rows, chosen first: tensors (2B, T); the reference log-probs
    (B,) float32 each when computed ahead, else None."""

    input_ids: torch.Tensor
    labels: torch.Tensor  # the answers' ids; IGNORE_INDEX on prompts and padding
    attention_mask: torch.Tensor
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    ref_pending: list[PendingReference] | None = None  # (B,) promises of those two, else None

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
                        move(self.ref_chosen_logps), move(self.ref_rejected_logps),
                        self.ref_pending)


def collate(examples: Sequence[PreferenceExample], pad_id: int) -> DPOBatch:
    """Pad ``examples`` into one ``DPOBatch``: rows 0..B-1 are prompt + chosen, rows B..2B-1
    prompt + rejected, padded on the right as ``methods.sft.collate`` pads; the reference
    log-probs come along when every pair has them (or their promises, ``ref_pending``)."""
    rows = ([Example(e.prompt_ids, e.chosen_ids, e.line) for e in examples]
            + [Example(e.prompt_ids, e.rejected_ids, e.line) for e in examples])
    padded = sft.collate(rows, pad_id)
    batch = DPOBatch(padded.input_ids, padded.labels, padded.attention_mask)
    if all(e.ref_chosen_logp is not None for e in examples):
        batch.ref_chosen_logps = torch.tensor([e.ref_chosen_logp for e in examples])
        batch.ref_rejected_logps = torch.tensor([e.ref_rejected_logp for e in examples])
    elif all(e.ref_pending is not None for e in examples):
        batch.ref_pending = [e.ref_pending for e in examples]  # type: ignore[misc]
    return batch


def answer_logps(model: torch.nn.Module, batch: DPOBatch
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's summed answer log-prob under ``model`` and its answer tokens: (2B,) each,
    chosen rows first; ``summed / count`` is the mean per token (IPO's, and the NLL's)."""
    token, mask = label_logps(model, batch.input_ids, batch.attention_mask,
                              batch.labels)  # (2B, T-1) each
    return token.sum(-1), mask.sum(-1).clamp(min=1)


def sequence_logps_of(model: torch.nn.Module, batch: DPOBatch, average: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed (or averaged) answer log-probs under ``model``, (B,) each."""
    summed, count = answer_logps(model, batch)
    return (summed / count if average else summed).chunk(2)


def loss(model: torch.nn.Module, batch: DPOBatch, config) -> LossOutput:
    """The DPO losses summed over the pairs, the number of pairs, and TRL's metrics summed over
    the pairs.

    ``config``: the run's ``TrainingConfig`` (``beta``, ``dpo_loss_type``, ``label_smoothing``,
    ``rpo_alpha``).
    """
    average = config.dpo_loss_type == "ipo"
    summed, count = answer_logps(model, batch)  # one forward: the pairs and the NLL term
    chosen, rejected = (summed / count if average else summed).chunk(2)
    ref_chosen, ref_rejected = reference_of(model, batch, average)
    out = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=config.beta,
                   loss_type=config.dpo_loss_type, label_smoothing=config.label_smoothing)
    chosen_nll = -(summed / count).chunk(2)[0]  # each chosen answer's mean token NLL, (B,)
    # RPO (Pang et al. 2024; TRL's rpo_alpha): + alpha * that NLL; 0 = plain DPO
    losses = out.losses + config.rpo_alpha * chosen_nll if config.rpo_alpha else out.losses
    margins = out.chosen_rewards - out.rejected_rewards
    metrics = {"rewards/chosen": out.chosen_rewards.sum().item(),
               "rewards/rejected": out.rejected_rewards.sum().item(),
               "rewards/accuracies": (margins > 0).float().sum().item(),
               "rewards/margins": margins.sum().item(),
               "logps/chosen": chosen.detach().sum().item(),
               "logps/rejected": rejected.detach().sum().item(),
               "nll_loss": chosen_nll.detach().sum().item()}
    return LossOutput(losses.sum(), batch.num_items, metrics)


def reference_of(model: torch.nn.Module, batch: DPOBatch, average: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's reference (chosen, rejected) log-probs, (B,) each: those it carries, else
    those its promises give (waiting for the workers computing them), else computed here by a
    no-grad forward with the adapter off."""
    if batch.ref_chosen_logps is not None and batch.ref_rejected_logps is not None:
        return batch.ref_chosen_logps, batch.ref_rejected_logps
    if batch.ref_pending is not None:
        pairs = torch.tensor([p.result() for p in batch.ref_pending])  # (B, 2) float32
        return pairs[:, 0].to(batch.input_ids.device), pairs[:, 1].to(batch.input_ids.device)
    with torch.no_grad(), lora_disabled(model):
        return sequence_logps_of(model, batch, average)


def prepare(model: torch.nn.Module, examples: list[PreferenceExample], config, pad_id: int,
            cache: Path, emit: Callable[[MessageEvent], None],
            should_stop: Callable[[], bool] = lambda: False,
            reference: ReferenceLogprobs | None = None) -> list[PreferenceExample] | None:
    """``examples`` with the reference model's log-probs (``ref_chosen_logp``,
    ``ref_rejected_logp``), read from ``cache`` when it holds them for exactly these token ids
    and this loss type, else computed (``reference_logps``) and saved there (a temporary file,
    then a rename). ``model`` is the reference: the base, before the adapter is added (or the
    policy; the adapter is switched off). None when ``should_stop`` ended the pass.

    With ``reference`` and no saved log-probs, the pairs are submitted to it instead
    (``submit_reference``): they come back at once, each with its ``ref_pending`` promise."""
    average = config.dpo_loss_type == "ipo"
    key = fingerprint(examples, average)
    saved = torch.load(cache, weights_only=True) if cache.is_file() else None
    if saved is not None and saved.get("fingerprint") == key:
        logps = saved["logps"]
        emit(MessageEvent(f"Reference log-probs of {len(examples)} pairs read from {cache.name} "
                          "(computed before a restart, not again)"))
    elif reference is not None:
        return submit_reference(reference, examples, config, emit)
    else:
        start = time.perf_counter()
        logps = reference_logps(model, examples, pad_id, average, should_stop)
        if logps is None:
            return None
        seconds = time.perf_counter() - start
        tokens = sum(e.num_tokens for e in examples)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"fingerprint": key, "logps": logps}, cache.with_suffix(".tmp"))
        os.replace(cache.with_suffix(".tmp"), cache)
        emit(MessageEvent(f"Reference log-probs of {len(examples)} pairs computed in "
                          f"{seconds:.1f} s ({tokens / seconds:,.0f} tokens/s)"))
    return [dataclasses.replace(e, ref_chosen_logp=float(c), ref_rejected_logp=float(r))
            for e, (c, r) in zip(examples, logps.tolist(), strict=True)]


def submit_reference(reference: ReferenceLogprobs, examples: list[PreferenceExample], config,
                     emit: Callable[[MessageEvent], None]) -> list[PreferenceExample]:
    """``examples`` (in their order) each with its ``ref_pending`` promise from ``reference``,
    to which they are submitted in the order the loop's first epoch visits them
    (``data.epoch_order``), so that the first batches' log-probs are the first computed."""
    order = epoch_order(len(examples), config.seed, 0)
    pending = reference.submit([examples[i] for i in order], config.dpo_loss_type == "ipo")
    promise = dict(zip(order, pending, strict=True))
    emit(MessageEvent(f"Reference log-probs of {len(examples)} pairs: computed by {reference} "
                      "while training runs"))
    return [dataclasses.replace(e, ref_pending=promise[i]) for i, e in enumerate(examples)]


@torch.no_grad()
def reference_logps(model: torch.nn.Module, examples: Sequence[PreferenceExample], pad_id: int,
                    average: bool = False, should_stop: Callable[[], bool] = lambda: False
                    ) -> torch.Tensor | None:
    """Answer log-probs of every pair under ``model`` with any LoRA adapter off, in eval mode:
    (N, 2) float32, column 0 the chosen answer's, column 1 the rejected's, rows in the order of
    ``examples``. Batches of ``REFERENCE_BATCH_PAIRS``, longest pairs first (least padding);
    None when ``should_stop()`` (polled before each batch) said so."""
    order = sorted(range(len(examples)), key=lambda i: -examples[i].num_tokens)
    out = torch.empty(len(examples), 2)
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    try:
        with lora_disabled(model):
            for s in tqdm(range(0, len(order), REFERENCE_BATCH_PAIRS), desc="Reference log-probs",
                          unit="batch"):
                if should_stop():
                    return None
                rows = order[s:s + REFERENCE_BATCH_PAIRS]
                batch = collate([examples[i] for i in rows], pad_id)
                chosen, rejected = sequence_logps_of(model, batch.to(device), average)
                out[rows] = torch.stack([chosen, rejected], dim=1).float().cpu()
    finally:
        model.train(was_training)
    return out


def fingerprint(examples: Sequence[PreferenceExample], average: bool) -> str:
    """A hash of the pairs' token ids and the averaging: what the saved log-probs are of."""
    digest = hashlib.sha256(json.dumps(average).encode())
    for e in examples:
        digest.update(json.dumps([e.prompt_ids, e.chosen_ids, e.rejected_ids]).encode())
    return digest.hexdigest()


DPO = TrainingMethod(name="dpo", read_examples=read_preferences, collate=collate, loss=loss,
                     prepare=prepare)
