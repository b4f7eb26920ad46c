"""Engine ``TokenLogprob`` lists -> the OpenAI logprobs objects of chat and completions.

Token strings are each token decoded alone (special tokens included), as vLLM does; a token that
is part of a multi-byte UTF-8 character decodes to U+FFFD. Log probabilities that are not finite
are floored at -9999.0 (vLLM's convention), so NaN and -Infinity never reach the JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lmforge.engine.request import TokenLogprob
from lmforge.protocol.logprobs import (
    ChatChoiceLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    TopLogprob,
)
from lmforge.tokenizer import Tokenizer

LOGPROB_FLOOR = -9999.0


def finite(logprob: float) -> float:
    """``logprob``, or -9999.0 when it is NaN or infinite."""
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


class TokenTexts:
    """Token id -> its text alone, memoized (a vocabulary is decoded one id at a time)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id],
                                                                 skip_special_tokens=False)
        return text

    def top(self, token_id: int, logprob: float) -> TopLogprob:
        text = self(token_id)
        return TopLogprob(token=text, logprob=finite(logprob), bytes=list(text.encode()))


def chat_logprobs(texts: TokenTexts, entries: Sequence[TokenLogprob]) -> ChatChoiceLogprobs:
    """``choices[].logprobs`` of a chat completion (or of one streamed chunk)."""
    content = []
    for e in entries:
        head = texts.top(e.token_id, e.logprob)
        content.append(ChatTokenLogprob(token=head.token, logprob=head.logprob, bytes=head.bytes,
                                        top_logprobs=[texts.top(t, lp) for t, lp in e.top]))
    return ChatChoiceLogprobs(content=content)


def completion_logprobs(texts: TokenTexts, token_ids: Sequence[int],
                        entries: Sequence[TokenLogprob | None], offset: int = 0
                        ) -> CompletionLogprobs:
    """``choices[].logprobs`` of a completion: one entry per token id.

    Args:
        token_ids: the tokens, prompt tokens first when echoing.
        entries: their logprobs, None where there is none (the first prompt token). As in the
            OpenAI API, a token's ``top_logprobs`` also lists the token itself, so it may hold
            ``logprobs + 1`` entries.
        offset: the character offset of the first token in the choice's text.
    """
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for token_id, entry in zip(token_ids, entries):
        text = texts(token_id)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            out.token_logprobs.append(finite(entry.logprob))
            top = {texts(t): finite(lp) for t, lp in entry.top}
            top.setdefault(text, finite(entry.logprob))  # the chosen token is always listed
            out.top_logprobs.append(top)
    return out
