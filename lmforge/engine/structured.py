"""Structured output: the adapter over the grammar library (llguidance) and the token mask.

A request whose ``SamplingParams.structured`` is set gets a ``GrammarMatcher`` (one per request,
created by ``LLMEngine.add_request``). Every step, for the rows that sample, the sampler asks each
matcher for the set of tokens that keep the output inside the grammar (a bitmask, one bit per
vocabulary id) and sets the logits of every other token to -inf (``apply_token_bitmask``); after
sampling, the engine feeds the chosen token back (``GrammarMatcher.accept``) and finishes the
request with ``stop`` once the grammar cannot go on. EOS is allowed exactly when the output so far
is complete. This is vLLM v1's structured-output design (``vllm/v1/structured_output/``) on
llguidance (https://github.com/guidance-ai/llguidance), whose mask costs 5-30 us per token on
SmolLM2's 49k vocabulary (``benchmarks/grammar_libraries.py``).

Grammars are compiled once per distinct spec (``GrammarCompiler``, an LRU cache), and compiling
validates: an invalid JSON schema or regex is an ``InvalidRequestError`` naming the parameter and
llguidance's message, raised before the request is queued. Compiling also computes the first
mask, which catches a grammar that matches nothing (a JSON schema whose root ``$ref`` points to
itself): without that, the only allowed token would be EOS and the answer an empty "stop". A
grammar can still fail later, on a resource limit the library meets only while generating (a
regex like ``a{1000000}``); the engine then ends the request with an error
(``GrammarMatcher.failed``), never with a normal-looking stop. Messages never carry the
library's internal state or a Rust panic's text.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch

from lmforge.engine.request import StructuredOutput
from lmforge.errors import InvalidRequestError

# Distinct compiled grammars kept (each a JSON string of a few KB).
GRAMMAR_CACHE_SIZE = 256
_BITS = 32  # token ids per int32 word of a bitmask
# llguidance's default limits, without its parser-state dumps in error messages
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)


class GrammarMatcher:
    """One request's position in its grammar (an ``llguidance.LLMatcher``).

    Only the engine loop thread uses it after creation.
    """

    def __init__(self, matcher: llguidance.LLMatcher):
        self._matcher = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (bit ``t % 32`` of word
        ``t // 32`` set = token ``t`` allowed).

        Args:
            bitmask: (B, ceil(V / 32)) int32, contiguous, on the CPU.
        """
        words = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def accept(self, token_id: int) -> bool:
        """Advance past ``token_id``; False if the grammar does not allow it (the matcher then
        stays in an error state and allows only EOS)."""
        return self._matcher.consume_token(token_id)

    @property
    def is_terminated(self) -> bool:
        """The output is complete and no token but EOS may follow (e.g. a ``choice`` was
        emitted in full, or a JSON object closed)."""
        return self._matcher.is_stopped()

    @property
    def failed(self) -> bool:
        """The grammar library gave up (a resource limit, or a token it did not allow)."""
        return self._matcher.is_error()

    def failure_message(self) -> str:
        """Why it failed, in words a client can act on (no internal state)."""
        reason = _summary(self._matcher.get_error())
        return (f"The output constraint failed during generation ({reason}); simplify the "
                "JSON schema, regex or choice list")


