"""``POST /v1/chat/completions`` and ``POST /v1/completions`` on top of ``AsyncEngine``.

Flow per request: check the body -> check the model -> build ``SamplingParams`` -> prompts to
token ids -> start one engine request per prompt and wait for each one's first output (the engine
validates before its first yield, so a bad prompt still gets a plain HTTP 400 even when
streaming) -> either collect everything into one response, or stream SSE chunks.

A client disconnect aborts the engine requests: while we wait (priming, non-streaming collection)
a listener task on the ASGI ``receive`` channel cancels the wait; while streaming, Starlette
cancels the body iterator and ``SSEResponse`` closes it. Either way ``Generation.aclose()`` closes
the engine iterators, which aborts their requests and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from lmforge.engine.request import RequestOutput, SamplingParams, StructuredOutput, TokenLogprob
from lmforge.errors import (
    InternalServerError,
    InvalidRequestError,
    LMForgeError,
    ModelNotFoundError,
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
    Usage,
)
from lmforge.protocol.logprobs import CompletionLogprobs
from lmforge.server import beam
from lmforge.server.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from lmforge.server.sse import DONE, SSEResponse, sse_event
from lmforge.server.tools import ToolCallStream, ToolPlan

if TYPE_CHECKING:
    from lmforge.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)
router = APIRouter()

# (choice index, an engine delta or None for the finish chunk, finish_reason or None) -> one
# streamed chunk, or None when the delta has nothing to send
ChunkFactory = Callable[[int, "RequestOutput | None", "str | None"], "BaseModel | None"]


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    """OpenAI "Create chat completion" (text only; ``n`` choices)."""
    engine: AsyncEngine = request.app.state.engine
    _check_model(engine, body.model)
    body.check()
    if beam.is_beam_search(body):
        return await beam.create_chat_completion(body, request)
    tools = ToolPlan.of(body)
    params = _with_forced_tool_call(
        _sampling_params(body, body.requested_max_tokens, body.max_tokens_param,
                         logprobs=body.num_logprobs), tools)
    await _compile_grammar(engine, params)
    template = request.app.state.chat_template
    messages, template_kwargs = tools.render(
        [m.to_template_dict() for m in body.messages],
        template if template is not None else engine.tokenizer.chat_template)
    prompt = engine.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, chat_template=template, **template_kwargs)
    gen = Generation(engine, f"chatcmpl-{uuid.uuid4().hex}", [prompt], params, body.num_choices)
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
        return await _stream(request, gen, chunk, roles, usage_chunk if body.include_usage
                             else None)
    results = await _collect(request, gen)
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
    puts each prompt (and, with ``logprobs``, its tokens' logprobs) before its completion."""
    engine: AsyncEngine = request.app.state.engine
    _check_model(engine, body.model)
    body.check()
    if beam.is_beam_search(body):
        return await beam.create_completion(body, request)
    params = _sampling_params(body, body.max_tokens, "max_tokens", logprobs=body.logprobs,
                              prompt_logprobs=body.logprobs if body.echo else None)
    await _compile_grammar(engine, params)
    tokenizer = engine.tokenizer
    prompts = [tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else p
               for p in body.prompts()]
    echoes = ([p if isinstance(p, str) else tokenizer.decode(ids, skip_special_tokens=False)
               for p, ids in zip(body.prompts(), prompts)] if body.echo else [""] * len(prompts))
    n = body.num_choices
    gen = Generation(engine, f"cmpl-{uuid.uuid4().hex}", prompts,
                     beam.candidate_params(params, body), body.num_candidates)  # best_of
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
        return await _stream(request, gen, chunk, [], usage_chunk if body.include_usage
                             else None)
    results = await _collect(request, gen)
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


def _check_model(engine: AsyncEngine, model: str) -> None:
    if model != engine.model_name:
        raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")


