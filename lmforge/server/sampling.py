"""A chat or completions request -> the engine's ``SamplingParams``: one builder, two transforms.

- ``sampling_params(body)``: every request's params, from its fields with OpenAI's defaults
  for nulls (``sampling_kwargs``), its length limit, logprobs and output constraint.
- ``for_tools(params, plan, tokenizer)``: a chat request's tools on top (a forced call's
  grammar, or special tokens kept for a format whose marker is one).
- ``for_best_of(params, body)``: the params of completions' ``best_of`` candidates.

The routes compose them: chat ``for_tools(sampling_params(body), plan, tokenizer)``,
completions ``for_best_of(sampling_params(body), body)``. Beam search runs on
``BeamSearchParams`` instead, built by ``server/beam.py``'s ``beam_params`` after its own
combination rules, from the same ``sampling_kwargs``.

This lives in ``server/``, not on the protocol models: it joins the wire schema (``protocol``)
to the engine's types, and ``protocol`` must not import the engine (tests/test_layout.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lmforge.engine.request import SamplingParams, StructuredOutput
from lmforge.errors import InvalidRequestError
from lmforge.protocol import ChatCompletionRequest, CompletionRequest
from lmforge.server.tools import ToolPlan
from lmforge.tokenizer import Tokenizer

AnyRequest = ChatCompletionRequest | CompletionRequest


def sampling_params(body: AnyRequest) -> SamplingParams:
    """The ``SamplingParams`` of a chat or completions request (before tools and ``best_of``).

    ``max_tokens`` is the request's limit (chat: ``max_completion_tokens``, else
    ``max_tokens``; None = up to the context length), 1 for a completions ``echo`` with
    ``max_tokens: 0`` (nothing is generated: ``Generation(prompt_only=True)``); ``logprobs``
    and ``prompt_logprobs`` as the request asks (``num_logprobs``, ``num_prompt_logprobs``);
    ``structured`` from ``response_format`` or its vLLM/SGLang spellings.

    Raises:
        InvalidRequestError: a value out of range (``SamplingParams.validate``), a bad
            ``logit_bias`` key or output constraint; a length error names the parameter the
            client sent (``max_completion_tokens`` or ``max_tokens``).
    """
    prompt_only = isinstance(body, CompletionRequest) and body.prompt_only
    try:
        spec = body.structured_output()
        return SamplingParams(max_tokens=1 if prompt_only else body.requested_max_tokens,
                              **sampling_kwargs(body), logprobs=body.num_logprobs,
                              prompt_logprobs=body.num_prompt_logprobs,
                              structured=StructuredOutput(**spec) if spec else None)
    except InvalidRequestError as e:
        raise e.renamed("max_tokens", body.max_tokens_param)


def for_tools(params: SamplingParams, plan: ToolPlan, tokenizer: Tokenizer) -> SamplingParams:
    """``params`` with the forced call's grammar (``tool_choice`` named / required), or with
    special tokens kept when ``auto``'s call marker is one (so the parser sees it); else
    ``params`` itself. See ``server/tools.py``.

    Raises:
        InvalidRequestError: a forced call, and the request sets its own output constraint.
    """
    if plan.mode == "auto" and tokenizer.is_special_token(plan.format.marker):
        return replace(params, skip_special_tokens=False)
    forced = plan.structured_output()
    if forced is None:
        return params
    if params.structured is not None:
        raise InvalidRequestError(
            f"tool_choice {plan.mode!r} constrains the output to a tool call, so it cannot "
            f"be combined with {params.structured.param}", param="tool_choice")
    return replace(params, structured=StructuredOutput(**forced))


def for_best_of(params: SamplingParams, body: CompletionRequest) -> SamplingParams:
    """The params of each of ``best_of`` candidates: with logprobs (at least the sampled
    token's, which ``beam.select_best_of`` ranks by) when there is a choice to make
    (``best_of`` > ``n``); ``params`` otherwise."""
    if body.num_candidates > body.num_choices and params.logprobs is None:
        return replace(params, logprobs=0)
    return params


def sampling_kwargs(body: AnyRequest) -> dict[str, Any]:
    """The request's sampling fields as ``SamplingParams`` keyword arguments (all but
    ``max_tokens``, the logprobs and ``structured``), OpenAI's defaults filled in for nulls
    (temperature 1, top_p 1, penalties 0; vLLM's top_k 0, min_p 0, repetition_penalty 1).
    Range checks happen in ``SamplingParams.validate``.

    Raises:
        InvalidRequestError: a ``logit_bias`` key that is not an integer.
    """
    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    return {
        "temperature": pick(body.temperature, 1.0),
        "top_p": pick(body.top_p, 1.0),
        "top_k": pick(body.top_k, 0),
        "min_p": pick(body.min_p, 0.0),
        "presence_penalty": pick(body.presence_penalty, 0.0),
        "frequency_penalty": pick(body.frequency_penalty, 0.0),
        "repetition_penalty": pick(body.repetition_penalty, 1.0),
        "seed": body.seed,
        "stop": [body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        "stop_token_ids": list(body.stop_token_ids or []),
        "ignore_eos": body.ignore_eos,
        "skip_special_tokens": body.skip_special_tokens,
        "include_stop_str_in_output": body.include_stop_str_in_output,
        "logit_bias": _token_logit_bias(body.logit_bias),
    }


def _token_logit_bias(logit_bias: dict[str, float] | None) -> dict[int, float]:
    """``logit_bias`` with its JSON string keys as token ids: ``{"50256": -100}`` ->
    ``{50256: -100}``.

    Raises:
        InvalidRequestError: a key that is not an integer (param ``logit_bias``).
    """
    out = {}
    for key, value in (logit_bias or {}).items():
        try:
            out[int(key)] = value
        except ValueError:
            raise InvalidRequestError(
                f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
            ) from None
    return out
