"""Beam search above the engine, as vLLM v1 runs it; scoring and stopping as Hugging Face's.

Data flow of one search (``beam_search``):

    live beams --one request each: prompt + beam tokens, max_tokens=1, logprobs=N--> AsyncEngine
    -> each beam's N likeliest next tokens -> ``BeamSearch.step``: candidates ranked by cumulative
    logprob; finished ones among the best ``width`` enter the hypotheses, the best ``width``
    unfinished ones are the next live beams; the stopping rule -> next step, or the best
    hypotheses.

The engine needs no change: the requests of one step run in one batch, and the prefix cache
serves each beam's prompt and history from the full KV blocks that the previous steps computed,
so only the last, partial block of each beam is recomputed (vLLM ``beam_search`` in
``vllm/entrypoints/llm.py`` does the same).

``BeamSearch`` is pure bookkeeping (no model, no engine, no torch) and follows Hugging Face
transformers 5.x ``GenerationMixin._beam_search`` (the vectorized successor of
``BeamSearchScorer`` / ``BeamHypotheses``) decision for decision, so that
``model.generate(num_beams=k, num_return_sequences=n, do_sample=False, length_penalty=...,
early_stopping=...)`` returns the same sequences (tests/engine/test_beam_search.py checks it).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar

from lmforge.engine.request import (
    MAX_LOGPROBS,
    ONLINE_PRIORITY,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from lmforge.errors import InvalidRequestError
from lmforge.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from lmforge.engine.async_engine import AsyncEngine

# Widest beam: each beam's step asks for at least 2 x width top logprobs (vLLM's rule), and the
# engine computes at most MAX_LOGPROBS (20) per token.
MAX_BEAM_WIDTH = MAX_LOGPROBS // 2

EarlyStopping = bool | Literal["never"]
FinishReason = Literal["stop", "length"]
T = TypeVar("T")


@dataclass
class BeamSearchParams:
    """What one beam search does, with Hugging Face's ``generate`` names and defaults.

    ``length_penalty`` is the exponent of the generated length that divides a finished
    hypothesis' summed logprob (> 0 favours longer ones, < 0 shorter ones). ``early_stopping``:
    True stops as soon as ``beam_width`` hypotheses are finished; False stops when, with
    ``beam_width`` kept, the best live beam scored at its current length cannot beat the worst
    of them (HF's heuristic); "never" scores it at ``max_tokens`` instead when
    ``length_penalty > 0`` (the canonical algorithm). ``stop`` / ``stop_token_ids`` / eos
    (unless ``ignore_eos``) finish a hypothesis with "stop", ``max_tokens`` with "length".
    ``logprobs`` / ``prompt_logprobs`` and the text options mean what they mean in
    ``SamplingParams``.

    Raises (from ``__post_init__``):
        InvalidRequestError: a value out of range, naming it (``num_beams`` for the width).
    """

    beam_width: int
    max_tokens: int | None = 16  # None = up to the context length
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.beam_width, bool) or not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise InvalidRequestError(
                f"num_beams must be between 1 and {MAX_BEAM_WIDTH}, got {self.beam_width}",
                param="num_beams")
        if not isinstance(self.length_penalty, (int, float)) or not math.isfinite(
                self.length_penalty):
            raise InvalidRequestError(
                f"length_penalty must be a finite number, got {self.length_penalty!r}",
                param="length_penalty")
        if self.early_stopping not in (True, False, "never"):
            raise InvalidRequestError(
                f"early_stopping must be true, false or \"never\", got {self.early_stopping!r}",
                param="early_stopping")
        SamplingParams(max_tokens=self.max_tokens, stop=self.stop,  # their range checks
                       stop_token_ids=self.stop_token_ids, logprobs=self.logprobs,
                       prompt_logprobs=self.prompt_logprobs)

    def step_params(self, num_logprobs: int, prompt_logprobs: int | None = None
                    ) -> SamplingParams:
        """The params of one step's one-token request: greedy, since only the ``num_logprobs``
        likeliest tokens it reports are used, not the token it picks."""
        return SamplingParams(max_tokens=1, temperature=0.0, logprobs=num_logprobs,
                              prompt_logprobs=prompt_logprobs)


@dataclass
class Beam:
    """A live beam: its generated tokens and their summed logprob."""

    token_ids: list[int]
    cumulative_logprob: float
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, if asked for


@dataclass
class Hypothesis:
    """A finished beam. ``score = cumulative_logprob / len(token_ids) ** length_penalty``."""

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

    Args:
        width: beams kept (``num_beams``).
        max_tokens: generated tokens at most (already resolved against the context).
        finish_reason_of: generated token ids (last one new) -> "stop", "length" or None.
        num_logprobs: alternatives kept per token in ``logprobs``; None keeps no logprobs.
    """

    def __init__(self, width: int, max_tokens: int, length_penalty: float = 1.0,
                 early_stopping: EarlyStopping = False,
                 finish_reason_of: Callable[[list[int]], FinishReason | None] | None = None,
                 num_logprobs: int | None = None):
        self.width = width
        self.max_tokens = max_tokens
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.finish_reason_of = finish_reason_of or (
            lambda ids: "length" if len(ids) >= max_tokens else None)
        self.num_logprobs = num_logprobs
        self.live: list[Beam] = [Beam([], 0.0)]
        self.hypotheses: list[Hypothesis] = []  # best first, at most ``width``
        self.done = False

    def step(self, tops: Sequence[Sequence[tuple[int, float]]]) -> None:
        """Extend the live beams by one token.

        Args:
            tops: one list per live beam (``self.live`` order): its likeliest next tokens as
                (token id, logprob), likeliest first.
        """
        if len(tops) != len(self.live):
            raise ValueError(f"step() needs one top list per live beam ({len(self.live)}), "
                             f"got {len(tops)}")
        candidates = sorted(
            ((beam.cumulative_logprob + lp, b, token, lp, top)
             for b, (beam, top) in enumerate(zip(self.live, tops)) for token, lp in top),
            key=lambda c: (-c[0], c[1], c[2]))
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


@dataclass
class BeamSequence:
    """One returned beam: its tokens (the stop token included), text and scores."""

    token_ids: list[int]
    text: str  # as the normal decoding path would render these tokens (stop strings cut)
    finish_reason: FinishReason
    cumulative_logprob: float
    score: float  # cumulative_logprob / len(token_ids) ** length_penalty
    logprobs: list[TokenLogprob] | None  # one per token, if ``params.logprobs`` is set


@dataclass
class BeamSearchOutput:
    """The result of ``beam_search`` for one prompt."""

    sequences: list[BeamSequence]  # best first, ``n`` of them
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens whose KV came from the prefix cache (first step)
    prompt_logprobs: list[TokenLogprob | None] | None  # if ``params.prompt_logprobs`` is set


async def beam_search(engine: AsyncEngine, request_id: str, prompt_token_ids: list[int],
                      params: BeamSearchParams, n: int = 1, *,
                      priority: int = ONLINE_PRIORITY) -> BeamSearchOutput:
    """Beam search for one prompt on a running ``AsyncEngine``; the ``n`` best beams.

    Each step sends one request per live beam (ids ``{request_id}-{step}-{beam}``), greedy with
    ``max_tokens=1`` and ``max(2 width, width + stop tokens, params.logprobs)`` top logprobs
    (at most 20; the raw log-softmax of the model). That is enough for Hugging Face's result
    unless more than ``20 - width`` stop token ids rank among one beam's likeliest tokens.
    Deterministic: the same request gives the same beams (up to the kernels' float rounding,
    which in bf16 can depend on what else shares the batch). Cancelling the coroutine aborts
    the requests in flight.

    Args:
        engine: a started AsyncEngine.
        prompt_token_ids: the prompt.
        params: width, length penalty, early stopping, stops, logprobs.
        n: how many beams to return, 1..width.
        priority: the engine priority of every step's requests (``AsyncEngine.generate``).

    Raises:
        InvalidRequestError: ``n`` outside 1..width, or a bad prompt (as ``generate``).
        ContextLengthExceededError: prompt + ``max_tokens`` exceed the context.
        EngineDeadError: the engine loop has stopped.
        RateLimitError: the engine's waiting backlog is full when the search starts (its
            later steps are not counted: ``generate(admitted=True)``).
    """
    if not 1 <= n <= params.beam_width:
        raise InvalidRequestError(
            f"n ({n}) must be between 1 and the beam width ({params.beam_width})", param="n")
    prompt = list(prompt_token_ids)
    engine.engine.validate_prompt(prompt, SamplingParams(max_tokens=params.max_tokens))
    max_tokens = params.max_tokens or engine.max_model_len - len(prompt)
    stop_ids = frozenset(params.stop_token_ids) | (
        frozenset() if params.ignore_eos else engine.tokenizer.eos_token_ids)
    width = params.beam_width
    num_top = min(MAX_LOGPROBS, max(2 * width, width + len(stop_ids), params.logprobs or 0))
    search = BeamSearch(width, max_tokens, params.length_penalty, params.early_stopping,
                        _finish_rule(engine, prompt, params, stop_ids, max_tokens),
                        params.logprobs)
    step_params = params.step_params(num_top)
    first = await _one_token(engine, f"{request_id}-0-0", prompt,
                             params.step_params(num_top, params.prompt_logprobs), priority)
    search.step([first.logprobs[0].top])
    step = 1
    while not search.done:
        outs = await _gather([
            _one_token(engine, f"{request_id}-{step}-{b}", prompt + beam.token_ids, step_params,
                       priority, admitted=True)  # the first step was admitted for the search
            for b, beam in enumerate(search.live)])
        search.step([out.logprobs[0].top for out in outs])
        step += 1
    return BeamSearchOutput(
        sequences=[_sequence(engine, prompt, params, stop_ids, h) for h in search.best(n)],
        num_prompt_tokens=first.num_prompt_tokens, num_cached_tokens=first.num_cached_tokens,
        prompt_logprobs=first.prompt_logprobs)


def _finish_rule(engine: AsyncEngine, prompt: list[int], params: BeamSearchParams,
                 stop_ids: frozenset[int], max_tokens: int
                 ) -> Callable[[list[int]], FinishReason | None]:
    """Generated ids -> finish reason, with the engine's precedence: a stop token or a stop
    string ("stop") before the length ("length")."""
    def finish_reason_of(ids: list[int]) -> FinishReason | None:
        if ids[-1] in stop_ids or (params.stop and _detokenize(engine, prompt, params, ids)[1]):
            return "stop"
        return "length" if len(ids) >= max_tokens else None

    return finish_reason_of


def _detokenize(engine: AsyncEngine, prompt: list[int], params: BeamSearchParams,
                ids: list[int]) -> tuple[str, bool]:
    """(text, whether a stop string cut it), exactly as the engine's detokenizer renders
    ``ids`` when they are generated one by one after ``prompt``."""
    detok = IncrementalDetokenizer(engine.tokenizer, prompt, stop=params.stop,
                                   skip_special_tokens=params.skip_special_tokens,
                                   include_stop_str_in_output=params.include_stop_str_in_output)
    text = detok.update(ids)
    return text + detok.flush(), detok.stopped


def _sequence(engine: AsyncEngine, prompt: list[int], params: BeamSearchParams,
              stop_ids: frozenset[int], hypothesis: Hypothesis) -> BeamSequence:
    ids = hypothesis.token_ids
    if ids and ids[-1] in stop_ids and not params.include_stop_str_in_output:
        ids = ids[:-1]  # a stop token ends the text without being part of it (the engine's rule)
    text, _ = _detokenize(engine, prompt, params, ids)
    return BeamSequence(hypothesis.token_ids, text, hypothesis.finish_reason,
                        hypothesis.cumulative_logprob, hypothesis.score,
                        hypothesis.logprobs if params.logprobs is not None else None)


async def _one_token(engine: AsyncEngine, request_id: str, prompt: list[int],
                     params: SamplingParams, priority: int, admitted: bool = False
                     ) -> RequestOutput:
    """The single output of a ``max_tokens=1`` request."""
    outs = [out async for out in engine.generate(request_id, prompt, params,
                                                 admitted=admitted, priority=priority)]
    return outs[-1]


async def _gather(coroutines: list[Awaitable[T]]) -> list[T]:
    """``asyncio.gather`` that cancels the siblings when one fails or when it is cancelled."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
