"""Pure loss functions of the training methods: tensors in, a tensor out, no model, no state.

A training method is a collator plus one of these (TRL's shape): ``sft_loss`` for supervised
fine-tuning; ``sequence_logps`` and ``dpo_loss`` for the preference methods (DPO compares the
summed log-probs of chosen and rejected completions under the policy and the reference model).

Shapes: ``logits`` (B, T, V) are the model's outputs at every position of a (B, T) batch;
``labels`` (B, T) are the input ids with ``IGNORE_INDEX`` (-100) wherever no loss is taken
(prompt tokens, padding). Position t's logits predict token t + 1, so every function here
compares ``logits[:, :-1]`` with ``labels[:, 1:]`` (the shift by one of causal language
modelling; Hugging Face's ``ForCausalLMLoss`` does the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of a position without loss: PyTorch's cross_entropy default


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Log-probability of one chosen token per position, without the (…, V) log-softmax tensor.

    Args:
        logits: (..., V) unnormalized scores.
        index: (...) int64 token ids in ``[0, V)``.

    Returns:
        (...) float32 ``log softmax(logits)[..., index]``. The naive equivalent (and the test
        oracle): ``torch.gather(logits.float().log_softmax(-1), -1, index.unsqueeze(-1))
        .squeeze(-1)``; computed as ``logits[index] - logsumexp(logits)``, which never holds a
        second (..., V) tensor (TRL's ``selective_log_softmax``).
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _shifted(logits: torch.Tensor, labels: torch.Tensor):
    """(logits (B, T-1, V), targets (B, T-1) with ignored positions set to 0, mask (B, T-1))."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
                         "must agree on (batch, sequence)")
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return logits[:, :-1], targets.masked_fill(~mask, 0), mask


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the labelled tokens, and their mask.

    Returns:
        ``(logps (B, T-1) float32, mask (B, T-1) bool)``: ``logps[b, t]`` is
        ``log p(labels[b, t+1] | tokens <= t)``, 0 where ``mask`` is False (ignored labels).
    """
    shifted, targets, mask = _shifted(logits, labels)
    return selective_log_softmax(shifted, targets) * mask, mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor,
                   average: bool = False) -> torch.Tensor:
    """Summed (or averaged) log-probability of each row's labelled tokens, (B,) float32.

    The naive equivalent: for each row b,
    ``sum(log_softmax(logits[b, t]).gather(labels[b, t+1]) for t if labels[b, t+1] != -100)``
    (divided by the count of such t when ``average``; a row without labels gives 0). This is
    ``log pi(y | x)`` of DPO (Rafailov et al. 2023, eq. 7) when labels mask the prompt.
    """
    logps, mask = token_logps(logits, labels)
    total = logps.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def sft_loss(logits: torch.Tensor, labels: torch.Tensor,
             num_items: int | None = None) -> torch.Tensor:
    """Supervised fine-tuning loss: the mean negative log-likelihood of the completion tokens.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) input ids, ``IGNORE_INDEX`` on prompt and padding positions.
        num_items: divide the summed loss by this instead of the batch's own count of labelled
            tokens. With gradient accumulation, passing the count of labelled tokens over all
            micro-batches of the optimizer step makes the step's gradient that of one big batch
            (every token weighs the same), the fix transformers adopted in 4.46.

    Returns:
        A float32 scalar. The naive equivalent:
        ``F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
        ignore_index=-100)``; 0 (with a gradient) when no token is labelled.
    """
    shifted, targets, mask = _shifted(logits, labels)
    nll = F.cross_entropy(shifted.float().reshape(-1, shifted.shape[-1]),
                          targets.reshape(-1), reduction="none") * mask.reshape(-1)
    count = num_items if num_items is not None else int(mask.sum())
    return nll.sum() / max(count, 1)


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


@dataclass(frozen=True)
class PreferenceLoss:
    """A preference loss per pair and TRL's reward metrics (all (B,) float32).

    ``chosen_rewards`` / ``rejected_rewards`` are DPO's implicit rewards
    ``beta * (log pi(y|x) - log pi_ref(y|x))`` (Rafailov et al. 2023, sec. 5), detached: what
    TRL logs as ``rewards/chosen`` and ``rewards/rejected``; their difference is
    ``rewards/margins`` and ``chosen > rejected`` is ``rewards/accuracies``.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
             beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> PreferenceLoss:
    """DPO and its variants on the summed log-probs of each pair's completions, (B,) each.

    With ``h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)`` (the log-ratio
    margin) and ``e = label_smoothing``, the per-pair loss is, as TRL's ``DPOTrainer``:

    - ``sigmoid`` (DPO, Rafailov et al. 2023, eq. 7; with e > 0 conservative DPO):
      ``-(1 - e) * log(sigmoid(beta * h)) - e * log(sigmoid(-beta * h))``; log 2 when the
      policy equals the reference.
    - ``robust`` (Chowdhury et al. 2024, "Provably Robust DPO"), unbiased under label noise e:
      ``(-(1 - e) * log(sigmoid(beta * h)) + e * log(sigmoid(-beta * h))) / (1 - 2 e)``.
    - ``hinge`` (SLiC, Zhao et al. 2023): ``max(0, 1 - beta * h)``.
    - ``ipo`` (Azar et al. 2023, eq. 17): ``(h - 1 / (2 beta)) ** 2``; IPO is defined on
      log-probs averaged over the completion's tokens (TRL's choice), which the caller passes.

    Raises:
        ValueError: an unknown ``loss_type``, ``beta`` <= 0, or ``label_smoothing`` outside
            [0, 0.5) (and e > 0 for hinge or ipo, which do not use it).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; one of {', '.join(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5 or (label_smoothing and loss_type in ("hinge", "ipo")):
        raise ValueError(f"label_smoothing must be in [0, 0.5) and applies to sigmoid and robust "
                         f"only, got {label_smoothing} with {loss_type}")
    chosen_ratio = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_ratio = policy_rejected_logps.float() - ref_rejected_logps.float()
    h = chosen_ratio - rejected_ratio
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return PreferenceLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
