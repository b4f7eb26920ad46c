"""Continuous batching: which requests run this step, and how many tokens each. No torch.

Every request carries ``num_computed_tokens``; a step gives each scheduled request
``num_tokens - num_computed_tokens`` new tokens (a decode is 1, a prefill the prompt), capped by a
per-step token budget, so long prompts are prefilled in chunks (chunked prefill) while decodes keep
flowing. Running requests are served first, in arrival order; when the KV cache runs out, the
most recently arrived running request is preempted: its blocks are freed and it is recomputed
later (vLLM v1's recompute preemption). A request is sampled only in the step that computes its
last known token.
"""

from __future__ import annotations

from collections import deque
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


class Scheduler:
    """Decides each step's batch under the token budget and the KV block supply.

    Args:
        config: max_num_seqs, max_num_batched_tokens, enable_chunked_prefill.
        block_manager: the KV block supply.
        max_model_len: a request is finished with "length" when it reaches this many tokens.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int):
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:  # under memory pressure, admit nothing new
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        for request in list(self.running):
            if budget == 0:
                break
            if request not in self.running:  # preempted earlier in this loop
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._allocate_or_preempt(request, num_new, out):
                continue
            self._add(out, request, num_new)
            budget -= num_new
        return budget

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        while not self.block_manager.allocate_slots(request, num_new):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is request:
                return False
        return True

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hits, num_hit = self.block_manager.get_computed_blocks(request)
            num_new = request.num_tokens - num_hit
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if not self.block_manager.allocate_slots(request, num_new, hits):
                break  # wait for running requests to free blocks
            self.waiting.popleft()
            request.num_computed_tokens = num_hit
            if request.num_output_tokens == 0:  # report hits of the original prompt only
                request.num_cached_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add(out, request, num_new)
            budget -= num_new

    def _add(self, out: SchedulerOutput, request: Request, num_new: int) -> None:
        out.requests.append(request)
        out.num_new_tokens.append(num_new)
        out.will_sample.append(request.num_computed_tokens + num_new == request.num_tokens)

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
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
        return finished

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        if token in request.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if request.max_tokens is not None and request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        """Finish a request (stop string, abort, ...) and free its blocks. Idempotent."""
        if request.status.is_finished():
            return
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.block_manager.free(request)
        self.requests.pop(request.request_id, None)

    def abort_request(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is not None:
            self.finish_request(request, RequestStatus.FINISHED_ABORTED)
        return request
