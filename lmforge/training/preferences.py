"""Preference data (DPO): rows of a prompt, a preferred and a non-preferred answer -> token ids.

Three formats are read, detected from the first row (one format per file):

- OpenAI's preference fine-tuning JSONL: ``{"input": {"messages": [...]}, "preferred_output":
  [assistant message], "non_preferred_output": [assistant message]}``.
- TRL's: ``{"prompt", "chosen", "rejected"}``, either strings (standard: the prompt's tokens, then
  each answer + eos, as ``data.text_to_ids``) or conversational (a list of messages and a list
  with the assistant message).
- Anyscale's (seed 002): ``{"chosen": [messages], "rejected": [messages]}``, two whole
  conversations that share every message but the last; the shared part is the prompt.

Conversations are rendered by the model's chat template exactly as SFT renders them
(``data.chat_to_ids``), so the prompt ids are the same for both answers. As for SFT, a bad row
fails with its line and the reason (``data.DataError``), and an answer that does not fit in
``max_seq_len`` after the prompt is cut from the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from lmforge.tokenizer import Tokenizer
from lmforge.training.data import MIN_ROWS, DataError, chat_to_ids, text_to_ids, uniform_rows


class PendingReference(Protocol):
    """A pair's reference log-probs being computed elsewhere (``methods.dpo.ReferenceLogprobs``,
    e.g. Ray actors: ``lmforge.cluster.reference_logprobs``)."""

    def result(self) -> tuple[float, float]:
        """(chosen, rejected) log-probs, nats; blocks until they are computed."""
        ...


@dataclass(frozen=True)
class PreferenceExample:
    """One pair: the shared prompt's ids and each answer's (never empty), and the reference
    model's log-probs of the two answers once the DPO method's reference pass computed them (or
    ``ref_pending``, their promise, while other workers compute them)."""

    prompt_ids: list[int]
    chosen_ids: list[int]  # the preferred answer (TRL's "chosen")
    rejected_ids: list[int]  # the non-preferred one (TRL's "rejected")
    line: int  # 1-based line of the row in its file
    truncated: bool = False  # an answer was cut to max_seq_len
    ref_chosen_logp: float | None = None  # log pi_ref(chosen | prompt), nats
    ref_rejected_logp: float | None = None  # log pi_ref(rejected | prompt), nats
    # the two above while they are computed elsewhere (ahead of the loop, on other workers)
    ref_pending: PendingReference | None = field(default=None, compare=False, repr=False)

    @property
    def num_tokens(self) -> int:
        """Tokens of both sequences the pair trains on (the prompt counted twice)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def read_preferences(path: str | Path, tokenizer: Tokenizer, max_seq_len: int, *,
                     min_rows: int | None = None,
                     param: str = "training_file") -> list[PreferenceExample]:
    """Read, validate and tokenize a preference file.

    Raises:
        DataError: with the line and the reason: malformed JSON, an unknown row format, a row in
            another format than the first, messages ``data.chat_to_ids`` refuses, answers that
            are not one assistant message, identical answers, Anyscale conversations that differ
            before their last message, a prompt of ``max_seq_len`` tokens or more; or, for the
            whole file, fewer than ``min_rows`` rows (default ``MIN_ROWS``, OpenAI's 10).
    """
    kind, rows = uniform_rows(path, _kind, min_rows=MIN_ROWS if min_rows is None else min_rows,
                              param=param)
    pairs = []
    for line, row in rows:
        prompt, chosen, rejected = READERS[kind](row, tokenizer, line, param)
        pairs.append(_fit(prompt, chosen, rejected, line, max_seq_len, param))
    return pairs


def _kind(row: dict, line: int, param: str) -> str:
    if {"input", "preferred_output", "non_preferred_output"} <= row.keys():
        return "openai"
    if {"prompt", "chosen", "rejected"} <= row.keys():
        return "trl"
    if {"chosen", "rejected"} <= row.keys():
        return "anyscale"
    raise DataError(f"row has fields {sorted(row)}; expected 'input', 'preferred_output' and "
                    "'non_preferred_output' (OpenAI), 'prompt', 'chosen' and 'rejected' (TRL), "
                    "or 'chosen' and 'rejected' conversations (Anyscale)", line=line, param=param)


