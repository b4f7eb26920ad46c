"""Beam sampling: Hugging Face's "beam-search multinomial sampling" (``do_sample=True`` with
``num_beams > 1``), the part of one step that differs from deterministic beam search.

Hugging Face transformers 5.x ``GenerationMixin._beam_search`` with ``do_sample=True``, per step:

1. each live beam's next-token ``log_softmax`` goes through the warpers that
   ``_get_logits_processor`` adds when sampling, in its order: ``TemperatureLogitsWarper``
   (log-probs / temperature), ``TopKLogitsWarper``, ``TopPLogitsWarper``, ``MinPLogitsWarper``
   (the filtered ones become -inf), each keeping at least ``min_tokens_to_keep`` = number of
   eos ids + 1 (2 at least) tokens;
2. the beam's running score is added; the running score is this sum, so beams accumulate the
   *warped* log-probs, and finished hypotheses are scored with them;
3. ``_get_top_k_continuations`` flattens the candidates of all beams and draws
   ``beams_to_keep = max(2, 1 + number of eos ids) * num_beams`` of them without replacement from
   ``softmax(flat)`` (``torch.multinomial``), then sorts the drawn ones by score, best first;
4. the rest is deterministic beam search's bookkeeping (``beams.BeamSearch``): finished
   candidates among the first ``num_beams`` become hypotheses, the best ``num_beams`` unfinished
   ones the next live beams. When fewer than ``num_beams`` drawn ones are unfinished, HF fills
   its beams with finished ones scored -1e9, whose continuations have probability 0; we keep
   fewer beams.

``torch.multinomial`` without replacement ranks ``p / E`` (E ~ Exp(1)); this module ranks
``log p - log E``, the Gumbel-top-k trick (Kool et al. 2019, "Stochastic Beams and Where to Find
Them", arXiv:1903.06059): the same law, drawn in plain Python from a seeded ``random.Random``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

HF_DEFAULT_TOP_K = 50  # GenerationConfig's top_k when neither the model nor the user sets it

Scored = list[tuple[int, float]]  # (token id, log-prob or warped score)


@dataclass
class BeamSampling:
    """The warpers and the random draw of beam sampling (see the module docstring).

    ``warp`` runs on the likeliest tokens the engine reports for a beam, not on the whole
    vocabulary: it equals Hugging Face's warpers exactly when that list holds every token the
    top-k filter keeps (``top_k`` at most the list's length); with a longer ``top_k`` or none,
    tokens outside the list are never drawn and ``top_p`` / ``min_p`` see only the list.

    Args:
        temperature: > 0; the log-probs are divided by it.
        top_k: tokens kept per beam (0 = all; raised to ``min_tokens_to_keep``).
        top_p: nucleus mass in (0, 1]; 1 = off.
        min_p: in [0, 1]; tokens less likely than ``min_p`` times the likeliest are dropped.
        num_stop_tokens: how many token ids end a hypothesis (HF's number of eos ids).
        rng: the random stream; seeded, the same inputs give the same draws.
    """

    temperature: float = 1.0
    top_k: int = HF_DEFAULT_TOP_K
    top_p: float = 1.0
    min_p: float = 0.0
    num_stop_tokens: int = 1
    rng: random.Random = field(default_factory=random.Random)

    @property
    def min_tokens_to_keep(self) -> int:
        return min_tokens_to_keep(self.num_stop_tokens)

    def beams_to_keep(self, width: int) -> int:
        """Candidates drawn per step (HF ``_beam_search``)."""
        return max(2, 1 + self.num_stop_tokens) * width

    def warp(self, top: Sequence[tuple[int, float]]) -> Scored:
        """One beam's (token, raw log-prob) -> the (token, warped score) that can be drawn,
        best first. Naive equivalent on a full (V,) ``log_probs`` row: HF's
        ``TopP(TopK(log_probs / temperature))`` etc., then the entries that are not -inf."""
        scored = sorted(((t, lp / self.temperature) for t, lp in top), key=lambda c: -c[1])
        scored = [c for c in scored if c[1] > -math.inf]  # probability 0: never drawn
        if self.top_k > 0:
            k = max(self.top_k, self.min_tokens_to_keep)
            if k < len(scored):  # ties with the k-th are kept (HF compares with its score)
                scored = [c for c in scored if c[1] >= scored[k - 1][1]]
        if self.top_p < 1.0:
            scored = self._top_p(scored)
        if self.min_p > 0.0:
            scored = self._min_p(scored)
        return scored

    def draw(self, scores: Sequence[float], k: int) -> list[int]:
        """Indices of ``k`` of ``scores`` drawn without replacement with probabilities
        ``softmax(scores)`` (``torch.multinomial(softmax(scores), k)`` as a set); all of them
        when there are at most ``k`` (HF then pads with zero-probability candidates, which rank
        last and never become beams)."""
        if len(scores) <= k:
            return list(range(len(scores)))
        keys = [s - math.log(self.rng.expovariate(1.0) or math.ulp(0.0)) for s in scores]
        return sorted(range(len(scores)), key=lambda i: -keys[i])[:k]

    def _top_p(self, scored: Scored) -> Scored:
        """HF ``TopPLogitsWarper``: ascending, drop while the cumulative probability is at most
        ``1 - top_p``; the ``min_tokens_to_keep`` best always stay."""
        probs = _softmax([s for _, s in scored])
        kept, tail = [], 0.0
        for rank in range(len(scored) - 1, -1, -1):  # ascending
            tail += probs[rank]
            if tail > 1.0 - self.top_p or rank < self.min_tokens_to_keep:
                kept.append(scored[rank])
        return kept[::-1]

    def _min_p(self, scored: Scored) -> Scored:
        """HF ``MinPLogitsWarper``: drop tokens whose probability is below ``min_p`` times the
        likeliest's; the ``min_tokens_to_keep`` best always stay."""
        probs = _softmax([s for _, s in scored])
        threshold = self.min_p * max(probs, default=0.0)
        return [c for rank, (c, p) in enumerate(zip(scored, probs))
                if p >= threshold or rank < self.min_tokens_to_keep]


def min_tokens_to_keep(num_stop_tokens: int) -> int:
    """What every warper keeps at least, with beams (HF ``_get_logits_processor``): one token
    more than there are eos ids, so that a beam can always continue; 2 without eos."""
    return max(2, num_stop_tokens + 1)


def _softmax(scores: list[float]) -> list[float]:
    if not scores:
        return []
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]
