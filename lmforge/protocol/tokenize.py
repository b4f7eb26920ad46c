"""``/tokenize`` and ``/detokenize`` wire schemas: vLLM's extension endpoints
(``vllm/entrypoints/openai/protocol.py``: TokenizeCompletionRequest, TokenizeChatRequest,
TokenizeResponse, DetokenizeRequest, DetokenizeResponse), so vLLM clients work unchanged.

A tokenize body with ``messages`` is a chat request (rendered with the chat template exactly as
``/v1/chat/completions`` renders it), anything else a text request with ``prompt``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Discriminator, Tag

from lmforge.errors import InvalidRequestError
from lmforge.protocol.chat import ChatMessage
from lmforge.protocol.common import RequestModel, ResponseModel


class TokenizeCompletionRequest(RequestModel):
    model: str | None = None  # null = the served model
    prompt: str
    add_special_tokens: bool = True  # add bos/eos as the tokenizer is configured
    return_token_strs: bool = False  # also answer each token's vocabulary string


class TokenizeChatRequest(RequestModel):
    """``add_generation_prompt`` defaults to true, or to false when ``continue_final_message``
    is set (vLLM refuses the pair only when both are sent as true; so do we)."""

    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool | None = None  # end with the assistant header
    continue_final_message: bool = False  # leave the last (assistant) message open
    # the template writes its own bos; true is accepted by vLLM but would add a second one
    add_special_tokens: bool = False
    return_token_strs: bool = False

    def check(self) -> None:
        """Raises InvalidRequestError naming the parameter."""
        if not self.messages:
            raise InvalidRequestError("messages must contain at least one message",
                                      param="messages")
        if self.continue_final_message and self.add_generation_prompt:
            raise InvalidRequestError("Cannot set both `continue_final_message` and "
                                      "`add_generation_prompt` to true.",
                                      param="continue_final_message")
        if self.add_special_tokens:
            raise InvalidRequestError("add_special_tokens is not supported with messages: the "
                                      "chat template writes the special tokens",
                                      param="add_special_tokens")

    @property
    def generation_prompt(self) -> bool:
        if self.add_generation_prompt is None:
            return not self.continue_final_message
        return self.add_generation_prompt


def _tokenize_kind(body: Any) -> str:
    return "TokenizeChatRequest" if isinstance(body, dict) and "messages" in body else \
        "TokenizeCompletionRequest"


# A tagged union: validation errors come from the one member the body meant, never both.
TokenizeRequest = Annotated[
    Annotated[TokenizeChatRequest, Tag("TokenizeChatRequest")]
    | Annotated[TokenizeCompletionRequest, Tag("TokenizeCompletionRequest")],
    Discriminator(_tokenize_kind),
]


class TokenizeResponse(ResponseModel):
    count: int  # len(tokens)
    max_model_len: int  # the context length, so a client can check its prompt fits
    tokens: list[int]
    token_strs: list[str] | None = None  # with return_token_strs: e.g. "Ġworld"


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(ResponseModel):
    prompt: str  # the decoded text, special tokens included (vLLM's decode)
