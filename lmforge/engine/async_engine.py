"""AsyncEngine: the engine loop on a background thread, per-request asyncio queues, abort.

The loop thread owns the LLMEngine, and it is also the thread that loads it. Measured on CPU: a
thread that runs the model after ANOTHER thread ran torch ops (loading it) decodes ~1.7x slower
(55 vs 33 ms per SmolLM2 step), likely because OpenMP keeps one worker team per calling thread
and two teams then share the cores. So ``from_config`` (and ``load_in_background``, which
lets a server listen while the model loads) builds the engine on the same single-thread
executor that later runs the loop.

It is the only door into the engine: callers (server, jobs, beam search) use its methods, never
the ``LLMEngine`` inside. Changes travel as commands (``engine/commands.py``) through a queue
drained at the start of every step, so an abort frees its KV blocks within one step; reads
(``lora_names``, ``validate_prompt``) touch only what the loop never changes in place, or copy.
A step's outputs travel back with one ``loop.call_soon_threadsafe`` per event loop. Torch
kernels release the GIL, so the HTTP event loop stays responsive while the model runs.

Embeddings (``embed``) run on the loop thread too (``StartEmbedding``): each loop iteration
computes one piece (at most ``max_num_batched_tokens`` tokens) of the oldest embedding request
of the best priority, then one ``engine.step()``, so a long embedding batch slows generation
steps down but never stalls them for more than one piece. They do not go through the scheduler,
so their ``priority`` is applied here as the scheduler applies it to prefill: a batch
(priority > 0) embedding runs in pieces of ``max_background_prefill_tokens`` and waits while a
better-priority generation request waits or prefills.

``generate`` admits a request only while the waiting backlog is under its limits, and counts
what it delivers (``engine/admission.py``; ``server/metrics.py`` exports the counters).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor

from lmforge.config import EngineConfig
from lmforge.engine.admission import Admission
from lmforge.engine.commands import (
    AbortRequest,
    AddRequest,
    CallOnLoop,
    Command,
    StartEmbedding,
)
from lmforge.engine.llm_engine import LLMEngine
from lmforge.engine.memory import MemoryReleaser, MemoryReport, release_free_memory
from lmforge.engine.metrics import EngineStats, RequestCounters
from lmforge.engine.pooling import EmbeddingTask
from lmforge.engine.request import (
    ONLINE_PRIORITY,
    RequestOutput,
    SamplingParams,
    StructuredOutput,
)
from lmforge.errors import (
    EngineDeadError,
    InternalServerError,
    InvalidRequestError,
    LMForgeError,
    ServiceUnavailableError,
)
from lmforge.startup import StartupProfile, phase

logger = logging.getLogger(__name__)


class AsyncEngine:
    """Serves many concurrent ``generate`` calls from one engine loop thread.

    Args:
        engine: the LLMEngine to drive; only the loop thread touches it after ``start()``.
        executor: the single thread that runs the loop (and, via ``from_config``, loaded it).
    """

    def __init__(self, engine: LLMEngine, executor: ThreadPoolExecutor | None = None):
        self.engine = engine  # the loop thread's: outside engine/, use the methods below
        self.config = engine.config
        self.tokenizer = engine.tokenizer
        self.model_name, self.kernels = engine.model_name, engine.kernels
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size
        self.embedding_size = engine.model_runner.model.config.hidden_size
        self.created = int(time.time())
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        # loop thread only; oldest first; request id -> (priority, task)
        self._embeddings: dict[str, tuple[int, EmbeddingTask]] = {}
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="lmforge-engine")
        self._loop_future: Future | None = None
        self.error: BaseException | None = None  # set when the loop died
        self.last_step_time = time.monotonic()
        self.admission = Admission(engine.config.scheduler)
        self.memory = MemoryReleaser()  # loop thread only

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        """Load the model on the engine thread (blocking) and wrap it; raises as ``LLMEngine``
        (``ModelLoadError``, ``ValueError``)."""
        return cls.load_in_background(config).result()

    @classmethod
    def load_in_background(cls, config: EngineConfig, profile: StartupProfile | None = None
                           ) -> Future[AsyncEngine]:
        """Start loading the model on a new engine thread (the loop's, see the module docstring)
        and return at once: a future of the AsyncEngine, or of ``LLMEngine``'s error."""
        executor = ThreadPoolExecutor(1, thread_name_prefix="lmforge-engine")

        def load() -> AsyncEngine:
            try:
                engine = cls(LLMEngine(config, profile=profile), executor)
                with phase(profile, "memory trim"):
                    release_free_memory()  # loading left ~1 GB freed in this thread's arena
                return engine
            except BaseException:
                executor.shutdown(wait=False)
                raise

        return executor.submit(load)

    def start(self) -> None:
        """Start the loop thread (idempotent)."""
        if self._loop_future is None:
            self._loop_future = self._executor.submit(self._run)

    def shutdown(self) -> None:
        """Stop the loop thread; in-flight requests fail with a 503 ``ServiceUnavailableError``."""
        self._stopping.set()
        self._wakeup.set()
        self.abort_all(ServiceUnavailableError("the server is shutting down; retry on another "
                                               "replica or after the restart",
                                               code="shutting_down"))
        if self._loop_future is not None:
            try:
                self._loop_future.exception(timeout=10)  # waits for the loop to return
            except TimeoutError:
                logger.warning("the engine loop did not stop within 10 s")
        self._executor.shutdown(wait=False)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, after: str | None = None, *,
                       admitted: bool = False, priority: int = ONLINE_PRIORITY,
                       lora: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's output deltas until one has ``finished=True``.

        ``after`` and ``priority``: as ``LLMEngine.add_request`` (the other choices of an ``n`` > 1
        request wait for the first one's prompt and share its KV blocks; batch jobs run at
        ``BATCH_PRIORITY``, behind online requests). ``admitted``: this is an internal
        continuation of a request already admitted and counted (a beam-search step after the
        first), so neither the waiting limits nor the request metrics see it: a search is never
        refused halfway. ``lora``: a registered adapter's name (``add_lora``), None = the base
        model. Validation errors are raised before the first yield. Leaving the
        iteration early (``aclose()``, cancellation, client disconnect) aborts the request.

        Raises:
            InvalidRequestError, ContextLengthExceededError: bad prompt or parameters, an
                unknown ``lora``; or, after the request's last output, its grammar failed
                mid-generation (``RequestOutput.error``).
            ModelLoadError: the adapter's files cannot be read or do not fit the model.
            EngineDeadError: the engine loop has stopped.
            RateLimitError: too many requests or prompt tokens wait already (``Admission.admit``).
        """
        self.validate_prompt(prompt_token_ids, params)
        if lora is not None:
            self.engine.loras.get(lora)  # a dict read: raises for an unknown name, before queuing
        if self.error is not None or self._stopping.is_set():
            raise EngineDeadError("the engine loop has stopped; restart the server")
        ticket = self.admission.admit(len(prompt_token_ids), counted=not admitted)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._send(AddRequest(request_id, list(prompt_token_ids), params, after, priority, lora))
        finished = False
        try:
            while not finished:
                out = await stream.get()
                if isinstance(out, BaseException):
                    raise out
                if out.error is not None:  # finished by its own fault, e.g. a failed grammar
                    raise InvalidRequestError(out.error, param=out.error_param)
                ticket.delivered(out)
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            ticket.close()
            if not finished:
                self.abort(request_id)

    def abort_all(self, error: LMForgeError) -> None:
        """Fail every in-flight ``generate`` with ``error`` (a stream ends with it as an error
        event); their requests are aborted and their KV blocks freed at the next step."""
        for request_id in list(self._streams):
            self._deliver(request_id, error)

    @property
    def backlog(self) -> tuple[int, int]:
        """(requests, prompt tokens) admitted and still waiting for their first token."""
        return self.admission.backlog

    @property
    def counters(self) -> RequestCounters:
        """Cumulative request metrics (``engine/admission.py``)."""
        return self.admission.counters

    async def embed(self, request_id: str, prompts: list[list[int]],
                    priority: int = ONLINE_PRIORITY) -> list[list[float]]:
        """Embeddings of token-id prompts: one list of ``embedding_size`` floats (a unit vector,
        ``lmforge.engine.pooling``) per prompt, in prompt order.

        Validated here, then computed on the loop thread a piece per loop iteration, between
        engine steps, best ``priority`` first (see the module docstring). Cancelling the call (a
        client disconnect) drops the unfinished work at the next iteration.

        Raises:
            InvalidRequestError, ContextLengthExceededError: bad prompts (nothing is queued).
            EngineDeadError: the engine loop has stopped.
            InternalServerError: the computation failed (logged; generation goes on).
        """
        task = self.engine.start_embedding(prompts, priority)
        if self.error is not None or self._stopping.is_set():
            raise EngineDeadError("the engine loop has stopped; restart the server")
        result: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), result)
        self._send(StartEmbedding(request_id, priority, task))
        try:
            out = await result.get()
        except BaseException:
            self.abort(request_id)
            raise
        finally:
            self._streams.pop(request_id, None)
        if isinstance(out, BaseException):
            raise out
        return out

    async def add_lora(self, name: str, directory: str) -> None:
        """``LLMEngine.add_lora`` on the loop thread, between steps (same errors)."""
        await self._call(self.engine.add_lora, name, directory)

    async def remove_lora(self, name: str) -> None:
        """``LLMEngine.remove_lora`` on the loop thread, between steps (same errors)."""
        await self._call(self.engine.remove_lora, name)

    async def _call(self, fn, *args):
        """Run ``fn(*args)`` on the loop thread (which owns the model) and await its result.
        Before ``start()`` the caller's thread runs it, as nothing else touches the engine."""
        if self._loop_future is None:
            return fn(*args)
        if self.error is not None or self._stopping.is_set():
            raise EngineDeadError("the engine loop has stopped; restart the server")
        future: Future = Future()
        self._send(CallOnLoop(future, fn, args))
        return await asyncio.wrap_future(future)

    def abort(self, request_id: str) -> None:
        """Abort a request; its KV blocks are freed at the start of the next step."""
        self._send(AbortRequest(request_id))

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """``LLMEngine.validate_prompt`` in the caller's thread (it reads only what the loop
        never changes: the vocabulary, the context length, the compiled-grammar cache).

        Raises:
            InvalidRequestError, ContextLengthExceededError: as ``LLMEngine.validate_prompt``.
        """
        self.engine.validate_prompt(prompt_token_ids, params)

    async def compile_grammar(self, structured: StructuredOutput) -> None:
        """Compile (and so validate) a grammar in a worker thread, into the engine's cache: the
        first one also builds the grammar library's view of the vocabulary (~0.5 s).

        Raises:
            InvalidRequestError: an invalid schema, regex or choice list, naming the parameter.
        """
        await asyncio.to_thread(self.engine.structured.compile, structured)

    def lora_names(self) -> list[str]:
        """The registered LoRA adapters' names, sorted (a copy: the loop thread owns them)."""
        return sorted(self.engine.loras.registered)

    def has_lora(self, name: str) -> bool:
        """Whether an adapter of that name is registered (a dict read, no copy)."""
        return name in self.engine.loras.registered

    def lora_directory(self, name: str) -> str:
        """The directory a registered adapter was loaded from.

        Raises:
            InvalidRequestError: no adapter of that name.
        """
        return self.engine.loras.get(name).directory

    def memory_report(self) -> MemoryReport:
        """``LLMEngine.memory_report``: plain reads of counters the loop thread updates."""
        return self.engine.memory_report()

    def stats(self) -> EngineStats:
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        return EngineStats(len(scheduler.running), scheduler.num_waiting,
                           blocks.num_free_blocks, blocks.num_blocks,
                           blocks.num_queries, blocks.num_hits)

    def _send(self, command: Command) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._drain_commands()
                if not self.engine.has_unfinished_requests() and not self._embeddings:
                    self.memory.after_iteration(idle=True)
                    self._wakeup.wait(timeout=1.0)
                    self._wakeup.clear()
                    self.last_step_time = time.monotonic()  # idle is healthy
                    continue
                self._embed_piece()
                self._deliver_all([(out.request_id, out) for out in self.engine.step()])
                self.last_step_time = time.monotonic()
                self.memory.after_iteration(idle=False)
        except BaseException as e:  # the engine is broken: fail everyone, loudly
            logger.exception("engine loop died")
            self.error = e
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDeadError("the engine loop failed; see the "
                                                          "server log and restart the server"))

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            self._apply(command)

    def _apply(self, command: Command) -> None:
        """Carry out one command on the loop thread."""
        match command:
            case AddRequest():
                try:
                    self.engine.add_request(command.request_id, command.prompt_token_ids,
                                            command.params, command.after, command.priority,
                                            command.lora)
                except LMForgeError as e:
                    self._deliver(command.request_id, e)
            case AbortRequest():
                self.engine.abort_request(command.request_id)
                self._embeddings.pop(command.request_id, None)
            case StartEmbedding():
                self._embeddings[command.request_id] = (command.priority, command.task)
            case CallOnLoop():  # add_lora / remove_lora: run here, answer the future
                try:
                    command.future.set_result(command.fn(*command.args))
                except Exception as e:
                    command.future.set_exception(e)

    def _embed_piece(self) -> None:
        """One piece of the oldest embedding request of the best priority (none while a
        better-priority generation request waits or prefills); its vectors go out once done."""
        if not self._embeddings:
            return
        request_id, (priority, task) = min(self._embeddings.items(), key=lambda kv: kv[1][0])
        urgent = self.engine.scheduler.pending_prefill_priority()
        if urgent is not None and urgent < priority:
            return
        try:
            done = task.step()
            result = task.result().tolist() if done else None
        except Exception:  # the task has its own scratch KV: the engine's state is untouched
            logger.exception("embedding request %s failed", request_id)
            done, result = True, InternalServerError()
        if done:
            del self._embeddings[request_id]
            self._deliver(request_id, result)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand items to their streams with ONE wake-up per event loop, not one per request: each
        ``call_soon_threadsafe`` writes to the loop's self-pipe and takes the GIL back."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for request_id, item in items:
            target = self._streams.get(request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the caller's event loop is closed; nobody is listening
                pass


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for stream, item in items:
        stream.put_nowait(item)