def _sampling_params(body: ChatCompletionRequest | CompletionRequest, max_tokens: int | None,
                     max_tokens_param: str, **extra: Any) -> SamplingParams:
    """``SamplingParams`` from the body; its range errors name the parameter the client sent."""
    try:
        spec = body.structured_output()
        return SamplingParams(max_tokens=max_tokens, **body.sampling_kwargs(), **extra,
                              structured=StructuredOutput(**spec) if spec else None)
    except InvalidRequestError as e:
        raise e.renamed("max_tokens", max_tokens_param)


def _with_forced_tool_call(params: SamplingParams, tools: ToolPlan) -> SamplingParams:
    """With ``tool_choice`` required or a named function, generate under the call's schema.

    Raises:
        InvalidRequestError: the request also sets its own output constraint.
    """
    forced = tools.structured_output()
    if forced is None:
        return params
    if params.structured is not None:
        raise InvalidRequestError(
            f"tool_choice {tools.mode!r} constrains the output to a tool call, so it cannot be "
            f"combined with {params.structured.param}", param="tool_choice")
    return replace(params, structured=StructuredOutput(**forced))


async def _compile_grammar(engine: AsyncEngine, params: SamplingParams) -> None:
    """Compile (and so validate) the request's grammar off the event loop: the first one also
    builds the grammar library's view of the vocabulary (~0.5 s). The engine then finds it in
    its cache.

    Raises:
        InvalidRequestError: an invalid schema, regex or choice list, naming the parameter.
    """
    if params.structured is not None:
        await asyncio.to_thread(engine.engine.structured.compile, params.structured)


