"""Beam search and beam sampling above the engine, as vLLM v1 runs beam search; scoring,
sampling and stopping as Hugging Face's.

Data flow of one search (``beam_search``):

    live beams --one request each: prompt + beam tokens, max_tokens=1, logprobs=N--> AsyncEngine
    -> each beam's N likeliest next tokens -> ``BeamSearch.step``: candidates ranked by cumulative
    logprob (beam sampling: warped, then ``beams_to_keep`` of them drawn); finished ones among
    the best ``width`` enter the hypotheses, the best ``width`` unfinished ones are the next live
    beams; the stopping rule -> next step, or the best hypotheses.

The engine needs no change: the requests of one step run in one batch, and the prefix cache
serves each beam's prompt and history from the full KV blocks that the previous steps computed,
so only the last, partial block of each beam is recomputed (vLLM ``beam_search`` in
``vllm/entrypoints/llm.py`` does the same).

``BeamSearch`` (``engine/beams.py``) is pure bookkeeping (no model, no engine, no torch) and
follows Hugging Face transformers 5.x ``GenerationMixin._beam_search`` (the vectorized
successor of ``BeamSearchScorer`` / ``BeamHypotheses``) decision for decision, so that
``model.generate(num_beams=k, num_return_sequences=n, do_sample=False, length_penalty=...,
early_stopping=...)`` returns the same sequences (tests/engine/test_beam_search.py checks it).
With ``do_sample=True`` (``engine/beam_sampling.py``) it runs on candidates drawn as HF draws
them: the same law, not the same draws (tests/engine/test_beam_sampling.py compares them).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, TypeVar

from lmforge.engine.beam_sampling import (
    HF_DEFAULT_TOP_K,
    BeamSampling,
    min_tokens_to_keep,
)
from lmforge.engine.beams import BeamSearch, EarlyStopping, FinishReason, Hypothesis
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
# Most logprobs a step's internal request asks for (users get at most MAX_LOGPROBS): beam
# sampling needs each beam's whole top-k list, and Hugging Face's default top_k is 50.
MAX_BEAM_LOGPROBS = 64

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

    ``do_sample`` False (HF's default) is deterministic beam search on the raw log-probs:
    ``temperature`` / ``top_k`` / ``top_p`` / ``min_p`` / ``seed`` are ignored, as HF ignores
    its warpers without ``do_sample``. True is HF's beam-search multinomial sampling
    (``engine/beam_sampling.py``) with those warpers (``top_k`` 0 or -1 = off; HF's default 50)
    and ``seed`` (None = a fresh random stream each search).

    Raises (from ``__post_init__``):
        InvalidRequestError: a value out of range, naming it (``num_beams`` for the width,
            ``temperature`` when it is 0 with ``do_sample``).
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
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = HF_DEFAULT_TOP_K
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
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
        if self.do_sample and self.temperature <= 0.0:
            raise InvalidRequestError(
                f"beam sampling needs a temperature above 0, got {self.temperature}; set it, "
                "or use deterministic beam search (do_sample false)", param="temperature")
        SamplingParams(max_tokens=self.max_tokens, stop=self.stop,  # their range checks
                       stop_token_ids=self.stop_token_ids, logprobs=self.logprobs,
                       prompt_logprobs=self.prompt_logprobs, temperature=self.temperature,
                       top_k=self.top_k, top_p=self.top_p, min_p=self.min_p, seed=self.seed)

    def sampling(self, num_stop_tokens: int) -> BeamSampling | None:
        """The warpers and random stream of beam sampling; None for deterministic beams."""
        if not self.do_sample:
            return None
        return BeamSampling(self.temperature, self.top_k, self.top_p, self.min_p,
                            num_stop_tokens, random.Random(self.seed))

    def num_logprobs(self, num_stop_tokens: int) -> int:
        """Likeliest tokens each step asks for per beam (at most ``MAX_BEAM_LOGPROBS``, at
        least ``logprobs``): ``max(2 width, width + stop tokens)`` (vLLM's 2 width; HF's beams
        need each beam's ``width + stop tokens`` best); with ``do_sample`` also the whole top-k
        list (HF's law exactly when ``top_k <= 64``; else each beam's 64 likeliest only)."""
        need = max(2 * self.beam_width, self.beam_width + num_stop_tokens, self.logprobs or 0)
        if self.do_sample:
            top_k = max(self.top_k, min_tokens_to_keep(num_stop_tokens))
            need = max(need, top_k if self.top_k > 0 else MAX_BEAM_LOGPROBS)
        return min(MAX_BEAM_LOGPROBS, need)

    def step_params(self, num_logprobs: int, prompt_logprobs: int | None = None
                    ) -> SamplingParams:
        """The params of one step's one-token request: greedy, since only the ``num_logprobs``
        (up to ``MAX_BEAM_LOGPROBS``) likeliest tokens it reports are used, not the token it
        picks. Seeded beam sampling seeds them too (greedy ignores it): like any seeded request
        they then recompute their prompt instead of reading the prefix cache, whose kernels
        round differently in bf16 (``Request.reads_prefix_cache``), so the same seed gives the
        same beams whatever an earlier request left in the cache, at the cost of the reuse."""
        seed = self.seed if self.do_sample else None
        return _StepParams(max_tokens=1, temperature=0.0, logprobs=num_logprobs,
                           prompt_logprobs=prompt_logprobs, seed=seed)


class _StepParams(SamplingParams):
    """A beam step's internal request, which may ask for more logprobs than a user may."""
    logprobs_limit: ClassVar[int] = MAX_BEAM_LOGPROBS


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
    ``max_tokens=1`` and ``params.num_logprobs`` top logprobs (the raw log-softmax of the
    model). Deterministic beam search gives the same beams for the same request, beam sampling
    for the same ``seed`` (both up to the kernels' float rounding, which in bf16 can depend on
    what else shares the batch). Cancelling the coroutine aborts the requests in flight.

    Args:
        engine: a started AsyncEngine.
        prompt_token_ids: the prompt.
        params: width, length penalty, early stopping, stops, logprobs, sampling.
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
    search, stop_ids, num_top = _new_search(engine, prompt, params)
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


def _new_search(engine: AsyncEngine, prompt: list[int], params: BeamSearchParams
                ) -> tuple[BeamSearch, frozenset[int], int]:
    """The bookkeeping of a search over ``prompt``, the ids that end a beam, and how many top
    logprobs each step asks for.

    Raises:
        InvalidRequestError, ContextLengthExceededError: a bad prompt (as ``generate``).
    """
    engine.validate_prompt(prompt, SamplingParams(max_tokens=params.max_tokens))
    max_tokens = params.max_tokens or engine.max_model_len - len(prompt)
    stop_ids = frozenset(params.stop_token_ids) | (
        frozenset() if params.ignore_eos else engine.tokenizer.eos_token_ids)
    num_top = min(params.num_logprobs(len(stop_ids)), engine.vocab_size)
    search = BeamSearch(params.beam_width, max_tokens, params.length_penalty,
                        params.early_stopping,
                        _finish_rule(engine, prompt, params, stop_ids, max_tokens),
                        params.logprobs, params.sampling(len(stop_ids)))
    return search, stop_ids, num_top


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