def _answer(value: object, name: str, line: int, param: str) -> dict:
    """The single assistant message of an OpenAI / conversational TRL answer list."""
    if isinstance(value, dict):
        value = [value]
    if (not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict)
            or value[0].get("role") != "assistant"):
        raise DataError(f"{name!r} must be a list holding one assistant message", line=line,
                        param=param)
    return value[0]


def _from_messages(prompt: object, chosen: dict, rejected: dict, tokenizer: Tokenizer,
                   line: int, param: str) -> tuple[list[int], list[int], list[int]]:
    if not isinstance(prompt, list):
        raise DataError("the prompt must be a list of messages", line=line, param=param)
    if chosen.get("content") == rejected.get("content"):
        raise DataError("the preferred and non-preferred answers are identical: nothing to "
                        "learn", line=line, param=param)
    prompt_ids, chosen_ids = chat_to_ids([*prompt, chosen], tokenizer, line, param)
    _, rejected_ids = chat_to_ids([*prompt, rejected], tokenizer, line, param)
    return prompt_ids, chosen_ids, rejected_ids


def _openai(row: dict, tokenizer: Tokenizer, line: int, param: str):
    source = row["input"]
    messages = source.get("messages") if isinstance(source, dict) else None
    return _from_messages(messages, _answer(row["preferred_output"], "preferred_output", line,
                                            param),
                          _answer(row["non_preferred_output"], "non_preferred_output", line,
                                  param), tokenizer, line, param)


def _trl(row: dict, tokenizer: Tokenizer, line: int, param: str):
    if not isinstance(row["prompt"], str):  # conversational
        return _from_messages(row["prompt"], _answer(row["chosen"], "chosen", line, param),
                              _answer(row["rejected"], "rejected", line, param), tokenizer, line,
                              param)
    if not isinstance(row["chosen"], str) or not isinstance(row["rejected"], str):
        raise DataError("'chosen' and 'rejected' must be strings when 'prompt' is one (or all "
                        "three conversations)", line=line, param=param)
    if row["chosen"] == row["rejected"]:
        raise DataError("'chosen' and 'rejected' are identical: nothing to learn", line=line,
                        param=param)
    prompt, chosen = text_to_ids({"prompt": row["prompt"], "completion": row["chosen"]},
                                 tokenizer, line, param)
    _, rejected = text_to_ids({"prompt": row["prompt"], "completion": row["rejected"]},
                              tokenizer, line, param)
    return prompt, chosen, rejected


def _anyscale(row: dict, tokenizer: Tokenizer, line: int, param: str):
    chosen, rejected = row["chosen"], row["rejected"]
    if not (isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected):
        raise DataError("'chosen' and 'rejected' must be non-empty lists of messages", line=line,
                        param=param)
    if chosen[:-1] != rejected[:-1]:
        raise DataError("'chosen' and 'rejected' must share every message but the last (the "
                        "shared prompt)", line=line, param=param)
    return _from_messages(chosen[:-1], _answer(chosen[-1:], "chosen", line, param),
                          _answer(rejected[-1:], "rejected", line, param), tokenizer, line, param)


READERS = {"openai": _openai, "trl": _trl, "anyscale": _anyscale}


def _fit(prompt: list[int], chosen: list[int], rejected: list[int], line: int,
         max_seq_len: int, param: str) -> PreferenceExample:
    if len(prompt) >= max_seq_len:
        raise DataError(f"the prompt has {len(prompt)} tokens, so max_seq_len ({max_seq_len}) "
                        "leaves no answer token; shorten the prompt or raise max_seq_len",
                        line=line, param=param)
    room = max_seq_len - len(prompt)
    return PreferenceExample(prompt, chosen[:room], rejected[:room], line,
                             truncated=max(len(chosen), len(rejected)) > room)