class GrammarCompiler:
    """Compiles ``StructuredOutput`` specs for one tokenizer, with a cache; thread-safe.

    The llguidance tokenizer (~0.5 s to build for a 49k vocabulary) is built on first use.

    Args:
        hf_tokenizer: the fast Hugging Face tokenizer of the model.
        vocab_size: the model's vocabulary (logits width); ids past the tokenizer's are never
            allowed.
        eos_token_ids: the ids that end a generation; allowed when the output is complete.
    """

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: list[int]):
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, str] = OrderedDict()

    def compile(self, spec: StructuredOutput) -> str:
        """The llguidance grammar of ``spec``, validated against the tokenizer (cached).

        Raises:
            InvalidRequestError: the schema, regex or choice list is invalid; ``param`` is the
                request field it came from.
        """
        key = spec.key()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        grammar = _to_grammar(spec)
        # The matcher's constructor runs the full compilation (and drops the GIL meanwhile);
        # the first mask finds a grammar that matches nothing.
        matcher = self._new_matcher(grammar)
        if not matcher.is_error():
            first = allocate_token_bitmask(1, self.vocab_size)[0]
            matcher.unsafe_compute_mask_ptr(first.data_ptr(), first.numel() * 4)
        if matcher.is_error():
            raise InvalidRequestError(f"Invalid {spec.what}: {_summary(matcher.get_error())}",
                                      param=spec.param)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        """A fresh matcher at the start of ``spec``'s grammar.

        Raises:
            InvalidRequestError: as ``compile``.
        """
        return GrammarMatcher(self._new_matcher(self.compile(spec)))

    def _new_matcher(self, grammar: str) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self.ll_tokenizer(), grammar, log_level=0, limits=_LIMITS)

    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._hf, n_vocab=self.vocab_size, eos_token=self._eos)
            return self._ll_tokenizer


def _to_grammar(spec: StructuredOutput) -> str:
    """``spec`` as an llguidance grammar string (never raises; the matcher validates)."""
    if spec.json_schema is not None:
        # Compact JSON: with free whitespace a small model can emit newlines forever inside
        # an object (vLLM grew `disable_any_whitespace` for that). Non-strict schemas are
        # lenient: keywords llguidance does not enforce are ignored instead of refused, as
        # OpenAI's non-strict mode promises best effort. A schema's "x-guidance" overrides both.
        options = {"whitespace_flexible": False, "lenient": not spec.strict}
        return llguidance.LLMatcher.grammar_from_json_schema(spec.json_schema, defaults=options)
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    # choice: a Lark rule of string literals (JSON-quoted, so no character is special)
    return llguidance.LLMatcher.grammar_from_lark(
        "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice or []))


def _summary(message: str) -> str:
    """llguidance's error without the grammar dump: its first line and any ``error:`` lines.

    ``'at 1(8): invalid regex "(abc" ...: regex parse error:\n (abc\n ^\nerror: unclosed
    group\n 1 | start: /(abc/'`` -> ``'at 1(8): invalid regex "(abc" ...: regex parse error:
    unclosed group'``. A Rust panic (an assertion inside the library) says only that the
    grammar is beyond the library, and ``NoExtensionBias`` (the first mask allows nothing)
    that nothing can match it.
    """
    if "panic" in message:
        return "the grammar engine cannot handle it (too large or too complex)"
    if message.startswith("NoExtensionBias"):
        return "no output can match it (e.g. a $ref cycle with no way out)"
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    details = [line.removeprefix("error:").strip() for line in lines[1:]
               if line.startswith("error:")]
    return " ".join(lines[:1] + details)[:500]


def allocate_token_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """(rows, ceil(vocab_size / 32)) int32 bitmask on the CPU, all tokens allowed."""
    return torch.full((rows, (vocab_size + _BITS - 1) // _BITS), -1, dtype=torch.int32)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]
                        ) -> torch.Tensor:
    """Set the logits of disallowed tokens to -inf on the given rows.

    Args:
        logits: (B, V) float. Not modified.
        bitmask: (len(rows), ceil(V / 32)) int32; row i is the mask of ``logits[rows[i]]``.
        rows: the constrained rows of ``logits``.

    Returns:
        (B, V) masked logits (a copy). Naive equivalent, for each i and token t::

            allowed = (bitmask[i, t // 32] >> (t % 32)) & 1
            out[rows[i], t] = logits[rows[i], t] if allowed else -inf
    """
    vocab = logits.shape[1]
    # numpy unpacks bytes through a lookup table: ~10x faster than shifting int32 words in
    # torch. Little-endian words and bit order: bit j of byte k is token 8k + j.
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    disallowed = torch.from_numpy(bits.view(np.bool_)).logical_not().to(logits.device)
    out = logits.clone()
    if len(rows) == logits.shape[0]:
        return out.masked_fill_(disallowed, float("-inf"))
    index = torch.tensor(rows, device=logits.device)
    out[index] = out[index].masked_fill(disallowed, float("-inf"))
    return out
