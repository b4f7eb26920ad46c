"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's extension endpoints, same shapes).

Chat messages are rendered by the same ``prompts.encode_chat`` with the same ``--chat-template``
as ``/v1/chat/completions``, so ``count`` equals that route's ``usage.prompt_tokens`` for the
same messages. As there, a text too long for the context is a 400 before it is tokenized, and
``/detokenize`` takes at most ``max_model_len`` ids (decoding holds the GIL).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request

from lmforge.errors import ContextLengthExceededError, InvalidRequestError, ModelNotFoundError
from lmforge.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from lmforge.server.prompts import encode_chat, encode_prompts
from lmforge.server.routing import StrictJSONRoute

if TYPE_CHECKING:
    from lmforge.engine.async_engine import AsyncEngine

router = APIRouter(route_class=StrictJSONRoute)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """Text (``prompt``) or a conversation (``messages``) -> token ids (tokenized in a worker
    thread, ``server/prompts.py``).

    Raises:
        ModelNotFoundError: 404, ``model`` is not the served one.
        InvalidRequestError: 400, bad flags or a chat template that cannot render the messages.
        ContextLengthExceededError: 400, a text too long for the context whatever its tokens
            (``prompts.prompt_char_limit``), refused without tokenizing it.
    """
    engine: AsyncEngine = request.app.state.engine
    _check_model(engine, body.model)
    if isinstance(body, TokenizeChatRequest):
        body.check()
        extra = {"continue_final_message": True} if body.continue_final_message else {}
        try:
            ids = await encode_chat(engine, [m.to_template_dict() for m in body.messages],
                                    add_generation_prompt=body.generation_prompt,
                                    chat_template=request.app.state.chat_template, **extra)
        except InvalidRequestError:
            raise
        except ValueError as e:  # transformers: the final message cannot be continued
            raise InvalidRequestError(f"chat template error: {e}", param="messages") from e
    else:
        [ids] = await encode_prompts(engine, [body.prompt], param="prompt",
                                     add_special_tokens=body.add_special_tokens)
    strs = engine.tokenizer.hf.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids,
                            token_strs=strs)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """Token ids -> text, special tokens kept (as vLLM).

    Raises:
        ModelNotFoundError: 404.
        InvalidRequestError: 400, a token id outside the tokenizer's vocabulary.
        ContextLengthExceededError: 400, more tokens than the context length.
    """
    engine: AsyncEngine = request.app.state.engine
    _check_model(engine, body.model)
    if len(body.tokens) > engine.max_model_len:  # decoding holds the GIL: bound it first
        raise ContextLengthExceededError(
            f"This model's maximum context length is {engine.max_model_len} tokens. However, "
            f"tokens has {len(body.tokens)}. Please detokenize at most {engine.max_model_len} "
            "tokens at a time.", param="tokens")
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
