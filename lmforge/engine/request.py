"""Requests, their states, sampling parameters and the outputs the engine emits. No torch here.

The state machine follows vLLM's ``vllm/v1/request.py``: ``RequestStatus`` is an IntEnum with
``is_finished()`` and one map to OpenAI ``finish_reason`` strings.
"""

from __future__ import annotations

import enum
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lmforge.errors import InvalidRequestError

MAX_STOP_SEQUENCES = 16
MAX_LOGPROBS = 20  # most alternatives per token (OpenAI's top_logprobs limit)
MAX_LOGIT_BIAS = 100.0  # |bias| limit, as OpenAI's logit_bias
# Entries of a choice list: llguidance compiles 10,000 in ~0.7 s and panics past ~65,000 grammar
# symbols (after tens of seconds), so a longer list is refused before compiling.
MAX_CHOICES = 10_000
# Scheduling priorities: smaller runs first (vLLM's convention). Online (HTTP) requests run at
# ONLINE_PRIORITY; batch jobs (/v1/batches) at BATCH_PRIORITY, behind them (engine/scheduler.py).
ONLINE_PRIORITY = 0
BATCH_PRIORITY = 1


class RequestStatus(enum.IntEnum):
    """Where a request is in its life. Everything above ``PREEMPTED`` is finished."""

    WAITING = enum.auto()  # queued; holds no KV blocks (or lost them to preemption)
    # held back until another request with the same prompt has computed it, then WAITING and
    # reads that prompt's KV blocks from the prefix cache (``Scheduler.add_request(after=)``)
    WAITING_FOR_PREFIX = enum.auto()
    RUNNING = enum.auto()  # scheduled this step or holding blocks between steps
    PREEMPTED = enum.auto()  # blocks freed under memory pressure; recomputed when rescheduled
    FINISHED_STOPPED = enum.auto()  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = enum.auto()  # max_tokens or the context length reached
    FINISHED_ABORTED = enum.auto()  # client went away or the request was cancelled
    FINISHED_ERROR = enum.auto()  # the request failed mid-generation (``Request.error`` says why)

    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI ``finish_reason`` string, or None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(frozen=True)
class StructuredOutput:
    """What the generated text must match: exactly one of a JSON schema, a regex or a choice.

    ``{"type": "json_object"}`` is the schema ``{"type": "object"}``. ``param`` names the request
    field it came from (``response_format``, ``regex``, ``guided_choice``, ...) for errors;
    ``what`` says what it is in words. Compiled by ``engine.structured.GrammarCompiler``.
    """

    json_schema: dict[str, Any] | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    strict: bool = True  # False: schema keywords the grammar cannot enforce are ignored
    param: str = "response_format"

    def __post_init__(self) -> None:
        given = [x for x in (self.json_schema, self.regex, self.choice) if x is not None]
        if len(given) != 1:
            raise ValueError("StructuredOutput takes exactly one of json_schema, regex, choice")
        if self.choice is not None and (not self.choice or not all(
                isinstance(c, str) and c for c in self.choice)):
            raise InvalidRequestError("choice must be a non-empty list of non-empty strings",
                                      param=self.param)
        if self.choice is not None and len(self.choice) > MAX_CHOICES:
            raise InvalidRequestError(f"a choice list takes at most {MAX_CHOICES} entries, got "
                                      f"{len(self.choice)}", param=self.param)
        if self.regex is not None and not self.regex:
            raise InvalidRequestError("regex must not be empty", param=self.param)

    @property
    def what(self) -> str:
        return ("JSON schema" if self.json_schema is not None
                else "regex" if self.regex is not None else "choice list")

    def key(self) -> str:
        """A canonical string identifying the grammar (the compiled-grammar cache key)."""
        return json.dumps([self.json_schema, self.regex, self.choice, self.strict],
                          sort_keys=True, ensure_ascii=False)


@dataclass
class SamplingParams:
    """Per-request decoding parameters, with OpenAI (and vLLM) semantics.

    temperature 0 means greedy. ``top_k`` 0 (or -1) disables top-k. ``logit_bias`` (token id ->
    bias in [-100, 100]) is added to the logits before penalties and sampling, as OpenAI's.
    ``logprobs`` N (0..20) returns, for every generated token, its log probability and the N
    likeliest alternatives, from the model's raw distribution: ``log_softmax`` of the logits
    before bias, penalties and temperature (vLLM v1's default ``raw_logprobs``);
    ``prompt_logprobs`` does the same for the prompt tokens. Presence and frequency
    penalties follow the OpenAI formula ``logit - presence * (count > 0) - frequency * count`` over
    generated tokens; ``repetition_penalty`` follows CTRL (arXiv:1909.05858): logits of tokens seen
    in the prompt or output are divided by it when positive, multiplied when negative.
    ``structured`` restricts every sampled token to those that keep the output inside a JSON
    schema, regex or choice list (``engine.structured``); the request stops when it is complete.

    Raises (from ``validate``):
        InvalidRequestError: naming the parameter and its allowed range.
    """

    max_tokens: int | None = 16  # None = up to the context length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None = none; N = the sampled token's and the N likeliest
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    logit_bias: dict[int, float] = field(default_factory=dict)
    structured: StructuredOutput | None = None  # the output must match this grammar
    # most alternatives ``logprobs`` / ``prompt_logprobs`` may ask for; internal requests
    # (beam search steps, engine/beam_search.py) raise it in a subclass
    logprobs_limit: ClassVar[int] = MAX_LOGPROBS

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        _check_finite(self, "temperature", "top_p", "min_p", "presence_penalty",
                      "frequency_penalty", "repetition_penalty")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequestError(
                f"max_tokens must be at least 1, got {self.max_tokens}", param="max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequestError(
                f"temperature must be between 0 and 2, got {self.temperature}", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(
                f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k < 0:
            raise InvalidRequestError(
                f"top_k must be 0 or -1 (disabled) or positive, got {self.top_k}", param="top_k")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}", param="min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequestError(
                    f"{name} must be between -2 and 2, got {getattr(self, name)}", param=name)
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise InvalidRequestError(
                f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}",
                param="repetition_penalty")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidRequestError(
                f"stop may hold at most {MAX_STOP_SEQUENCES} sequences, got {len(self.stop)}",
                param="stop")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop sequences must be non-empty strings", param="stop")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError(
                "stop_token_ids must be non-negative integers", param="stop_token_ids")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= self.logprobs_limit:
                raise InvalidRequestError(
                    f"{name} must be between 0 and {self.logprobs_limit}, got {value}",
                    param=name)
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or token < 0:
                raise InvalidRequestError(
                    f"logit_bias keys must be token ids (non-negative integers), got {token!r}",
                    param="logit_bias")
            if not isinstance(bias, (int, float)) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise InvalidRequestError(
                    f"logit_bias values must be numbers between -100 and 100, got {bias!r} for "
                    f"token {token}", param="logit_bias")


