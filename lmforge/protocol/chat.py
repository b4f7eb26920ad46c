"""``/v1/chat/completions`` wire schemas (OpenAI API reference, "Create chat completion" and
"The chat completion chunk object")."""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_serializer, model_validator

from lmforge.errors import InvalidRequestError
from lmforge.protocol.common import RequestModel, ResponseModel, SamplingRequest, Usage
from lmforge.protocol.logprobs import MAX_TOP_LOGPROBS, ChatChoiceLogprobs
from lmforge.protocol.tools import (
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
)

Role = Literal["system", "developer", "user", "assistant", "tool"]


class TextContentPart(RequestModel):
    """``{"type": "text", "text": "..."}``; images and audio are not supported."""

    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    """One message of the conversation, as the chat template receives it.

    ``content`` is a string or a list of text parts (joined with no separator, as OpenAI does for
    text-only parts); ``message`` is an alias of it. Only an assistant message may omit content
    (when it carries tool calls).
    """

    role: Role
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # assistant turns replayed by the client
    tool_call_id: str | None = None  # role "tool"
    refusal: str | None = None  # echoed back by clients that replay a response; ignored
    annotations: list[Any] | None = None  # idem

    @model_validator(mode="before")
    @classmethod
    def _message_alias(cls, data: Any) -> Any:
        """``message`` is accepted for ``content`` (the Chinese-LLaMA-Alpaca demo server's
        spelling); both at once are ambiguous."""
        if isinstance(data, dict) and "message" in data:
            if "content" in data:
                raise InvalidRequestError("a message has both 'content' and its alias "
                                          "'message'; send only 'content'", param="message")
            data = {("content" if k == "message" else k): v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required for a {self.role} message")
        return self

    def text(self) -> str:
        """The content as one string ("" when absent)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def to_template_dict(self) -> dict[str, Any]:
        """The dict a Hugging Face chat template expects: role, content and any extra keys."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class ChatCompletionRequest(SamplingRequest):
    """The request body. ``max_completion_tokens`` wins over the older ``max_tokens``; both
    null means "up to the context length"."""

    UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        "functions", "function_call", "audio", "prediction", "reasoning_effort",
        "web_search_options")

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None  # default: "auto" with tools, "none" without
    parallel_tool_calls: bool | None = None  # False: at most one tool call per reply
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None
    # accepted and ignored: they do not change what is generated
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def check(self) -> None:
        """Also rejects empty ``messages`` and non-text ``modalities``.

        Raises:
            InvalidRequestError: naming the parameter.
        """
        if not self.messages:
            raise InvalidRequestError("messages must contain at least one message",
                                      param="messages")
        self._check_tools()
        if self.modalities not in (None, [], ["text"]):
            raise InvalidRequestError("only the text modality is supported", param="modalities")
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                raise InvalidRequestError(
                    f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got "
                    f"{self.top_logprobs}", param="top_logprobs")
            if not self.logprobs:
                raise InvalidRequestError(
                    "logprobs must be set to true if top_logprobs is used", param="logprobs")
        super().check()

    def _check_tools(self) -> None:
        names = [t.function.name for t in self.tools or []]
        choice = self.tool_choice
        if choice is not None and choice != "none" and not names:
            raise InvalidRequestError("tool_choice is only allowed when tools are specified",
                                      param="tool_choice")
        if len(set(names)) != len(names):
            raise InvalidRequestError("tools must have distinct function names", param="tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise InvalidRequestError(
                f"tool_choice names the function {choice.function.name!r}, which is not in "
                "tools", param="tool_choice")

    @property
    def tool_mode(self) -> str:
        """``none``, ``auto``, ``required`` or ``named`` (``tool_choice`` resolved with
        OpenAI's defaults: auto when tools are given, none otherwise)."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    @property
    def num_logprobs(self) -> int | None:
        """``SamplingParams.logprobs``: None unless ``logprobs`` is true, else ``top_logprobs``."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def num_prompt_logprobs(self) -> None:
        """``SamplingParams.prompt_logprobs``: a chat response never shows its prompt."""
        return None

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens``, else the older ``max_tokens``."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The name the client used, for error messages."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


class ChatCompletionMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatCompletionChoice(ResponseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    """A streamed message delta. Unset keys are left out, so the finish chunk is ``{}``."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionChunkChoice(ResponseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(ResponseModel):
    """One SSE event. ``usage`` is null except in the last chunk of an ``include_usage``
    stream, whose ``choices`` is empty."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = None
