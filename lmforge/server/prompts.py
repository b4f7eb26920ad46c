"""Prompts to token ids for the routes: bounded before tokenizing, tokenized off the event loop.

Every route that tokenizes a client's text (chat and completions, embeddings, ``/tokenize``) goes
through here, so that one oversized prompt cannot stall ``/health`` and every other stream
(``encode_request``: a chat or completions request, beam search included, as token ids):

- a text that cannot fit the context is refused at once (400 ``context_length_exceeded``),
  without running the tokenizer: no token stands for more than ``L`` characters (the longest
  vocabulary entry, ``longest_token_chars``), so a text of more than ``max_model_len * L``
  characters has more than ``max_model_len`` tokens;
- the tokenizer then runs in a worker thread (``asyncio.to_thread``): the Rust ``tokenizers``
  library releases the GIL while it encodes (~2 us per character on one core), so the event
  loop keeps serving meanwhile. Decoding holds the GIL, so token ids are decoded (a completion's
  ``echo``) only once they are known to fit the context.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lmforge.errors import ContextLengthExceededError
from lmforge.protocol import ChatCompletionRequest, CompletionRequest
from lmforge.server.tools import ToolPlan

if TYPE_CHECKING:
    from lmforge.engine.async_engine import AsyncEngine
    from lmforge.tokenizer import Tokenizer

Prompt = str | list[int]  # a text, or token ids (completions, embeddings)

# Normalizers that never make a text shorter and pre-tokenizers that only split it. A tokenizer
# with any other (NFC/NFKC composition, a SentencePiece charsmap, Whitespace, ...) or that can
# emit <unk> is allowed LOSSY_SLACK times the longest entry per token.
_LENGTH_KEEPING_NORMALIZERS = frozenset({"Prepend", "NFD", "NFKD", "Lowercase"})
_TEXT_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Digits", "UnicodeScripts"})
LOSSY_SLACK = 4  # NFC/NFKC compose at most 3 code points into 1 (Hangul L+V+T)
_LONGEST: weakref.WeakKeyDictionary[Tokenizer, int] = weakref.WeakKeyDictionary()


def longest_token_chars(tokenizer: Tokenizer) -> int:
    """The most characters of text one token can stand for: the length of the longest
    vocabulary entry (added tokens included) as the tokenizer spells it, times ``LOSSY_SLACK``
    when the tokenizer may drop or merge characters (``_keeps_length``).

    An entry is never shorter than the text it covers: byte-level BPE (GPT-2, Llama 3, Qwen,
    SmolLM2) spells each byte as one character, SentencePiece a space as ``▁`` and a fallback
    byte as ``<0xNN>`` (tests/server/test_prompts.py checks every SmolLM2 entry). With the
    slack, only pathological input (megabytes of characters a normalizer strips, or unknown to
    the vocabulary) could be refused though it fits. ~0.1 s for a 50k vocabulary;
    ``prompt_char_limit`` computes it once per tokenizer.
    """
    longest = max(map(len, tokenizer.hf.get_vocab()), default=1)
    return longest if _keeps_length(tokenizer) else longest * LOSSY_SLACK


def _keeps_length(tokenizer: Tokenizer) -> bool:
    """Whether no character of a text can go without a token of its own: BPE whose normalizer
    and pre-tokenizer drop or merge nothing, over bytes (byte-level BPE: all 256 bytes are
    tokens) or with byte fallback (Llama 2, Mistral). Elsewhere a run of unknown characters may
    fuse into one <unk>, or whitespace be dropped."""
    backend = getattr(tokenizer.hf, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: nothing to inspect
        return False
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer")
    byte_level = "ByteLevel" in _pre_tokenizer_kinds(pre)
    return (model.get("type") == "BPE" and (byte_level or bool(model.get("byte_fallback")))
            and _normalizer_keeps_length(spec.get("normalizer")) and _pre_tokenizer_keeps(pre))


def _normalizer_keeps_length(normalizer: dict[str, Any] | None) -> bool:
    if normalizer is None:
        return True
    kind = normalizer.get("type")
    if kind == "Sequence":
        return all(_normalizer_keeps_length(n) for n in normalizer.get("normalizers", []))
    if kind == "Replace":  # e.g. SentencePiece's " " -> "▁"
        pattern = (normalizer.get("pattern") or {}).get("String")
        return pattern is not None and len(normalizer.get("content", "")) >= len(pattern)
    return kind in _LENGTH_KEEPING_NORMALIZERS


def _pre_tokenizer_kinds(pre: dict[str, Any] | None) -> list[str]:
    if pre is None:
        return []
    if pre.get("type") == "Sequence":
        return [k for p in pre.get("pretokenizers", []) for k in _pre_tokenizer_kinds(p)]
    return [pre.get("type")]


def _pre_tokenizer_keeps(pre: dict[str, Any] | None) -> bool:
    """Whether the pre-tokenizer only splits (Whitespace, BERT's and "removed" splits drop)."""
    if pre is None:
        return True
    if pre.get("type") == "Sequence":
        return all(_pre_tokenizer_keeps(p) for p in pre.get("pretokenizers", []))
    if pre.get("type") in ("Split", "Punctuation"):
        return pre.get("behavior") != "Removed"
    return pre.get("type") in _TEXT_KEEPING_PRE_TOKENIZERS


async def prompt_char_limit(engine: AsyncEngine) -> tuple[int, int]:
    """``(max_model_len * L, L)``: a text over the first number cannot fit the context
    (``L``: ``longest_token_chars``, computed in a worker thread on first use)."""
    tokenizer = engine.tokenizer
    longest = _LONGEST.get(tokenizer)
    if longest is None:
        longest = _LONGEST[tokenizer] = await asyncio.to_thread(longest_token_chars, tokenizer)
    return engine.max_model_len * longest, longest


def check_text_fits(text: str, limit: tuple[int, int], max_model_len: int, where: str,
                    param: str) -> None:
    """Raises ContextLengthExceededError (naming ``param``) when ``text`` is over ``limit``
    (``prompt_char_limit``'s)."""
    chars, longest = limit
    if len(text) > chars:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_model_len} tokens. However, {where} "
            f"has {len(text)} characters, more than {max_model_len} tokens can hold (no token "
            f"stands for more than {longest} characters). Please reduce the length of {where}.",
            param=param)


