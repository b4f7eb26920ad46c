"""Tokenizer loading (Hugging Face directory or GGUF), chat templates, incremental detokenization.

Tokenization itself is ``transformers``' (a Rust ``tokenizers`` backend); this module only loads it,
caches the slow GGUF conversion, renders chat templates to token ids, and turns a growing list of
output token ids into UTF-8-safe text deltas with stop-string cutting (``IncrementalDetokenizer``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jinja2
import transformers
from transformers import AutoTokenizer

from lmforge.config import file_cache_key, lmforge_cache
from lmforge.errors import InvalidRequestError, ModelLoadError

# Prompt tokens that prime the detokenizer, so the first output token decodes with the context it
# follows (e.g. a SentencePiece "▁Paris" after a prompt is " Paris", not "Paris"). vLLM's
# INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"  # what a lossy decode of a partial UTF-8 byte sequence ends with


def _read_generation_eos(directory: Path) -> set[int]:
    """``eos_token_id`` (int, list or absent) from ``generation_config.json``, as a set."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return set()
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(i) for i in eos}


class Tokenizer:
    """Wraps a transformers fast tokenizer (``self.hf``) with the few calls the engine needs.

    Attributes:
        hf: the underlying ``transformers`` tokenizer.
        vocab_size: ``len(hf)``, the number of token ids the tokenizer can produce (a model's
            embedding table may be larger, padded).
        eos_token_ids: the tokenizer's eos id plus every ``generation_config.json`` eos id.
        bos_token_id: the tokenizer's bos id, or None.
    """

    def __init__(self, hf: Any, eos_token_ids: Iterable[int] = ()):
        self.hf = hf
        self.vocab_size: int = len(hf)
        eos = set(eos_token_ids)
        if hf.eos_token_id is not None:
            eos.add(int(hf.eos_token_id))
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.bos_token_id: int | None = hf.bos_token_id

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Tokenizer:
        """Load from a Hugging Face directory (tokenizer.json / tokenizer_config.json).

        Also reads ``eos_token_id`` from ``generation_config.json`` when present (Llama 3 and
        chat models list several there).

        Raises:
            ModelLoadError: the directory is missing or holds no loadable tokenizer.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise ModelLoadError(f"tokenizer directory {str(directory)!r} does not exist")
        try:
            hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as e:  # the Rust backend raises a bare Exception for a malformed file
            raise ModelLoadError(
                f"cannot load a tokenizer from {str(directory)!r} ({e}); the directory needs "
                "tokenizer.json (or its tokenizer class's files) and tokenizer_config.json"
            ) from e
        return cls(hf, _read_generation_eos(directory))

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer embedded in a GGUF file.

        ``transformers`` converts GGUF tokenizer metadata in ~4.5 s, so the result is saved once
        under ``$LMFORGE_CACHE/tokenizers/<key>`` (``config.lmforge_cache``) (key: sha256 of resolved path, size, mtime
        and transformers version) and loaded from there (~0.1 s) afterwards. The cached copy
        encodes, decodes and templates identically (tests/test_tokenizer.py checks it).

        Raises:
            ModelLoadError: the file is missing or its tokenizer cannot be converted.
        """
        path = Path(path).resolve()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {str(path)!r} does not exist")
        cache_dir = _gguf_cache_dir(path)
        if (cache_dir / "tokenizer.json").is_file():
            try:
                return cls.from_pretrained(cache_dir)
            except ModelLoadError:
                shutil.rmtree(cache_dir, ignore_errors=True)  # a corrupt cache: convert again
        try:
            hf = AutoTokenizer.from_pretrained(
                str(path.parent), gguf_file=path.name, local_files_only=True
            )
        except Exception as e:  # gguf metadata errors surface as many types (KeyError, ...)
            raise ModelLoadError(f"cannot read the tokenizer of GGUF {str(path)!r}: {e}") from e
        tokenizer = cls(hf)
        _save_atomically(tokenizer, cache_dir)
        return tokenizer

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's own Jinja chat template, or None."""
        return self.hf.chat_template

    def is_special_token(self, text: str) -> bool:
        """Whether ``text`` is one special added token (one that ``skip_special_tokens`` drops
        from decoded text, as ``[TOOL_CALLS]`` in Mistral's vocabularies)."""
        return any(t.content == text and t.special for t in self.hf.added_tokens_decoder.values())

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> token ids; ``add_special_tokens`` adds bos/eos as the tokenizer is configured."""
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Token ids -> text; a partial UTF-8 sequence decodes to U+FFFD."""
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """Render ``messages`` with ``chat_template`` (else the tokenizer's) and tokenize the text.

        The text is tokenized with ``add_special_tokens=False`` (the template writes its own bos),
        as vLLM and transformers' ``apply_chat_template(tokenize=True)`` do. ``template_kwargs``
        (e.g. ``tools``) are passed to the template.

        Raises:
            InvalidRequestError: as ``render_chat_template``.
        """
        text = self.render_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                         chat_template=chat_template, **template_kwargs)
        return self.encode(text, add_special_tokens=False)

    def render_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The text ``apply_chat_template`` tokenizes (the server bounds its length first).

        Raises:
            InvalidRequestError: no template exists (fix: ``--chat-template FILE``), or rendering
                failed, e.g. the template raised for an unsupported role (``param="messages"``).
        """
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise InvalidRequestError(
                "this model's tokenizer has no chat template, so chat requests cannot be rendered; "
                "use the completions endpoint or restart the server with --chat-template FILE"
            )
        try:
            text = self.hf.apply_chat_template(
                messages,
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **template_kwargs,
            )
        except (jinja2.TemplateError, TypeError) as e:
            # TypeError: the template did arithmetic on a field the message lacks ('+' on None).
            raise InvalidRequestError(f"chat template error: {e}", param="messages") from e
        return text

    def save_pretrained(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and the chat template to ``directory``."""
        self.hf.save_pretrained(str(directory))


