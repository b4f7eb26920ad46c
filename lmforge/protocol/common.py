"""Pieces shared by the chat and completions wire schemas (OpenAI API reference, "Chat" and
"Completions" sections; vLLM's ``vllm/entrypoints/openai/protocol.py`` for the sampling extras).

Requests forbid unknown fields, as the OpenAI API does ("Unrecognized request argument supplied:
X"); responses are plain models that serialize to the exact OpenAI JSON.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from lmforge.errors import InvalidRequestError
from lmforge.protocol.base import RequestModel, ResponseModel
from lmforge.protocol.structured import ResponseFormat, structured_output_spec

MAX_N = 128  # choices per prompt, OpenAI's limit


class StreamOptions(RequestModel):
    include_usage: bool | None = False  # send a last chunk with ``choices: []`` and ``usage``
    # vLLM's: with include_usage, every chunk also carries the usage so far
    continuous_usage_stats: bool | None = False


class PromptTokensDetails(ResponseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Usage(ResponseModel):
    """Token counts of one response; ``total_tokens = prompt_tokens + completion_tokens``."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class SamplingRequest(RequestModel):
    """Fields common to ``/v1/chat/completions`` and ``/v1/completions``.

    ``None`` means "the OpenAI default" for every optional number (temperature 1, top_p 1,
    penalties 0; ``server/sampling.py`` fills them in when it builds the engine's
    ``SamplingParams``). ``top_k`` ... ``include_stop_str_in_output`` are vLLM extensions.
    ``UNSUPPORTED`` names fields that are accepted by the schema only so that a non-default value
    yields a clear 400 instead of "unrecognized"; ``check()`` enforces that.
    """

    UNSUPPORTED: ClassVar[tuple[str, ...]] = ()

    model: str | None = None  # None: the base model, when it is the only one served
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted, ignored
    # structured output (protocol/structured.py): OpenAI's, then vLLM's and SGLang's spellings
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    regex: str | None = None
    guided_regex: str | None = None
    choice: list[str] | None = None
    guided_choice: list[str] | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Beam search (Hugging Face generate's names; ``use_beam_search`` is vLLM's). The rules of
    # how they combine with the sampling fields live in lmforge/server/beam.py.
    num_beams: int | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    early_stopping: bool | Literal["never"] | None = None

    def check(self) -> None:
        """Reject what the schema admits but lmforge does not do yet.

        Raises:
            InvalidRequestError: naming the parameter (``n``, ``stream_options`` or one of
                ``UNSUPPORTED``).
        """
        if self.n is not None and not 1 <= self.n <= MAX_N:
            raise InvalidRequestError(f"n must be between 1 and {MAX_N}, got {self.n}", param="n")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options")
        for name in self.UNSUPPORTED:
            if not self.is_default(name, getattr(self, name)):
                raise InvalidRequestError(
                    f"{name} is not supported yet; remove it from the request", param=name)

    def is_default(self, name: str, value: Any) -> bool:
        """Whether an unsupported field holds a value that asks for nothing (null, false, {})."""
        return value is None or value is False or value == {} or value == []

    @property
    def num_choices(self) -> int:
        """Choices per prompt (``n``, default 1)."""
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    def structured_output(self) -> dict[str, Any] | None:
        """``StructuredOutput`` keyword arguments for the constraint this request sets, if any
        (``protocol.structured.structured_output_spec``).

        Raises:
            InvalidRequestError: two constraints at once, or a malformed one.
        """
        return structured_output_spec({name: getattr(self, name) for name in (
            "response_format", "guided_json", "regex", "guided_regex", "choice",
            "guided_choice")})
