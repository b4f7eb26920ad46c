"""Admission control at ``AsyncEngine.generate``'s door, and the request metrics taken there.

A request is admitted only while the backlog of requests without a first token stays under
``SchedulerConfig.max_waiting_requests`` / ``max_waiting_tokens`` (else a 429
``RateLimitError``), as vLLM's and TGI's frontends bound their queues. Its ``Ticket`` then counts
what ``generate`` delivers, as vLLM's frontend measures it: prompt tokens at the first token,
generated tokens, time to first token and the time between consecutive outputs
(``engine/metrics.py``'s ``RequestCounters``, exported by ``server/metrics.py``).
"""

from __future__ import annotations

import threading
import time

from lmforge.config import SchedulerConfig
from lmforge.engine.metrics import RequestCounters
from lmforge.engine.request import RequestOutput
from lmforge.errors import RateLimitError


class Admission:
    """The waiting backlog and the request counters; several event loops may call it.

    Args:
        limits: the scheduler configuration, read at every admission (so a changed limit
            applies to the next request).
    """

    def __init__(self, limits: SchedulerConfig):
        self.limits = limits
        self.counters = RequestCounters()
        self._lock = threading.Lock()  # guards the backlog and the counters
        self._num_waiting = 0
        self._num_waiting_tokens = 0

    @property
    def backlog(self) -> tuple[int, int]:
        """(requests, prompt tokens) admitted and still waiting for their first token: what
        ``max_waiting_requests`` and ``max_waiting_tokens`` bound."""
        return self._num_waiting, self._num_waiting_tokens

    def admit(self, num_tokens: int, counted: bool = True) -> Ticket:
        """Count a new request of ``num_tokens`` prompt tokens as waiting, or refuse it.

        A request alone in the queue is always admitted, however long its prompt (the context
        length bounds it), so that a big prompt is never refused forever. ``counted=False``:
        an internal continuation of a request already admitted (a beam-search step after the
        first), which neither the limits nor the metrics see, so a search is never refused
        halfway.

        Raises:
            RateLimitError: 429, ``type`` "requests" or "tokens" naming the limit hit.
        """
        if not counted:
            return Ticket(None, num_tokens)
        limits = self.limits
        with self._lock:
            if limits.max_waiting_requests and self._num_waiting >= limits.max_waiting_requests:
                raise RateLimitError(
                    f"The server is at capacity: {self._num_waiting} requests are waiting "
                    f"(--max-waiting-requests {limits.max_waiting_requests}); retry shortly.",
                    limit="requests")
            if (limits.max_waiting_tokens and self._num_waiting
                    and self._num_waiting_tokens + num_tokens > limits.max_waiting_tokens):
                raise RateLimitError(
                    f"The server is at capacity: {self._num_waiting_tokens} prompt tokens are "
                    f"waiting and this request adds {num_tokens} (--max-waiting-tokens "
                    f"{limits.max_waiting_tokens}); retry shortly.", limit="tokens")
            self._num_waiting += 1
            self._num_waiting_tokens += num_tokens
        return Ticket(self, num_tokens)

    def _leave_backlog(self, num_tokens: int) -> None:
        with self._lock:
            self._num_waiting -= 1
            self._num_waiting_tokens -= num_tokens

    def _observe(self, out: RequestOutput, elapsed: float, first: bool) -> None:
        counters = self.counters
        with self._lock:
            if first:
                counters.prompt_tokens += out.num_prompt_tokens
                counters.time_to_first_token.observe(elapsed)
            else:
                counters.inter_token_latency.observe(elapsed)
            counters.generation_tokens += len(out.token_ids)


class Ticket:
    """One admitted request: in the backlog until its first output, then counted per output.

    ``admission`` None: not counted (``Admission.admit(counted=False)``).
    """

    def __init__(self, admission: Admission | None, num_tokens: int):
        self.admission, self.num_tokens = admission, num_tokens
        self.waiting = True  # no output delivered yet
        self.last = time.monotonic()  # when the last output was delivered (or admission)

    def delivered(self, out: RequestOutput) -> None:
        """Count one output handed to the caller; the first takes the request off the
        backlog."""
        now = time.monotonic()
        if self.admission is not None:
            self.admission._observe(out, now - self.last, first=self.waiting)
            if self.waiting:
                self.admission._leave_backlog(self.num_tokens)
        self.waiting, self.last = False, now

    def close(self) -> None:
        """The request ended (or was never started): leave the backlog if still in it.
        Idempotent."""
        if self.waiting and self.admission is not None:
            self.admission._leave_backlog(self.num_tokens)
        self.waiting = False