def _gguf_cache_dir(path: Path) -> Path:
    return lmforge_cache() / "tokenizers" / file_cache_key(path, transformers.__version__)


def _save_atomically(tokenizer: Tokenizer, cache_dir: Path) -> None:
    """Save into a temporary sibling, then rename, so a reader never sees a half-written cache."""
    tmp = None
    try:
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir.parent, prefix=".tmp-"))
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, cache_dir)
    except OSError:
        pass  # another process won the race, or the home is read-only: the cache is optional
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into UTF-8-safe text deltas and cuts stop strings.

    Decoding follows vLLM's ``detokenize_incrementally``: each ``update`` decodes only the window
    ``ids[prefix_offset:]`` and releases the text beyond ``decode(ids[prefix_offset:read_offset])``,
    unless it ends in U+FFFD (a byte-level BPE character split across tokens); then the tokens wait
    for the next update. The window is primed with the last prompt tokens so the first output
    token decodes with its leading space as it follows the prompt.

    Invariant: for byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen2) the concatenation of all
    ``update()`` returns plus ``flush()`` equals ``tokenizer.decode(output_ids)``, cut at the
    first stop string. For tokenizers whose decoder strips a leading space at the start of a
    sequence (SentencePiece ``▁``), it is the text the output adds after the prompt, as in vLLM.

    Stop strings: the last ``max(len(stop)) - 1`` characters are held back so a partial stop
    string never reaches a stream. When a stop string appears, ``stopped`` becomes True and
    released text ends right before it (after it with ``include_stop_str_in_output``); nothing
    after it is ever released. Text is matched as it arrives, as in vLLM: among the stop strings
    completed by one update the earliest-starting wins (at equal positions the first listed).

    Attributes:
        stopped: a stop string was found.
        output_text: all text released so far.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        *,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
    ):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._include_stop = include_stop_str_in_output
        self._stop = [s for s in stop if s]  # "" would match everywhere; the protocol rejects it
        self._hold_back = max((len(s) for s in self._stop), default=1) - 1
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        if tokenizer.decode(context, skip_special_tokens).endswith(_REPLACEMENT_CHAR):
            context = []  # the prompt ends mid-character: its completion would shift the alignment
        self._ids: list[int] = context  # prompt context + output ids
        self._prefix_offset = 0  # window start: decoded only to align the new text
        self._read_offset = len(context)  # ids before this are already in self._text
        self._text = ""  # all decoded output text, complete UTF-8 characters only
        self.output_text = ""
        self.stopped = False

    def update(self, new_token_ids: Sequence[int]) -> str:
        """Add sampled ids; return the newly releasable text (possibly "")."""
        if self.stopped:
            return ""
        self._ids.extend(new_token_ids)
        prefix_text, new_text = self._decode_window()
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""  # nothing new (a skipped special token) or a character still incomplete
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._append(new_text[len(prefix_text) :], final=False)

    def flush(self) -> str:
        """Release everything still held once the request ends for another reason (eos, length).

        An incomplete trailing UTF-8 sequence is released as ``decode()`` shows it (U+FFFD), so
        the invariant above holds. A stop string inside the held text still cuts it and sets
        ``stopped``.
        """
        if self.stopped:
            return ""
        prefix_text, new_text = self._decode_window()
        self._prefix_offset = self._read_offset = len(self._ids)
        return self._append(new_text[len(prefix_text) :], final=True)

    def _decode_window(self) -> tuple[str, str]:
        window = self._ids[self._prefix_offset :]
        prefix_ids = window[: self._read_offset - self._prefix_offset]
        skip = self._skip_special_tokens
        return self._tokenizer.decode(prefix_ids, skip), self._tokenizer.decode(window, skip)

    def _append(self, delta: str, *, final: bool) -> str:
        """Add decoded text, search it for stop strings, and release what is safe to release."""
        search_from = max(0, len(self._text) - self._hold_back)  # a match must end in the delta
        self._text += delta
        release_end = len(self._text) if final else len(self._text) - self._hold_back
        match = self._find_stop(search_from)
        if match is not None:
            start, stop = match
            self.stopped = True
            release_end = start + len(stop) if self._include_stop else start
        # max(): with fewer than hold_back characters, a negative end would count from the back.
        released = self._text[len(self.output_text) : max(release_end, len(self.output_text))]
        self.output_text += released
        return released

    def _find_stop(self, search_from: int) -> tuple[int, str] | None:
        """The earliest (position, stop string) at or after ``search_from``, or None."""
        best: tuple[int, str] | None = None
        for stop in self._stop:
            i = self._text.find(stop, search_from)
            if i != -1 and (best is None or i < best[0]):
                best = (i, stop)
        return best
