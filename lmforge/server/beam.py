"""Route glue for beam search (``num_beams`` / ``use_beam_search``) and completions' ``best_of``.

Beam search (``engine/beam_search.py``) is on when ``num_beams`` > 1 (the Hugging Face and
Chinese-LLaMA-Alpaca servers' field) or ``use_beam_search`` is true (vLLM's); its width is
``num_beams``, else ``max(n, best_of or 1)`` (vLLM's older API). ``temperature`` picks the
mode, as ``do_sample`` does in Hugging Face's ``generate`` (which those servers call):

- ``temperature`` unset or 0: deterministic beam search (``do_sample=False``), ranked by the
  model's raw log-probabilities; ``top_k`` / ``top_p`` / ``min_p`` / ``seed`` are accepted and
  ignored, as HF ignores its warpers without ``do_sample``.
- ``temperature`` > 0 (1 included): beam sampling, HF's beam-search multinomial sampling
  (``do_sample=True``, ``engine/beam_sampling.py``): each beam's log-probabilities divided by
  ``temperature``, filtered by ``top_k`` (unset: HF's default 50; 0 or -1: off), ``top_p``,
  ``min_p``; the beams' candidates drawn without replacement from them. ``seed`` makes it
  reproducible; without one, each request differs. Exact while ``top_k`` <= 64; a larger or
  disabled ``top_k`` draws from each beam's 64 likeliest tokens only, and ``top_p`` /
  ``min_p`` then see only those.
- 400: ``stream`` (the beams are known only when the search ends); any penalty or
  ``logit_bias`` other than neutral (beams are scored with the model's log-probabilities, as
  HF's, which the engine reports before penalties and bias); structured output and tools (no
  grammar is applied to beams); ``n`` > width; a ``best_of`` other than the width;
  ``use_beam_search: false`` with ``num_beams`` > 1; width > 10; a sampling field out of its
  usual range.
- honoured: ``max_tokens``, ``stop``, ``stop_token_ids``, ``ignore_eos``, the text options,
  ``logprobs`` (each returned beam's tokens, with their top alternatives, raw log-probabilities
  in both modes) and ``echo``.
- ``length_penalty`` (default 1.0) and ``early_stopping`` (default false; true or "never") are
  Hugging Face's; without beam search a non-default value is a 400.

The ``n`` best beams come back as choices ``i * n + j`` (prompt i, j-th best), each with
``finish_reason`` "stop" (eos, stop token or stop string) or "length". ``usage`` counts each
prompt once and the returned beams' tokens (not the discarded beams': they are bookkeeping of
one search, as in vLLM); ``cached_tokens`` are the prompt tokens the first step read from the
prefix cache.

The prompts are rendered and encoded by ``prompts.encode_request``, as on the normal path (with
tools a 400, only ``tool_choice: "none"`` gets there, which shows the model no tools).

``best_of`` (completions only, OpenAI's): ``best_of`` candidates per prompt are sampled as ``n``
choices are (with logprobs: ``sampling.for_best_of``), and the ``n`` with the highest mean token
logprob (the model's raw log-softmax) come back, best first; ``usage`` counts every candidate's
tokens, as OpenAI bills them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from fastapi import Request, Response

from lmforge.engine.beam_search import (
    MAX_BEAM_WIDTH,
    BeamSearchOutput,
    BeamSearchParams,
    beam_search,
)
from lmforge.engine.request import TokenLogprob
from lmforge.errors import InvalidRequestError
from lmforge.protocol import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Usage,
)
from lmforge.server.generation import request_priority, wait_disconnect
from lmforge.server.logprobs import TokenTexts, chat_logprobs, completion_logprobs, finite
from lmforge.server.prompts import encode_request
from lmforge.server.sampling import sampling_kwargs

if TYPE_CHECKING:
    from lmforge.engine.async_engine import AsyncEngine

AnyRequest = ChatCompletionRequest | CompletionRequest

# fields beams cannot honour -> their neutral values (``sampling_kwargs`` form)
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0.0,),
    "frequency_penalty": (0.0,),
    "repetition_penalty": (1.0,),
    "logit_bias": ({},),
}


def is_beam_search(body: AnyRequest) -> bool:
    """Whether the request asks for beam search (see the module docstring).

    Raises:
        InvalidRequestError: ``num_beams`` out of 1..10, ``use_beam_search: false`` with
            ``num_beams`` > 1, or ``length_penalty`` / ``early_stopping`` without beam search.
    """
    if body.num_beams is not None and not 1 <= body.num_beams <= MAX_BEAM_WIDTH:
        raise InvalidRequestError(
            f"num_beams must be between 1 and {MAX_BEAM_WIDTH}, got {body.num_beams}",
            param="num_beams")
    if body.use_beam_search is False and (body.num_beams or 1) > 1:
        raise InvalidRequestError(
            f"num_beams {body.num_beams} asks for beam search but use_beam_search is false; "
            "remove one of them", param="use_beam_search")
    on = bool(body.use_beam_search) or (body.num_beams or 1) > 1
    if not on:
        for name, neutral in (("length_penalty", (None, 1.0)), ("early_stopping", (None, False))):
            if getattr(body, name) not in neutral:
                raise InvalidRequestError(
                    f"{name} applies only to beam search; set num_beams > 1 (or "
                    f"use_beam_search: true), or remove {name}", param=name)
    return on


def beam_params(body: AnyRequest) -> BeamSearchParams:
    """``BeamSearchParams`` for a request that ``is_beam_search``, after the combination rules:
    the fields beams honour as ``server/sampling.py`` reads them for ``SamplingParams``
    (``sampling_kwargs``; the request's length limit and logprobs), HF's sampling fields
    (``_sampling``) and the beam fields.

    Raises:
        InvalidRequestError: a rule of the module docstring broken, naming the parameter (a
            length error the one the client sent: ``max_completion_tokens`` or ``max_tokens``).
    """
    best_of = getattr(body, "best_of", None)
    width = body.num_beams or max(body.num_choices, best_of or 1)
    if width > MAX_BEAM_WIDTH:  # num_beams itself was checked by is_beam_search
        param = "best_of" if (best_of or 0) > body.num_choices else "n"
        raise InvalidRequestError(
            f"use_beam_search without num_beams takes max(n, best_of) = {width} as the beam "
            f"width, above the maximum {MAX_BEAM_WIDTH}; lower {param} or set num_beams",
            param=param)
    _check_combination(body, width)
    kwargs = sampling_kwargs(body)
    try:
        return BeamSearchParams(
            beam_width=width, max_tokens=body.requested_max_tokens,
            length_penalty=1.0 if body.length_penalty is None else body.length_penalty,
            early_stopping=body.early_stopping or False, stop=kwargs["stop"],
            stop_token_ids=kwargs["stop_token_ids"], ignore_eos=kwargs["ignore_eos"],
            skip_special_tokens=kwargs["skip_special_tokens"],
            include_stop_str_in_output=kwargs["include_stop_str_in_output"],
            logprobs=body.num_logprobs, prompt_logprobs=body.num_prompt_logprobs,
            **_sampling(body))
    except InvalidRequestError as e:
        raise e.renamed("max_tokens", body.max_tokens_param)


def _sampling(body: AnyRequest) -> dict[str, Any]:
    """``BeamSearchParams`` sampling fields: ``do_sample`` iff ``temperature`` > 0; an unset
    ``top_k`` stays HF's default (50)."""
    given = {"temperature": body.temperature, "top_k": body.top_k, "top_p": body.top_p,
             "min_p": body.min_p, "seed": body.seed}
    return {"do_sample": bool(body.temperature),
            **{name: value for name, value in given.items() if value is not None}}


def _check_combination(body: AnyRequest, width: int) -> None:
    if body.stream:
        raise InvalidRequestError(
            "beam search cannot be streamed: the best beams are known only when the search "
            "ends; remove stream (or num_beams / use_beam_search)", param="stream")
    kwargs = sampling_kwargs(body)
    for name, neutral in _NEUTRAL.items():
        if kwargs[name] not in neutral:
            raise InvalidRequestError(
                f"beam search scores beams with the model's log-probabilities before any "
                f"penalty or bias (as Hugging Face's), so {name} must be unset with it; remove "
                f"{name} (or num_beams / use_beam_search)", param=name)
    if body.structured_output() is not None:
        raise InvalidRequestError(
            "beam search does not apply structured output constraints; remove num_beams / "
            "use_beam_search or the constraint", param="num_beams")
    if isinstance(body, ChatCompletionRequest) and body.tool_mode != "none":
        raise InvalidRequestError(
            "beam search cannot be combined with tools; remove num_beams / use_beam_search or "
            "tools", param="tools")
    if body.num_choices > width:
        raise InvalidRequestError(
            f"n ({body.num_choices}) must not exceed the beam width ({width}): beam search "
            "returns the n best of its beams", param="n")
    best_of = getattr(body, "best_of", None)
    if best_of is not None and best_of != width:
        raise InvalidRequestError(
            f"with beam search, best_of is the beam width; it is {best_of} but num_beams is "
            f"{width}: remove best_of or make them equal", param="best_of")


async def create_chat_completion(body: ChatCompletionRequest, request: Request
                                 ) -> ChatCompletion | Response:
    """A chat completion whose ``n`` choices are the best beams (model and body already
    checked)."""
    engine: AsyncEngine = request.app.state.engine
    params = beam_params(body)
    prompts, _ = await encode_request(engine, body, chat_template=request.app.state.chat_template)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    outputs = await _search(request, engine, response_id, prompts, params, body.num_choices)
    if isinstance(outputs, Response):
        return outputs
    texts = TokenTexts(engine.tokenizer)
    choices = [ChatCompletionChoice(
        index=j, message=ChatCompletionMessage(content=s.text), finish_reason=s.finish_reason,
        logprobs=None if s.logprobs is None else chat_logprobs(texts, s.logprobs))
        for j, s in enumerate(outputs[0].sequences)]
    return ChatCompletion(id=response_id, created=int(time.time()), model=body.model,
                          choices=choices, usage=_usage(outputs))


async def create_completion(body: CompletionRequest, request: Request) -> Completion | Response:
    """A completion whose choices ``i * n + j`` are prompt i's j-th best beams, with ``echo``
    and ``logprobs`` as usual (model and body already checked)."""
    engine: AsyncEngine = request.app.state.engine
    params = beam_params(body)
    prompts, echoes = await encode_request(engine, body)
    response_id = f"cmpl-{uuid.uuid4().hex}"
    outputs = await _search(request, engine, response_id, prompts, params, body.num_choices)
    if isinstance(outputs, Response):
        return outputs
    texts = TokenTexts(engine.tokenizer)
    choices = []
    for i, (echo, ids, out) in enumerate(zip(echoes, prompts, outputs)):
        for j, s in enumerate(out.sequences):
            logprobs = None
            if s.logprobs is not None:
                token_ids = s.token_ids
                entries: list[TokenLogprob | None] = list(s.logprobs)
                if body.echo:
                    token_ids, entries = ids + token_ids, list(out.prompt_logprobs or []) + entries
                logprobs = completion_logprobs(texts, token_ids, entries)
            choices.append(CompletionChoice(index=i * body.num_choices + j, text=echo + s.text,
                                            logprobs=logprobs, finish_reason=s.finish_reason))
    return Completion(id=response_id, created=int(time.time()), model=body.model,
                      choices=choices, usage=_usage(outputs))


def _usage(outputs: list[BeamSearchOutput]) -> Usage:
    """Each prompt once, the returned beams' tokens."""
    return Usage.of(sum(o.num_prompt_tokens for o in outputs),
                    sum(len(s.token_ids) for o in outputs for s in o.sequences),
                    sum(o.num_cached_tokens for o in outputs))


async def _search(request: Request, engine: AsyncEngine, response_id: str,
                  prompts: list[list[int]], params: BeamSearchParams, n: int
                  ) -> list[BeamSearchOutput] | Response:
    """One beam search per prompt, concurrently; the outputs in prompt order, or an empty 499
    response when the client went away first (the searches are then cancelled, which aborts
    their engine requests). The first error of any search is raised after all are cancelled."""
    priority = request_priority(request)
    tasks = [asyncio.ensure_future(beam_search(engine, f"{response_id}-{i}", prompt, params, n,
                                               priority=priority))
             for i, prompt in enumerate(prompts)]
    watcher = asyncio.ensure_future(wait_disconnect(request))
    try:
        pending = set(tasks)
        while pending:
            done, _ = await asyncio.wait(pending | {watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                return Response(status_code=499)
            for task in done:
                task.result()  # re-raise a search's error at once
            pending -= done
        return [task.result() for task in tasks]
    finally:
        for task in [*tasks, watcher]:
            task.cancel()
        await asyncio.gather(*tasks, watcher, return_exceptions=True)


class Candidate(Protocol):
    """A finished choice as ``server/inference.py`` collects it."""

    logprobs: list[TokenLogprob]


C = TypeVar("C", bound=Candidate)


def select_best_of(candidates: Sequence[C], best_of: int, n: int) -> list[C]:
    """The ``n`` of each prompt's ``best_of`` candidates with the highest mean token logprob,
    best first (ties: generation order). OpenAI "Create completion", ``best_of``: "the one with
    the highest log probability per token".

    Args:
        candidates: ``len(prompts) * best_of`` choices, prompt-major, each with ``logprobs``
            (one per generated token).
    """
    if best_of == n:
        return list(candidates)

    def mean_logprob(c: C) -> float:
        return sum(finite(e.logprob) for e in c.logprobs) / max(len(c.logprobs), 1)

    out: list[C] = []
    for start in range(0, len(candidates), best_of):
        group = candidates[start:start + best_of]
        out += sorted(group, key=lambda c: -mean_logprob(c))[:n]
    return out
