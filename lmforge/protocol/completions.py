"""``/v1/completions`` wire schemas (OpenAI API reference, "Create completion")."""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import Field

from lmforge.errors import InvalidRequestError
from lmforge.protocol.common import ResponseModel, SamplingRequest, Usage
from lmforge.protocol.logprobs import MAX_COMPLETION_LOGPROBS, CompletionLogprobs

# A string, several strings, one token-id prompt, or several token-id prompts.
Prompt = str | list[str] | list[int] | list[list[int]]
MAX_BEST_OF = 20  # candidates per prompt, OpenAI's limit


class CompletionRequest(SamplingRequest):
    """The request body. ``max_tokens`` defaults to 16, as in the OpenAI API. ``best_of``
    candidates are generated per prompt and the ``n`` with the highest mean token logprob
    returned (``server/beam.py``); with beam search it is the beam width instead."""

    UNSUPPORTED: ClassVar[tuple[str, ...]] = ("suffix",)

    prompt: Prompt
    max_tokens: int | None = 16
    logprobs: int | None = None
    suffix: str | None = None
    echo: bool | None = False
    best_of: int | None = None

    def is_default(self, name: str, value: Any) -> bool:
        if name == "suffix":
            return value in (None, "")
        return super().is_default(name, value)

    def check(self) -> None:
        """Also rejects an empty prompt list, ``max_tokens: 0`` without ``echo``, and
        ``best_of`` out of ``n``..20 or streamed.

        Raises:
            InvalidRequestError: naming the parameter.
        """
        if self.prompt == [] or any(p == [] or p == "" for p in self.prompts()):
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise InvalidRequestError(
                f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {self.logprobs}",
                param="logprobs")
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequestError(
                "max_tokens must be at least 1; 0 is allowed only with echo, to score the prompt",
                param="max_tokens")
        super().check()
        if self.best_of is not None:
            if not self.num_choices <= self.best_of <= MAX_BEST_OF:
                raise InvalidRequestError(
                    f"best_of must be between n ({self.num_choices}) and {MAX_BEST_OF}, got "
                    f"{self.best_of}", param="best_of")
            if self.stream and self.best_of > 1:
                raise InvalidRequestError(
                    "best_of > 1 cannot be streamed: the best candidates are known only at the "
                    "end; remove stream or best_of", param="best_of")

    @property
    def prompt_only(self) -> bool:
        """``echo`` with ``max_tokens: 0``: the prompt (and its logprobs) back, nothing
        generated; how lm-eval-harness scores text against the legacy OpenAI API."""
        return bool(self.echo) and self.max_tokens == 0

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_tokens`` (the chat request's property of the same name picks between two)."""
        return self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The name of the length limit, for error messages."""
        return "max_tokens"

    @property
    def num_logprobs(self) -> int | None:
        """``SamplingParams.logprobs``: ``logprobs`` as sent."""
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        """``SamplingParams.prompt_logprobs``: ``logprobs`` when ``echo`` shows the prompt."""
        return self.logprobs if self.echo else None

    @property
    def num_candidates(self) -> int:
        """Sequences generated per prompt: ``best_of``, default ``n``."""
        return self.best_of or self.num_choices

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids.

        ``"a"`` -> ``["a"]``; ``[1, 2]`` -> ``[[1, 2]]``; lists of either stay as they are.
        """
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(t, int) for t in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(ResponseModel):
    """The response body, and (with ``finish_reason`` null until the end and ``usage`` null but
    in the last ``include_usage`` chunk) each streamed chunk: OpenAI uses ``text_completion`` for
    both."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


CompletionChunk = Completion
