"""Continuous batching: which requests run this step, and how many tokens each. No torch.

Every request carries ``num_computed_tokens``; a step gives each scheduled request
``num_tokens - num_computed_tokens`` new tokens (a decode is 1, a prefill the prompt), capped by a
per-step token budget, so long prompts are prefilled in chunks (chunked prefill) while decodes keep
flowing. A request is sampled only in the step that computes its last known token.

Requests carry a ``priority`` (0 = online, the default; larger = later, vLLM's convention; batch
jobs run at ``BATCH_PRIORITY``). The waiting and running lists are kept in (priority, arrival)
order. The best priority that has prefill pending (a request waiting, or running with prompt
tokens left) is the step's *urgent* class; with one priority, the rules below reduce to plain
first-come-first-served:

- A step serves the urgent class and better ones first: their running requests, then the waiting
  ones. Worse classes come last, decodes only (1 token each), and only in a step that computes no
  prefill for the better ones, so an online request's prefill step is as short as when idle.
- Prefill of priority > 0 is capped per step by ``max_background_prefill_tokens`` (priority 0
  never is), so that a step already in flight when an online request arrives stays short.
- When the KV cache runs out, the worst running request (lowest priority, latest arrival) is
  preempted: its blocks are freed and it is recomputed later (vLLM v1's recompute preemption);
  it goes back to the waiting list at its (priority, arrival) place, the front of its class.
  After a preemption nothing of the victim's priority or worse is admitted in that step.
- A waiting request that finds no free sequence slot or KV blocks may preempt the worst running
  request if that one has a worse priority and is not scheduled in this step (vLLM v0's priority
  preemption); otherwise it waits. This also keeps held-back work from stalling the engine.
"""

from __future__ import annotations

import itertools
from bisect import insort
from dataclasses import dataclass, field

from lmforge.config import SchedulerConfig
from lmforge.engine.block_manager import BlockManager
from lmforge.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """What to run in one step; lists are aligned by index."""

    requests: list[Request] = field(default_factory=list)  # scheduled, in batch order
    num_new_tokens: list[int] = field(default_factory=list)  # tokens to compute for each
    will_sample: list[bool] = field(default_factory=list)  # the step reaches its last token
    preempted: list[Request] = field(default_factory=list)  # lost their blocks this step

    @property
    def total_num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def sampling_requests(self) -> list[Request]:
        return [r for r, s in zip(self.requests, self.will_sample) if s]


@dataclass
class _StepBudget:
    """What one step may still hand out, and to whom."""

    tokens: int  # the step's token budget left (max_num_batched_tokens)
    background: int | None  # prefill tokens left for priority > 0 requests; None = uncapped
    urgent: int | None  # best priority with prefill pending when the step began; None = none

    def grant(self, request: Request, remaining: int) -> int:
        """Tokens ``request`` may compute now out of the ``remaining`` it needs (0 = none)."""
        if remaining <= 1:  # a decode (or a prompt's last token); schedule() decides whether
            return min(remaining, self.tokens)  # a worse class runs at all in this step
        if self.urgent is not None and request.priority > self.urgent:
            return 0  # a better-priority prefill goes first
        if request.priority > 0 and self.background is not None:
            return min(remaining, self.tokens, self.background)
        return min(remaining, self.tokens)

    def spend(self, request: Request, num_new: int, remaining: int) -> None:
        self.tokens -= num_new
        if remaining > 1 and request.priority > 0 and self.background is not None:
            self.background -= num_new


