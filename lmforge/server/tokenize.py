"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's extension endpoints, same shapes).

Chat messages are rendered by the same ``Tokenizer.apply_chat_template`` with the same
``--chat-template`` as ``/v1/chat/completions``, so ``count`` equals that route's
``usage.prompt_tokens`` for the same messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request

from lmforge.errors import InvalidRequestError, ModelNotFoundError
from lmforge.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
)

if TYPE_CHECKING:
    from lmforge.engine.async_engine import AsyncEngine

router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """Text (``prompt``) or a conversation (``messages``) -> token ids.

    Raises:
        ModelNotFoundError: 404, ``model`` is not the served one.
        InvalidRequestError: 400, bad flags or a chat template that cannot render the messages.
    """
    engine: AsyncEngine = request.app.state.engine
    _check_model(engine, body.model)
    tokenizer = engine.tokenizer
    if isinstance(body, TokenizeChatRequest):
        body.check()
        extra = {"continue_final_message": True} if body.continue_final_message else {}
        try:
            ids = tokenizer.apply_chat_template(
                [m.to_template_dict() for m in body.messages],
                add_generation_prompt=body.generation_prompt,
                chat_template=request.app.state.chat_template, **extra)
        except InvalidRequestError:
            raise
        except ValueError as e:  # transformers: the final message cannot be continued
            raise InvalidRequestError(f"chat template error: {e}", param="messages") from e
    else:
        ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    strs = tokenizer.hf.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids,
                            token_strs=strs)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """Token ids -> text, special tokens kept (as vLLM).

    Raises:
        ModelNotFoundError: 404.
        InvalidRequestError: 400, a token id outside the tokenizer's vocabulary.
    """
    engine: AsyncEngine = request.app.state.engine
    _check_model(engine, body.model)
    vocab_size = engine.tokenizer.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {vocab_size})",
                                  param="tokens")
    return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens,
                                                             skip_special_tokens=False))


def _check_model(engine: AsyncEngine, model: str | None) -> None:
    if model is not None and model != engine.model_name:
        raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")
