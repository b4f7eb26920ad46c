"""The engine requests behind one HTTP request (``Generation``) and the ways a route runs them:
collected into one response (``collect``) or streamed as SSE (``stream``), with a client disconnect
aborting the engine work either way (``wait_disconnect``, ``until_disconnected``).

While we wait (priming, non-streaming collection) a listener task on the ASGI ``receive`` channel
cancels the wait; while streaming, Starlette cancels the body iterator and ``SSEResponse`` closes
it. Either way ``Generation.aclose()`` closes the engine iterators, which aborts their requests and
frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

from fastapi import Request, Response
from pydantic import BaseModel

from lmforge.engine.request import (
    ONLINE_PRIORITY,
    CompletionOutput,
    RequestOutput,
    SamplingParams,
)
from lmforge.errors import InternalServerError, LMForgeError
from lmforge.jobs.worker import PRIORITY_SCOPE_KEY
from lmforge.protocol import Usage
from lmforge.server.sse import DONE, SSEResponse, sse_event

if TYPE_CHECKING:
    from lmforge.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)
T = TypeVar("T")

def request_priority(request: Request) -> int:
    """The engine priority of this HTTP request: its scope's ``PRIORITY_SCOPE_KEY``, else 0.

    Only in-process callers can set that scope key (the batch worker calls the app through
    ``jobs.worker.in_process_client``); an HTTP client cannot, headers do not reach the scope.
    """
    return request.scope.get(PRIORITY_SCOPE_KEY, ONLINE_PRIORITY)


# (choice index, an engine delta or None for the finish chunk, finish_reason or None) -> one
# streamed chunk, or None when the delta has nothing to send
ChunkFactory = Callable[[int, "RequestOutput | None", "str | None"], "BaseModel | None"]


async def collect(request: Request, gen: Generation) -> list[CompletionOutput] | Response:
    """Run ``gen`` to the end: one result per choice, or an empty response when the client went
    away (nobody will read it)."""
    try:
        await gen.start(request)
        results = [CompletionOutput() for _ in range(gen.num_choices)]
        async for index, out in gen.outputs():
            results[index].add(out)
        return results
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        await gen.aclose()


async def stream(request: Request, gen: Generation, chunk: ChunkFactory,
                  opening: list[BaseModel], usage_chunk: BaseModel | None,
                  continuous_usage: bool = False) -> Response:
    """Start ``gen`` (errors so far become plain HTTP errors) and return its SSE response;
    with ``continuous_usage`` (vLLM's ``continuous_usage_stats``) every chunk carries the
    usage so far."""
    try:
        await gen.start(request)
    except ClientDisconnected:
        await gen.aclose()
        return Response(status_code=499)
    except BaseException:
        await gen.aclose()
        raise
    await gen.stop_watching()
    return SSEResponse(sse_events(gen, chunk, opening, usage_chunk, continuous_usage),
                       on_close=gen.aclose)


async def sse_events(gen: Generation, chunk: ChunkFactory, opening: list[BaseModel],
                      usage_chunk: BaseModel | None, continuous_usage: bool = False
                      ) -> AsyncIterator[str]:
    """The SSE body: opening chunks, one chunk per non-empty delta, one ``finish_reason`` chunk
    per choice, the usage chunk if asked for, ``[DONE]``. Errors become an error event."""
    def event(c: BaseModel) -> str:
        return sse_event(c.model_copy(update={"usage": gen.usage()}) if continuous_usage else c)

    try:
        for c in opening:
            yield event(c)
        async for index, out in gen.outputs():
            delta = chunk(index, out, None)
            if delta is not None:
                yield event(delta)
            if out.finished:
                yield event(chunk(index, None, out.finish_reason or "stop"))
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
    (vLLM's convention), so the choices differ and each is reproducible. Seeded choices do not
    wait: they never read the prefix cache (``Request.reads_prefix_cache``), so each computes
    the prompt itself.

    ``prompt_only`` (completions' ``echo`` with ``max_tokens: 0``, which lm-eval-harness uses to
    score a prompt): each request runs one step, for the prompt's logprobs, and its output is
    shown without the token sampled in that step: no text, no tokens, ``finish_reason``
    "length", 0 completion tokens (as the OpenAI API and vLLM answer it).

    ``priority`` goes to every engine request (``request_priority`` reads it from the route's
    ASGI scope).

    ``start()`` waits for every choice's first output, so validation errors (raised by the
    engine before its first yield) surface before any response is sent; ``outputs()`` then
    yields ``(choice index, RequestOutput delta)`` in arrival order; ``aclose()`` cancels what is
    pending and closes every engine iterator, which aborts unfinished requests. ``lora``: the
    LoRA adapter every choice runs with (None: the base model).
    """

    def __init__(self, engine: AsyncEngine, response_id: str, prompts: list[list[int]],
                 params: SamplingParams, n: int = 1, prompt_only: bool = False,
                 priority: int = ONLINE_PRIORITY, lora: str | None = None):
        self.id = response_id
        self.n = n
        self.prompt_only = prompt_only
        if prompt_only:
            params = replace(params, max_tokens=1)
        self.num_choices = len(prompts) * n
        self._iters = []
        for i, prompt in enumerate(prompts):
            first = None
            for j in range(n):
                rid = response_id if self.num_choices == 1 else f"{response_id}-{i * n + j}"
                choice_params = params if j == 0 or params.seed is None else replace(
                    params, seed=params.seed + j)
                self._iters.append(engine.generate(
                    rid, prompt, choice_params, priority=priority, lora=lora,
                    after=first if params.seed is None else None))
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
        self._watcher = asyncio.ensure_future(wait_disconnect(request))
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
                if self.prompt_only:
                    out = replace(out, text="", token_ids=[], num_output_tokens=0,
                                  logprobs=None if out.logprobs is None else [],
                                  finish_reason="length" if out.finish_reason in ("stop", "length")
                                  else out.finish_reason)
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


async def wait_disconnect(request: Request) -> None:
    """Return when the ASGI server reports ``http.disconnect`` (the body is already read, so
    nothing else can arrive on ``receive``)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass



async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await ``work``, or cancel it and return None if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    return None if task.cancelled() else task.result()
