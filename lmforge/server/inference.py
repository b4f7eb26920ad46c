"""``POST /v1/chat/completions`` and ``POST /v1/completions`` on top of ``AsyncEngine``.

Flow per request: check the body -> check the model -> build ``SamplingParams``
(``server/sampling.py``) -> prompts to token ids (``prompts.encode_request``) -> start one engine
request per prompt and wait for each one's first output (the engine validates before its first
yield, so a bad prompt still gets a plain HTTP 400 even when streaming) -> either collect
everything into one response, or stream SSE chunks.

The engine requests behind one HTTP request, and how a disconnect aborts them, live in
``server/generation.py``; the chunks and the response built from their outputs in
``server/choices.py``.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response

from lmforge.engine.request import SamplingParams
from lmforge.errors import InvalidRequestError
from lmforge.protocol import ChatCompletionRequest, CompletionRequest
from lmforge.server import beam
from lmforge.server.choices import ChatChoices, CompletionChoices
from lmforge.server.generation import Generation, collect, request_priority, stream
from lmforge.server.logprobs import TokenTexts
from lmforge.server.models import requested_model, resolve_model, serve_on_first_use
from lmforge.server.prompts import chat_template_text, encode_request
from lmforge.server.routing import StrictJSONRoute
from lmforge.server.sampling import for_best_of, for_tools, sampling_params
from lmforge.server.tools import ToolPlan

if TYPE_CHECKING:
    from lmforge.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)
router = APIRouter(route_class=StrictJSONRoute)


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    """OpenAI "Create chat completion" (text only; ``n`` choices)."""
    engine: AsyncEngine = request.app.state.engine
    body.model = requested_model(engine, body.model)
    await serve_on_first_use(request, body.model)
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
    choices = ChatChoices(gen.id, gen.num_choices, body, tools, TokenTexts(engine.tokenizer),
                          params)
    if body.stream:
        return await stream(request, gen, choices.chunk, choices.opening(),
                            choices.usage_chunk() if body.include_usage else None,
                            continuous_usage=body.continuous_usage)
    results = await collect(request, gen)
    if isinstance(results, Response):
        return results
    return choices.response(results, gen.usage())


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request):
    """OpenAI "Create completion": ``n`` choices per prompt, generated concurrently; ``echo``
    puts each prompt (and, with ``logprobs``, its tokens' logprobs) before its completion;
    ``echo`` with ``max_tokens: 0`` returns only that (``Generation(prompt_only=True)``)."""
    engine: AsyncEngine = request.app.state.engine
    body.model = requested_model(engine, body.model)
    await serve_on_first_use(request, body.model)
    lora = _check_model(engine, body.model, beam.is_beam_search(body))
    body.check()
    if beam.is_beam_search(body):
        return await beam.create_completion(body, request)
    params = sampling_params(body)
    await _compile_grammar(engine, params)
    prompts, echoes = await encode_request(engine, body)
    n = body.num_choices
    gen = Generation(engine, f"cmpl-{uuid.uuid4().hex}", prompts,
                     for_best_of(params, body), body.num_candidates,
                     prompt_only=body.prompt_only, priority=request_priority(request),
                     lora=lora)
    choices = CompletionChoices(gen.id, body, prompts, echoes, n, TokenTexts(engine.tokenizer),
                                params)
    if body.stream:
        return await stream(request, gen, choices.chunk, [],
                            choices.usage_chunk() if body.include_usage else None,
                            continuous_usage=body.continuous_usage)
    results = await collect(request, gen)
    if isinstance(results, Response):
        return results
    return choices.response(beam.select_best_of(results, body.num_candidates, n), gen.usage())


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