async def encode_prompts(engine: AsyncEngine, prompts: Sequence[Prompt], *, param: str,
                         add_special_tokens: bool = True) -> list[list[int]]:
    """Texts -> token ids, in one worker-thread call; token-id prompts pass as they are (the
    engine validates them).

    Args:
        param: the request parameter holding the prompts (``prompt``, ``input``), named in
            errors as ``param`` or ``param[i]``.

    Raises:
        ContextLengthExceededError: a text over ``prompt_char_limit``; every text is checked
            before any is encoded.
    """
    limit = await prompt_char_limit(engine)
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            where = f"{param}[{i}]" if len(prompts) > 1 else param
            check_text_fits(p, limit, engine.max_model_len, where, param)
    if all(not isinstance(p, str) for p in prompts):
        return list(prompts)  # type: ignore[arg-type]  # all token ids
    tokenizer = engine.tokenizer
    return await asyncio.to_thread(lambda: [
        tokenizer.encode(p, add_special_tokens=add_special_tokens) if isinstance(p, str) else p
        for p in prompts])


async def encode_completion_prompts(engine: AsyncEngine, prompts: Sequence[Prompt],
                                    echo: bool) -> tuple[list[list[int]], list[str]]:
    """``/v1/completions``' prompts -> (token ids, the text ``echo`` puts before each
    completion: the prompt itself, or its token ids decoded with special tokens; "" without
    echo).

    Raises:
        ContextLengthExceededError: (param ``prompt``) a text over ``prompt_char_limit``, or,
            with ``echo``, token ids longer than the context (decoding holds the GIL, so they
            are refused before it).
    """
    ids = await encode_prompts(engine, prompts, param="prompt")
    if not echo:
        return ids, [""] * len(ids)
    n = engine.max_model_len
    for i, p in enumerate(ids):
        if len(p) > n:
            where = f"prompt[{i}]" if len(ids) > 1 else "prompt"
            raise ContextLengthExceededError(
                f"This model's maximum context length is {n} tokens. However, {where} has "
                f"{len(p)} tokens. Please reduce the length of {where}.", param="prompt")
    tokenizer = engine.tokenizer
    echoes = await asyncio.to_thread(lambda: [
        p if isinstance(p, str) else tokenizer.decode(t, skip_special_tokens=False)
        for p, t in zip(prompts, ids)])
    return ids, echoes


async def encode_chat(engine: AsyncEngine, messages: list[dict], *,
                      chat_template: str | None, add_generation_prompt: bool = True,
                      **template_kwargs: Any) -> list[int]:
    """``Tokenizer.apply_chat_template`` (render the conversation, encode the text without
    adding special tokens) in a worker thread, the rendered text checked against
    ``prompt_char_limit`` before it is encoded.

    Raises:
        ContextLengthExceededError: (param ``messages``) the rendered text is over the limit.
        InvalidRequestError: no chat template, or rendering failed (``render_chat_template``).
        ValueError: transformers refused a flag, e.g. ``continue_final_message`` on a
            conversation whose last message cannot be continued.
    """
    limit = await prompt_char_limit(engine)
    tokenizer = engine.tokenizer

    def render_and_encode() -> list[int]:
        text = tokenizer.render_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                              chat_template=chat_template, **template_kwargs)
        check_text_fits(text, limit, engine.max_model_len, "the rendered conversation",
                        "messages")
        return tokenizer.encode(text, add_special_tokens=False)

    return await asyncio.to_thread(render_and_encode)


def chat_template_text(engine: AsyncEngine, chat_template: str | None) -> str | None:
    """The Jinja text chat requests render with: ``--chat-template``'s, else the tokenizer's
    (None: there is none)."""
    return chat_template if chat_template is not None else engine.tokenizer.chat_template


async def encode_request(engine: AsyncEngine, body: ChatCompletionRequest | CompletionRequest,
                         *, chat_template: str | None = None, plan: ToolPlan | None = None
                         ) -> tuple[list[list[int]], list[str]]:
    """A chat or completions request's prompts -> (token ids of each prompt, the text ``echo``
    puts before each completion: "" for chat and without ``echo``).

    Chat: one prompt, the conversation with its tools rendered as ``plan`` says
    (``ToolPlan.render``: the template's ``tools`` variable, or a system-prompt section)
    through ``chat_template`` (``--chat-template``'s; None: the tokenizer's), encoded by
    ``encode_chat``. Completions: ``encode_completion_prompts``.

    Args:
        plan: the request's ``ToolPlan`` when the caller has made it (for its sampling
            params); made here from ``body`` otherwise.

    Raises:
        ContextLengthExceededError: a text over ``prompt_char_limit``, or (``echo``) token ids
            longer than the context.
        InvalidRequestError: no chat template, or rendering failed.
    """
    if isinstance(body, CompletionRequest):
        return await encode_completion_prompts(engine, body.prompts(), body.echo)
    template_text = chat_template_text(engine, chat_template)
    if plan is None:
        plan = ToolPlan.of(body, template_text)
    messages, template_kwargs = plan.render([m.to_template_dict() for m in body.messages],
                                            template_text)
    prompt = await encode_chat(engine, messages, chat_template=chat_template, **template_kwargs)
    return [prompt], [""]