class Scheduler:
    """Decides each step's batch under the token budget, the KV block supply and priorities.

    Args:
        config: max_num_seqs, max_num_batched_tokens, enable_chunked_prefill,
            max_background_prefill_tokens.
        block_manager: the KV block supply.
        max_model_len: a request is finished with "length" when it reaches this many tokens.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int):
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.waiting: list[Request] = []  # in (priority, arrival) order
        self.running: list[Request] = []  # in (priority, arrival) order
        self.requests: dict[str, Request] = {}  # every unfinished request, held ones too
        # WAITING_FOR_PREFIX requests, by the id of the request whose prompt they wait for
        self.held: dict[str, list[Request]] = {}
        # arrival order as a counter, not a clock: ties are impossible and a held request
        # counts from when it is released to the waiting list
        self._arrival: dict[str, int] = {}
        self._arrivals = itertools.count()

    def add_request(self, request: Request, after: str | None = None) -> None:
        """Queue a request, or hold it back (``WAITING_FOR_PREFIX``) while the request ``after``
        names has not computed its prompt yet: that is the first choice of an ``n`` > 1 request
        with the same prompt, and this one then reads the prompt's full KV blocks from the
        prefix cache instead of computing them again (vLLM's parallel sampling). Unknown ids,
        and requests already past their prefill, queue it at once."""
        self.requests[request.request_id] = request
        first = self.requests.get(after) if after is not None else None
        if (first is not None and first.status != RequestStatus.WAITING_FOR_PREFIX
                and not first.output_token_ids):
            request.status = RequestStatus.WAITING_FOR_PREFIX
            self.held.setdefault(after, []).append(request)
        else:
            self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        self._arrival[request.request_id] = next(self._arrivals)
        insort(self.waiting, request, key=self._order)

    def _release_held(self) -> None:
        """Queue the held requests whose first request has computed its prompt (or is gone)."""
        for after in list(self.held):
            first = self.requests.get(after)
            if first is None or first.output_token_ids:
                for request in self.held.pop(after):
                    request.status = RequestStatus.WAITING
                    self._enqueue(request)

    def _order(self, request: Request) -> tuple[int, int]:
        return request.priority, self._arrival[request.request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self.held)

    @property
    def num_waiting(self) -> int:
        """Requests not running: waiting, preempted, or held for another's prefix."""
        return len(self.waiting) + sum(len(group) for group in self.held.values())

    def pending_prefill_priority(self) -> int | None:
        """The best priority among requests that wait or still have prompt tokens to compute
        (None when there are none): worse-priority work yields to it."""
        pending = [r.priority for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        if self.waiting:
            pending.append(self.waiting[0].priority)
        return min(pending, default=None)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        cap = self.config.max_background_prefill_tokens
        budget = _StepBudget(self.config.max_num_batched_tokens,
                             cap if cap and self.config.enable_chunked_prefill else None,
                             self.pending_prefill_priority())
        urgent = budget.urgent
        # the classes whose prefill is pending (and better ones) first: their running requests,
        # then the waiting ones; worse classes get what is left, unless a prefill ran
        self._schedule_running(out, budget, [r for r in self.running
                                             if urgent is None or r.priority <= urgent])
        self._schedule_waiting(out, budget)
        if urgent is not None and not any(n > 1 for n in out.num_new_tokens):
            self._schedule_running(out, budget, [r for r in self.running if r.priority > urgent])
        if not out.requests:
            self._release_held()  # they run from the next step on
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: _StepBudget,
                          requests: list[Request]) -> None:
        for request in requests:
            if budget.tokens == 0:
                break
            if request not in self.running:  # preempted earlier in this loop
                continue
            remaining = request.num_tokens - request.num_computed_tokens
            num_new = budget.grant(request, remaining)
            if num_new == 0 or not self._allocate_or_preempt(request, num_new, out):
                continue
            self._add(out, request, num_new)
            budget.spend(request, num_new, remaining)

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        while not self.block_manager.allocate_slots(request, num_new):
            victim = self.running[-1]  # the worst; not scheduled yet, as running is in order
            self._preempt(victim, out)
            if victim is request:
                return False
        return True

    def _schedule_waiting(self, out: SchedulerOutput, budget: _StepBudget) -> None:
        while self.waiting and budget.tokens > 0:
            request = self.waiting[0]
            if budget.urgent is not None and request.priority > budget.urgent:
                break  # its prefill waits for the better class's (no prefix-cache lookup)
            # under memory pressure, admit nothing as bad as what was just preempted
            if any(r.priority <= request.priority for r in out.preempted):
                break
            full = len(self.running) >= self.config.max_num_seqs
            if full and self._victim_for(request, out) is None:
                break
            hits, num_hit = self.block_manager.get_computed_blocks(request)
            remaining = request.num_tokens - num_hit
            if remaining > budget.tokens and not self.config.enable_chunked_prefill:
                break
            num_new = budget.grant(request, remaining)
            if num_new == 0:
                break
            if full:
                self._preempt(self._victim_for(request, out), out)
            while not self.block_manager.allocate_slots(request, num_new, hits):
                victim = self._victim_for(request, out)
                if victim is None:
                    return  # wait for running requests to free blocks
                self._preempt(victim, out)
            self.waiting.remove(request)  # the victims went in behind it
            request.num_computed_tokens = num_hit
            if request.num_output_tokens == 0:  # report hits of the original prompt only
                request.num_cached_tokens = num_hit
            request.status = RequestStatus.RUNNING
            insort(self.running, request, key=self._order)
            self._add(out, request, num_new)
            budget.spend(request, num_new, remaining)

    def _victim_for(self, request: Request, out: SchedulerOutput) -> Request | None:
        """The running request to preempt to make room for ``request``: the worst one, if it
        has a worse priority and is not scheduled in this step; else None."""
        victim = self.running[-1] if self.running else None
        # schedule() admits before it serves worse classes, so a worse victim is never scheduled
        # yet; the check keeps that true if the order changes
        if victim is None or victim.priority <= request.priority or victim in out.requests:
            return None
        return victim

    def _add(self, out: SchedulerOutput, request: Request, num_new: int) -> None:
        out.requests.append(request)
        out.num_new_tokens.append(num_new)
        out.will_sample.append(request.num_computed_tokens + num_new == request.num_tokens)

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        insort(self.waiting, request, key=self._order)  # the front of its priority class
        out.preempted.append(request)

    def update(self, out: SchedulerOutput, sampled_token_ids: list[int]) -> list[Request]:
        """Advance the scheduled requests by one step.

        Args:
            out: this step's SchedulerOutput.
            sampled_token_ids: one token per request in ``out.sampling_requests()``, in order.

        Returns:
            the requests that finished this step (EOS, stop token, max_tokens, context full).
        """
        sampled = iter(sampled_token_ids)
        finished = []
        for request, num_new, samples in zip(out.requests, out.num_new_tokens, out.will_sample):
            request.num_computed_tokens += num_new
            self.block_manager.cache_full_blocks(request)
            if not samples:
                continue
            token = next(sampled)
            request.append_output_token(token)
            status = self._check_stop(request, token)
            if status is not None:
                self.finish_request(request, status)
                finished.append(request)
        self._release_held()
        return finished

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        if token in request.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if request.max_tokens is not None and request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish_request(self, request: Request, status: RequestStatus,
                       force: bool = False) -> None:
        """Finish a request and free its blocks: the one place a request becomes finished.

        Called for token-level stops (``update``), aborts, and by the output processor for what
        it finds in the text or the grammar (a stop string, a complete or failed grammar).
        Idempotent; ``force`` replaces the status of a request that finished already, for a
        stop string found in the text of the token that also reached ``max_tokens`` ("stop"
        wins over "length", as in vLLM).
        """
        if request.status.is_finished():
            if force:
                request.status = status
            return
        if request.status == RequestStatus.WAITING_FOR_PREFIX:
            self._unhold(request)
        elif request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.block_manager.free(request)
        self.requests.pop(request.request_id, None)
        self._arrival.pop(request.request_id, None)

    def _unhold(self, request: Request) -> None:
        for after, group in list(self.held.items()):
            if request in group:
                group.remove(request)
                if not group:
                    del self.held[after]

    def abort_request(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is not None:
            self.finish_request(request, RequestStatus.FINISHED_ABORTED)
        return request
