"""AsyncEngine: the engine loop on a background thread, per-request asyncio queues, abort.

The loop thread owns the LLMEngine, and it is also the thread that loads it. Measured on CPU: a
thread that runs the model after ANOTHER thread ran torch ops (loading it) decodes ~1.7x slower
(55 vs 33 ms per SmolLM2 step), likely because OpenMP keeps one worker team per calling thread
and two teams then share the cores. So ``from_config`` builds the engine on the same
single-thread executor that later runs the loop.

asyncio callers talk to it through a command queue (add / abort), drained at the start of every
step, so an abort frees the request's KV blocks within one step. A step's outputs travel back with
one ``loop.call_soon_threadsafe`` per event loop. Torch kernels release
the GIL, so the HTTP event loop stays responsive while the model runs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from lmforge.config import EngineConfig
from lmforge.engine.llm_engine import LLMEngine
from lmforge.engine.request import RequestOutput, SamplingParams
from lmforge.errors import EngineDeadError, LMForgeError

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """A snapshot of the engine's load."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int


class AsyncEngine:
    """Serves many concurrent ``generate`` calls from one engine loop thread.

    Args:
        engine: the LLMEngine to drive; only the loop thread touches it after ``start()``.
        executor: the single thread that runs the loop (and, via ``from_config``, loaded it).
    """

    def __init__(self, engine: LLMEngine, executor: ThreadPoolExecutor | None = None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self.created = int(time.time())
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="lmforge-engine")
        self._loop_future: Future | None = None
        self.error: BaseException | None = None  # set when the loop died
        self.last_step_time = time.monotonic()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        """Load the model on the engine thread (blocking, with a progress bar) and wrap it.

        Raises:
            ModelLoadError, ValueError: as ``LLMEngine``.
        """
        executor = ThreadPoolExecutor(1, thread_name_prefix="lmforge-engine")
        try:
            return cls(executor.submit(LLMEngine, config).result(), executor)
        except BaseException:
            executor.shutdown(wait=False)
            raise

    def start(self) -> None:
        """Start the loop thread (idempotent)."""
        if self._loop_future is None:
            self._loop_future = self._executor.submit(self._run)

    def shutdown(self) -> None:
        """Stop the loop thread; in-flight requests are aborted."""
        self._stopping.set()
        self._wakeup.set()
        if self._loop_future is not None:
            try:
                self._loop_future.exception(timeout=10)  # waits for the loop to return
            except TimeoutError:
                logger.warning("the engine loop did not stop within 10 s")
        self._executor.shutdown(wait=False)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, after: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output deltas until one has ``finished=True``.

        ``after``: as ``LLMEngine.add_request`` (the other choices of an ``n`` > 1 request wait
        for the first one's prompt and share its KV blocks). Validation errors are raised before
        the first yield. Leaving the iteration early
        (``aclose()``, cancellation, client disconnect) aborts the request.

        Raises:
            InvalidRequestError, ContextLengthExceededError: bad prompt or parameters.
            EngineDeadError: the engine loop has stopped.
        """
        self.engine.validate_prompt(prompt_token_ids, params)
        if self.error is not None or self._stopping.is_set():
            raise EngineDeadError("the engine loop has stopped; restart the server")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._send(("add", request_id, list(prompt_token_ids), params, after))
        finished = False
        try:
            while not finished:
                out = await stream.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request; its KV blocks are freed at the start of the next step."""
        self._send(("abort", request_id))

    def stats(self) -> EngineStats:
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        return EngineStats(len(scheduler.running),
                           len(scheduler.waiting) + len(self.engine.held_ids),
                           blocks.num_free_blocks, blocks.num_blocks)

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait(timeout=1.0)
                    self._wakeup.clear()
                    self.last_step_time = time.monotonic()  # idle is healthy
                    continue
                self._deliver_all([(out.request_id, out) for out in self.engine.step()])
                self.last_step_time = time.monotonic()
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
            if command[0] == "abort":
                self.engine.abort_request(command[1])
                continue
            _, request_id, prompt_token_ids, params, after = command
            try:
                self.engine.add_request(request_id, prompt_token_ids, params, after)
            except LMForgeError as e:
                self._deliver(request_id, e)

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
