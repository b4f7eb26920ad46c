"""Logprobs wire schemas: the chat shape (``choices[].logprobs.content``) and the legacy
completions shape (``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``), as in
the OpenAI API reference ("The chat completion object", "The completion object")."""

from __future__ import annotations

from lmforge.protocol.common import ResponseModel

MAX_TOP_LOGPROBS = 20  # chat ``top_logprobs`` limit
MAX_COMPLETION_LOGPROBS = 5  # completions ``logprobs`` limit


class TopLogprob(ResponseModel):
    token: str
    logprob: float  # natural log; never NaN or infinite (floored at -9999.0, as vLLM does)
    bytes: list[int] | None  # the UTF-8 bytes of ``token``


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # the likeliest tokens at this position, likeliest first


class ChatChoiceLogprobs(ResponseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(ResponseModel):
    """Parallel lists, one entry per token (prompt tokens first when ``echo`` is set, the first
    of which has no logprob: null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]  # character offset of each token in the choice's text
