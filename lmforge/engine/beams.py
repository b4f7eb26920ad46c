"""The bookkeeping of one beam search: live beams, finished hypotheses, the stopping rule.

Pure Python (no model, no engine, no torch), decision for decision Hugging Face transformers
5.x ``GenerationMixin._beam_search``; ``engine/beam_search.py`` drives it with the engine's
one-token requests, ``engine/beam_sampling.py`` supplies beam sampling's draw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from lmforge.engine.beam_sampling import BeamSampling
from lmforge.engine.request import TokenLogprob

EarlyStopping = bool | Literal["never"]
FinishReason = Literal["stop", "length"]


@dataclass
class Beam:
    """A live beam: its generated tokens and their summed logprob (as scored: with beam
    sampling, the warped ones, e.g. divided by the temperature, as HF's running scores)."""

    token_ids: list[int]
    cumulative_logprob: float
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, if asked for


@dataclass
class Hypothesis:
    """A finished beam. ``score = cumulative_logprob / len(token_ids) ** length_penalty``
    (``cumulative_logprob`` as in ``Beam``; the ``logprobs`` entries are the raw ones)."""

    token_ids: list[int]  # generated tokens, the stop token included
    cumulative_logprob: float
    score: float
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] = field(default_factory=list)


class BeamSearch:
    """The bookkeeping of one beam search: live beams, finished hypotheses, the stopping rule.

    Hugging Face's ``_beam_search`` (transformers 5.x), step by step, for one prompt:

    1. every candidate ``beam + token`` has ``beam.cumulative_logprob + logprob(token)``; they
       are ranked best first, ties by live-beam order then token id (HF's flat top-k index);
    2. a finished candidate (stop token, stop string, or ``max_tokens`` reached) enters the
       hypotheses only if it ranks among the first ``width``; its score is
       ``cumulative_logprob / generated_len ** length_penalty``, ``generated_len`` counting the
       stop token but not the prompt (HF ``_update_finished_beams``); the best ``width`` are
       kept;
    3. the best ``width`` unfinished candidates are the next live beams;
    4. the search stops when no live beam is left, when ``early_stopping is True`` and
       ``width`` hypotheses are finished, or when (``width`` hypotheses kept) the best live beam
       scored at ``len`` cannot beat the worst of them, ``len`` being its current length, or
       ``max_tokens`` if ``early_stopping == "never"`` and ``length_penalty > 0``
       (``_check_early_stop_heuristic``).

    HF keeps the top ``(1 + number of stop tokens) * width`` candidates so that at least
    ``width`` are unfinished; ranking all candidates and taking the best unfinished ones is the
    same whenever that holds, which is why each beam must offer its ``width + number of stop
    tokens`` likeliest tokens (``beam_search`` asks for max(2 width, that)).

    With ``sampling`` (HF ``do_sample=True``), step 1 instead warps each beam's tokens
    (``BeamSampling.warp``), adds the beam's score, draws ``sampling.beams_to_keep(width)`` of
    all beams' candidates (``BeamSampling.draw``) and ranks the drawn ones; 2-4 are unchanged
    (HF ``_get_top_k_continuations`` sorts its sample, then runs the same code).

    Args:
        width: beams kept (``num_beams``).
        max_tokens: generated tokens at most (already resolved against the context).
        finish_reason_of: generated token ids (last one new) -> "stop", "length" or None.
        num_logprobs: alternatives kept per token in ``logprobs``; None keeps no logprobs.
        sampling: beam sampling's warpers and random stream; None = deterministic.
    """

    def __init__(self, width: int, max_tokens: int, length_penalty: float = 1.0,
                 early_stopping: EarlyStopping = False,
                 finish_reason_of: Callable[[list[int]], FinishReason | None] | None = None,
                 num_logprobs: int | None = None, sampling: BeamSampling | None = None):
        self.width = width
        self.max_tokens = max_tokens
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.finish_reason_of = finish_reason_of or (
            lambda ids: "length" if len(ids) >= max_tokens else None)
        self.num_logprobs = num_logprobs
        self.sampling = sampling
        self.live: list[Beam] = [Beam([], 0.0)]
        self.hypotheses: list[Hypothesis] = []  # best first, at most ``width``
        self.done = False

    def step(self, tops: Sequence[Sequence[tuple[int, float]]]) -> None:
        """Extend the live beams by one token.

        Args:
            tops: one list per live beam (``self.live`` order): its likeliest next tokens as
                (token id, raw logprob), likeliest first.
        """
        if len(tops) != len(self.live):
            raise ValueError(f"step() needs one top list per live beam ({len(self.live)}), "
                             f"got {len(tops)}")
        candidates = self._candidates(tops)
        live: list[Beam] = []
        finished: list[Hypothesis] = []
        for rank, (total, b, token, lp, top) in enumerate(candidates):
            if rank >= self.width and len(live) >= self.width:
                break
            parent = self.live[b]
            ids = parent.token_ids + [token]
            logprobs = parent.logprobs if self.num_logprobs is None else parent.logprobs + [
                TokenLogprob(token, lp, list(top[:self.num_logprobs]))]
            reason = self.finish_reason_of(ids)
            if reason is None:
                if len(live) < self.width:
                    live.append(Beam(ids, total, logprobs))
            elif rank < self.width:
                finished.append(Hypothesis(ids, total, total / len(ids) ** self.length_penalty,
                                           reason, logprobs))
        self._keep(finished)
        self.live = live
        self._update_done()

    def _candidates(self, tops: Sequence[Sequence[tuple[int, float]]]
                    ) -> list[tuple[float, int, int, float, Sequence[tuple[int, float]]]]:
        """(beam score + token score, beam index, token, raw logprob, the beam's top list) of
        the candidates that compete, best first; ties by live-beam order then token id."""
        candidates = []
        for b, (beam, top) in enumerate(zip(self.live, tops)):
            raw = dict(top)
            scored = top if self.sampling is None else self.sampling.warp(top)
            candidates += [(beam.cumulative_logprob + score, b, token, raw[token], top)
                           for token, score in scored]
        if self.sampling is not None:
            drawn = self.sampling.draw([c[0] for c in candidates],
                                       self.sampling.beams_to_keep(self.width))
            candidates = [candidates[i] for i in drawn]
        return sorted(candidates, key=lambda c: (-c[0], c[1], c[2]))

    def best(self, n: int) -> list[Hypothesis]:
        """The ``n`` best hypotheses, best first; if fewer finished, the best live beams follow
        as "length" (only when the search ended with fewer, e.g. a vocabulary of a few tokens)."""
        out = self.hypotheses[:n]
        for beam in self.live[:n - len(out)]:
            length = max(len(beam.token_ids), 1)
            out.append(Hypothesis(beam.token_ids, beam.cumulative_logprob,
                                  beam.cumulative_logprob / length ** self.length_penalty,
                                  "length", beam.logprobs))
        return out

    def _keep(self, finished: list[Hypothesis]) -> None:
        """Merge new hypotheses into the kept ones; a stable sort keeps older ones first on
        equal scores (HF concatenates the kept before the new)."""
        if not finished:
            return
        merged = self.hypotheses + finished
        merged.sort(key=lambda h: -h.score)
        self.hypotheses = merged[:self.width]

    def _update_done(self) -> None:
        full = len(self.hypotheses) >= self.width
        can_improve = True
        if self.live and full:
            length = len(self.live[0].token_ids)
            if self.early_stopping == "never" and self.length_penalty > 0.0:
                length = self.max_tokens
            best_possible = self.live[0].cumulative_logprob / length ** self.length_penalty
            can_improve = best_possible > self.hypotheses[-1].score
        self.done = not self.live or not can_improve or (full and self.early_stopping is True)
