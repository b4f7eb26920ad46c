"""Logits processors applied before sampling: OpenAI's ``logit_bias`` and the repetition,
frequency and presence penalties (vLLM's ``vllm/v1/sample/ops/penalties.py``), batched over rows.
"""

from __future__ import annotations

import torch


def apply_penalties(logits: torch.Tensor, prompt_ids: list[list[int]],
                    output_ids: list[list[int]], repetition: torch.Tensor | None,
                    frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """Repetition, frequency and presence penalties, as vLLM ``vllm/model_executor/layers/utils.py``.

    Repetition (CTRL, arXiv:1909.05858 sec. 4.1; HF ``RepetitionPenaltyLogitsProcessor``): for every
    token seen in prompt + output, ``l / r if l > 0 else l * r``. Then the OpenAI formula over output
    tokens only: ``l - frequency * count - presence * (count > 0)``.

    Only the seen positions are touched (gather, compute, scatter back: O(B * tokens), not
    O(B * V) arithmetic); a token listed twice reads and writes the same value, so duplicates are
    harmless.

    Args:
        logits: (B, V) float. Not modified.
        prompt_ids, output_ids: B lists of token ids; ids >= V are ignored.
        repetition, frequency, presence: (B,) float on ``logits.device``; 1, 0, 0 mean "off".
            ``repetition`` None skips the prompt tokens (no row uses it).

    Returns:
        (B, V) penalized logits. Naive equivalent, per row b and token t::

            c = output_ids[b].count(t); seen = t in prompt_ids[b] + output_ids[b]
            l = logits[b, t]; l = (l / r if l > 0 else l * r) if seen else l
            l - frequency[b] * c - presence[b] * (c > 0)
    """
    batch, vocab = logits.shape
    # Spare column V takes padding and out-of-range ids (vLLM's trick), so rows need no mask.
    out = torch.cat([logits, logits.new_zeros(batch, 1)], dim=1)  # (B, V + 1), a copy
    if repetition is not None:
        ids = _padded([p + o for p, o in zip(prompt_ids, output_ids)], vocab, out.device)
        seen = out.gather(1, ids)
        factor = repetition.unsqueeze(1)
        out.scatter_(1, ids, torch.where(seen > 0, seen / factor, seen * factor))
    ids = _padded(output_ids, vocab, out.device)
    ones = torch.ones_like(ids, dtype=out.dtype)
    counts = torch.zeros_like(out).scatter_add_(1, ids, ones).gather(1, ids)  # exact integers
    values = out.gather(1, ids)
    values = values - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0)
    return out.scatter_(1, ids, values)[:, :vocab]


def apply_logit_bias(logits: torch.Tensor, biases: list[dict[int, float]]) -> torch.Tensor:
    """Add each row's ``{token id: bias}`` to its logits (OpenAI ``logit_bias``).

    Args:
        logits: (B, V) float. Not modified.
        biases: B dicts; ids >= V are ignored (the engine rejects them before they get here).

    Returns:
        (B, V) biased logits (a copy).
    """
    vocab = logits.shape[1]
    rows, cols, values = [], [], []
    for row, bias in enumerate(biases):
        for token, value in bias.items():
            if token < vocab:
                rows.append(row)
                cols.append(token)
                values.append(value)
    out = logits.clone()
    if rows:
        index = (torch.tensor(rows, device=out.device), torch.tensor(cols, device=out.device))
        out.index_put_(index, torch.tensor(values, dtype=out.dtype, device=out.device),
                       accumulate=True)
    return out


def _padded(ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """(B, max(1, longest row)) int64 ids, right-padded with ``vocab``; ids >= vocab become it."""
    width = max(1, max((len(row) for row in ids), default=0))
    padded = torch.tensor([row + [vocab] * (width - len(row)) for row in ids], device=device)
    return padded.clamp_(max=vocab)