def _check_finite(params: SamplingParams, *names: str) -> None:
    for name in names:
        value = getattr(params, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidRequestError(f"{name} must be a finite number, got {value!r}", param=name)


class Request:
    """One sequence inside the engine: its tokens, its progress and its KV bookkeeping.

    ``num_computed_tokens`` counts tokens whose K/V are in the cache; the scheduler advances it.
    ``all_token_ids`` is prompt + output; after preemption everything is recomputed as prefill.
    ``priority``: smaller is scheduled first (``ONLINE_PRIORITY`` 0, ``BATCH_PRIORITY`` 1);
    it changes when tokens are computed, never which tokens. ``lora_name``: the LoRA adapter
    the request runs with (None = the base model); ``lora_id`` is that adapter registration's
    unique id, which salts the prefix-cache hashes (KV computed under an adapter differs).
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: frozenset[int] = frozenset(), arrival_time: float | None = None,
                 priority: int = ONLINE_PRIORITY, lora_name: str | None = None,
                 lora_id: int | None = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache (first schedule)
        self.max_tokens = params.max_tokens  # resolved against the context by the engine
        self.stop_token_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else eos_token_ids)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority
        self.lora_name, self.lora_id = lora_name, lora_id
        self.block_hashes: list[int] = []  # prefix hashes of full blocks, grown lazily
        self.generator = None  # torch.Generator for a seeded request, created by the sampler
        self.grammar = None  # engine.structured.GrammarMatcher if params.structured is set
        self.error: str | None = None  # why it ended FINISHED_ERROR

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs were asked for and are not delivered yet: every prompt position must
        be computed, so the prefix cache is not read for this request."""
        return self.params.prompt_logprobs is not None and not self.output_token_ids

    def reads_prefix_cache(self, batch_invariant: bool = False) -> bool:
        """Whether this request may take KV blocks from the prefix cache.

        Not when it needs prompt logprobs (every prompt position's logits), and not when it is
        seeded: a seeded request must give the same tokens whether or not its prompt was cached,
        and cached KV plus a short recomputed tail goes through other kernels than a whole-prompt
        prefill (the 4-bit kernel for a few rows, dense bf16 for many; SDPA with a mask over the
        gathered cache instead of a plain causal one), whose float rounding differs enough to
        change a sampled token. A seeded request still writes its blocks for others to read.
        With ``batch_invariant`` kernels (``--deterministic``) cached KV gives the very numbers
        a prefill would, so a seeded request reads it too.
        """
        return not self.needs_prompt_logprobs and (batch_invariant or self.params.seed is None)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens})")


@dataclass
class TokenLogprob:
    """One generated token's log probability and its likeliest alternatives (natural log)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), likeliest first; empty for logprobs=0


@dataclass
class RequestOutput:
    """What one engine step produced for one request (a delta, for streaming).

    ``text`` and ``token_ids`` hold only what is new since the previous output of this request.
    ``text`` never ends in a broken UTF-8 character nor in a partial stop string.
    """

    request_id: str
    text: str  # new text since the previous output
    token_ids: list[int]  # new token ids since the previous output
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" once finished
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    num_output_tokens: int  # all generated tokens so far
    logprobs: list[TokenLogprob] | None = None  # one per entry of token_ids, if asked for
    # with the first output only, if asked for: one per prompt token, None for the first
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # with finish_reason "error": the request's fault, e.g. its grammar failed mid-generation;
    # AsyncEngine.generate raises it as an InvalidRequestError naming ``error_param``
    error: str | None = None
    error_param: str | None = None


@dataclass
class CompletionOutput:
    """One request's output so far, accumulated from its ``RequestOutput`` deltas with ``add``
    (vLLM's ``CompletionOutput``): what the offline ``LLM`` returns per prompt and what a
    non-streamed HTTP choice is built from."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # empty unless asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # None unless asked for
    finish_reason: str | None = None  # None until finished
    num_cached_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        """Append one delta of this request."""
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.finish_reason = out.finish_reason
        self.num_cached_tokens = out.num_cached_tokens
