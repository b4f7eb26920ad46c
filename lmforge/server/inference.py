"""``POST /v1/chat/completions`` and ``POST /v1/completions`` on top of ``AsyncEngine``.

Flow per request: check the body -> check the model -> build ``SamplingParams``
(``server/sampling.py``) -> prompts to token ids (``prompts.encode_request``) -> start one engine
request per prompt and wait for each one's first output (the engine validates before its first
yield, so a bad prompt still gets a plain HTTP 400 even when streaming) -> either collect
everything into one response, or stream SSE chunks.

The engine requests behind one HTTP request, and how a disconnect aborts them, live in
``server/generation.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response

from lmforge.engine.request import RequestOutput, SamplingParams, TokenLogprob
from lmforge.errors import (
    InvalidRequestError,
)
from lmforge.protocol import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
)
from lmforge.protocol.logprobs import CompletionLogprobs
from lmforge.server import beam
from lmforge.server.generation import Generation, collect, request_priority, stream
from lmforge.server.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from lmforge.server.models import requested_model, resolve_model
from lmforge.server.prompts import chat_template_text, encode_request
from lmforge.server.routing import StrictJSONRoute
from lmforge.server.sampling import for_best_of, for_tools, sampling_params
from lmforge.server.tools import ToolCallStream, ToolPlan

if TYPE_CHECKING:
    from lmforge.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)
router = APIRouter(route_class=StrictJSONRoute)


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    """OpenAI "Create chat completion" (text only; ``n`` choices)."""
    engine: AsyncEngine = request.app.state.engine
    body.model = requested_model(engine, body.model)
    lora = _check_model(engine, body.model, beam.is_beam_search(body))
    body.check()
    if beam.is_beam_search(body):
        return await beam.create_chat_completion(body, request)
    template = request.app.state.chat_template
    tools = ToolPlan.of(body, chat_template_text(engine, template))
    params = for_tools(sampling_params(body), tools, engine.tokenizer)
    await _compile_grammar(engine, params)
    prompts, _ = await encode_request(engine, body, chat_template=template, plan=tools)
    gen = Generation(engine, f"chatcmpl-{uuid.uuid4().hex}", prompts, params, body.num_choices,
                     priority=request_priority(request), lora=lora)
    created = int(time.time())
    texts = TokenTexts(engine.tokenizer)
    streams = [ToolCallStream(tools) for _ in range(gen.num_choices)]

    def chunk(index: int, out: RequestOutput | None, finish_reason: str | None
              ) -> ChatCompletionChunk | None:
        if out is None:
            content, calls, finish_reason = streams[index].finish(finish_reason)
        else:
            content, calls = streams[index].feed(out.text)
            if not content and not calls and not out.logprobs:
                return None
        delta = ChatDelta(content=content or None, tool_calls=calls or None)
        logprobs = None if out is None or out.logprobs is None else chat_logprobs(texts,
                                                                                 out.logprobs)
        choice = ChatCompletionChunkChoice(index=index, delta=delta, logprobs=logprobs,
                                           finish_reason=finish_reason)
        return ChatCompletionChunk(id=gen.id, created=created, model=body.model, choices=[choice])

    if body.stream:
        roles = [ChatCompletionChunk(id=gen.id, created=created, model=body.model, choices=[
            ChatCompletionChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
            for i in range(gen.num_choices)]
        usage_chunk = ChatCompletionChunk(id=gen.id, created=created, model=body.model,
                                          choices=[])
        return await stream(request, gen, chunk, roles, usage_chunk if body.include_usage
                             else None, continuous_usage=body.continuous_usage)
    results = await collect(request, gen)
    if isinstance(results, Response):
        return results
    choices = []
    for i, r in enumerate(results):
        content, calls, finish_reason = tools.parse(r.text, r.finish_reason)
        choices.append(ChatCompletionChoice(
            index=i, message=ChatCompletionMessage(content=content, tool_calls=calls or None),
            logprobs=None if params.logprobs is None else chat_logprobs(texts, r.logprobs),
            finish_reason=finish_reason))
    return ChatCompletion(id=gen.id, created=created, model=body.model, usage=gen.usage(),
                          choices=choices)


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request):
    """OpenAI "Create completion": ``n`` choices per prompt, generated concurrently; ``echo``
    puts each prompt (and, with ``logprobs``, its tokens' logprobs) before its completion;
    ``echo`` with ``max_tokens: 0`` returns only that (``Generation(prompt_only=True)``)."""
    engine: AsyncEngine = request.app.state.engine
    body.model = requested_model(engine, body.model)
    lora = _check_model(engine, body.model, beam.is_beam_search(body))
    body.check()
    if beam.is_beam_search(body):
        return await beam.create_completion(body, request)
    params = sampling_params(body)
    await _compile_grammar(engine, params)
    tokenizer = engine.tokenizer
    prompts, echoes = await encode_request(engine, body)
    n = body.num_choices
    gen = Generation(engine, f"cmpl-{uuid.uuid4().hex}", prompts,
                     for_best_of(params, body), body.num_candidates,
                     prompt_only=body.prompt_only, priority=request_priority(request),
                     lora=lora)
    created = int(time.time())
    texts = TokenTexts(tokenizer)
    offsets = [0] * gen.num_choices  # characters of each choice's text sent so far

    def choice_logprobs(index: int, token_ids: list[int], entries: list[TokenLogprob],
                        prompt_entries: list[TokenLogprob | None] | None, offset: int = 0
                        ) -> CompletionLogprobs | None:
        """Logprobs of these tokens, preceded by the prompt's when ``prompt_entries`` is set."""
        if params.logprobs is None:
            return None
        if prompt_entries is not None:
            token_ids, entries = prompts[index // n] + token_ids, list(prompt_entries) + entries
        return completion_logprobs(texts, token_ids, entries, offset)

    def chunk(index: int, out: RequestOutput | None, finish_reason: str | None
              ) -> Completion | None:
        text, logprobs = "", None
        if out is not None:
            text = (echoes[index // n] if _first(out) else "") + out.text
            logprobs = choice_logprobs(index, out.token_ids, out.logprobs or [],
                                       out.prompt_logprobs, offsets[index])  # echo: 1st delta
            offsets[index] += len(text)
            if not text and logprobs is None:
                return None
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs,
                                  finish_reason=finish_reason)
        return Completion(id=gen.id, created=created, model=body.model, choices=[choice])

    if body.stream:
        usage_chunk = Completion(id=gen.id, created=created, model=body.model, choices=[])
        return await stream(request, gen, chunk, [], usage_chunk if body.include_usage
                             else None, continuous_usage=body.continuous_usage)
    results = await collect(request, gen)
    if isinstance(results, Response):
        return results
    results = beam.select_best_of(results, body.num_candidates, n)
    choices = [CompletionChoice(
        index=i, text=echoes[i // n] + r.text, finish_reason=r.finish_reason,
        logprobs=choice_logprobs(i, r.token_ids, r.logprobs, r.prompt_logprobs if body.echo
                                 else None))
        for i, r in enumerate(results)]
    return Completion(id=gen.id, created=created, model=body.model, usage=gen.usage(),
                      choices=choices)


def _first(out: RequestOutput) -> bool:
    """Whether this delta is the request's first (it carries its first generated token)."""
    return out.num_output_tokens == len(out.token_ids)


def _check_model(engine: AsyncEngine, model: str, beam_search: bool) -> str | None:
    """The LoRA adapter ``model`` names (None: the base model).

    Raises:
        ModelNotFoundError: an unknown model. InvalidRequestError: beam search on an adapter.
    """
    lora = resolve_model(engine, model)
    if lora is not None and beam_search:
        raise InvalidRequestError("beam search runs on the base model only; drop num_beams / "
                                  "use_beam_search or use the base model", param="model")
    return lora


async def _compile_grammar(engine: AsyncEngine, params: SamplingParams) -> None:
    """Compile (and so validate) the request's grammar off the event loop: the first one also
    builds the grammar library's view of the vocabulary (~0.5 s). The engine then finds it in
    its cache.

    Raises:
        InvalidRequestError: an invalid schema, regex or choice list, naming the parameter.
    """
    if params.structured is not None:
        await engine.compile_grammar(params.structured)