@dataclass
class ChoiceResult:
    """One choice, run to the end."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None


async def _collect(request: Request, gen: Generation) -> list[ChoiceResult] | Response:
    """Run ``gen`` to the end: one result per choice, or an empty response when the client went
    away (nobody will read it)."""
    try:
        await gen.start(request)
        results = [ChoiceResult() for _ in range(gen.num_choices)]
        async for index, out in gen.outputs():
            r = results[index]
            r.text += out.text
            r.token_ids += out.token_ids
            r.logprobs += out.logprobs or []
            if out.prompt_logprobs is not None:
                r.prompt_logprobs = out.prompt_logprobs
            r.finish_reason = out.finish_reason
        return results
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        await gen.aclose()


async def _stream(request: Request, gen: Generation, chunk: ChunkFactory,
                  opening: list[BaseModel], usage_chunk: BaseModel | None) -> Response:
    """Start ``gen`` (errors so far become plain HTTP errors) and return its SSE response."""
    try:
        await gen.start(request)
    except ClientDisconnected:
        await gen.aclose()
        return Response(status_code=499)
    except BaseException:
        await gen.aclose()
        raise
    await gen.stop_watching()
    return SSEResponse(_sse_events(gen, chunk, opening, usage_chunk), on_close=gen.aclose)


async def _sse_events(gen: Generation, chunk: ChunkFactory, opening: list[BaseModel],
                      usage_chunk: BaseModel | None) -> AsyncIterator[str]:
    """The SSE body: opening chunks, one chunk per non-empty delta, one ``finish_reason`` chunk
    per choice, the usage chunk if asked for, ``[DONE]``. Errors become an error event."""
    try:
        for c in opening:
            yield sse_event(c)
        async for index, out in gen.outputs():
            delta = chunk(index, out, None)
            if delta is not None:
                yield sse_event(delta)
            if out.finished:
                yield sse_event(chunk(index, None, out.finish_reason or "stop"))
        if usage_chunk is not None:
            yield sse_event(usage_chunk.model_copy(update={"usage": gen.usage()}))
    except LMForgeError as e:
        yield sse_event(e.to_envelope())
    except Exception:
        logger.exception("error while streaming %s", gen.id)
        yield sse_event(InternalServerError().to_envelope())
    finally:
        await gen.aclose()
    yield DONE


class ClientDisconnected(Exception):
    """The HTTP client went away while we waited for the engine."""


class Generation:
    """The engine requests behind one HTTP request: ``n`` per prompt, all run concurrently.

    Choice ``i * n + j`` is prompt i's j-th sample (OpenAI's order). The first choice of a prompt
    computes it; the other n - 1 wait for that and read its KV blocks from the prefix cache
    (``LLMEngine.add_request(after=)``); a seeded request gives choice j the seed ``seed + j``
    (vLLM's convention), so the choices differ and each is reproducible.

    ``start()`` waits for every choice's first output, so validation errors (raised by the
    engine before its first yield) surface before any response is sent; ``outputs()`` then
    yields ``(choice index, RequestOutput delta)`` in arrival order; ``aclose()`` cancels what is
    pending and closes every engine iterator, which aborts unfinished requests.
    """

    def __init__(self, engine: AsyncEngine, response_id: str, prompts: list[list[int]],
                 params: SamplingParams, n: int = 1):
        self.id = response_id
        self.n = n
        self.num_choices = len(prompts) * n
        self._iters = []
        for i, prompt in enumerate(prompts):
            first = None
            for j in range(n):
                rid = response_id if self.num_choices == 1 else f"{response_id}-{i * n + j}"
                choice_params = params if j == 0 or params.seed is None else replace(
                    params, seed=params.seed + j)
                self._iters.append(engine.generate(rid, prompt, choice_params, after=first))
                first = first or rid
        self._pending: dict[asyncio.Future, int] = {}  # next-output task -> choice index
        self._last: list[RequestOutput | None] = [None] * self.num_choices
        self._watcher: asyncio.Future | None = None  # resolves when the client disconnects

    async def start(self, request: Request) -> None:
        """Wait for each prompt's first output, watching for a disconnect meanwhile.

        Raises:
            InvalidRequestError / ContextLengthExceededError: from the engine's validation.
            ClientDisconnected: the client went away first.
        """
        self._watcher = asyncio.ensure_future(_wait_disconnect(request))
        for index in range(self.num_choices):
            self._schedule(index)
        while not all(task.done() for task in self._pending):
            for task in await self._wait_any():
                task.result()  # re-raise the engine's error at once

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Deltas of all prompts until each has finished (raising ``ClientDisconnected`` if the
        client goes away, unless ``stop_watching()`` handed that job to the caller)."""
        while self._pending:
            ready = [t for t in self._pending if t.done()] or await self._wait_any()
            for task in sorted(ready, key=self._pending.__getitem__):
                index = self._pending.pop(task)
                out = task.result()
                if out is None:  # iterator ended without a finished output
                    continue
                self._last[index] = out
                if not out.finished:
                    self._schedule(index)  # the engine keeps going while we send this one
                yield index, out

    def usage(self) -> Usage:
        """Token counts from each choice's latest output: generated tokens summed over all
        choices, each prompt (and its cache hits) counted once, from its first choice."""
        last = [o for o in self._last if o is not None]
        firsts = [o for i, o in enumerate(self._last) if o is not None and i % self.n == 0]
        return Usage.of(sum(o.num_prompt_tokens for o in firsts),
                        sum(o.num_output_tokens for o in last),
                        sum(o.num_cached_tokens for o in firsts))

    async def aclose(self) -> None:
        """Cancel pending work and close the engine iterators (aborting unfinished requests).
        Idempotent."""
        await self.stop_watching()
        tasks = list(self._pending)
        self._pending.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for it in self._iters:
            await it.aclose()

    def _schedule(self, index: int) -> None:
        self._pending[asyncio.ensure_future(_next_output(self._iters[index]))] = index

    async def _wait_any(self) -> set[asyncio.Future]:
        waiting = {t for t in self._pending if not t.done()}
        if self._watcher is not None:
            waiting.add(self._watcher)
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if self._watcher in done:
            raise ClientDisconnected
        return done

    async def stop_watching(self) -> None:
        """Stop listening for the disconnect (Starlette's streaming response listens itself)."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None


async def _next_output(it: AsyncIterator[RequestOutput]) -> RequestOutput | None:
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None


async def _wait_disconnect(request: Request) -> None:
    """Return when the ASGI server reports ``http.disconnect`` (the body is already read, so
    nothing else can arrive on ``receive``)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
