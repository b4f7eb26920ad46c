"""Training data: OpenAI chat JSONL, prompt/completion JSONL and LLM Engine's CSV -> token ids.

Each row becomes an ``Example``: the prompt's token ids (no loss) and the completion's (the
loss), in the model's own format:

- chat rows (``{"messages": [...]}``, OpenAI's fine-tuning format): the completion is the final
  assistant message, the prompt everything before it rendered by the model's chat template with
  ``add_generation_prompt=True``. Both come from one tokenization of the full conversation, so
  prompt + completion are exactly the template's own tokens (up to the end-of-turn token; what
  the template writes after it, e.g. SmolLM2's ``"\\n"``, is dropped).
- prompt/completion rows (``{"prompt", "completion"}``, OpenAI's legacy format) and CSV rows
  with ``prompt`` and ``response`` columns (LLM Engine's format): the prompt's tokens (with the
  tokenizer's bos, if it adds one) and the completion's, followed by eos.

Validation fails on the first bad row with its 1-based line number and the reason
(``DataError``). A row longer than ``max_seq_len`` tokens is truncated from the end, as OpenAI's
fine-tuning does; a row whose prompt alone leaves no completion token is an error.

``methods.sft.collate`` pads a list of examples into the micro-batch the SFT loss takes.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from lmforge.errors import InvalidRequestError
from lmforge.tokenizer import Tokenizer

MIN_ROWS = 10  # OpenAI's minimum of training examples per (JSONL) file
# LLM Engine's CSV format states no minimum (its reference builds a 5-row file): one row to train
# on and one to hold out for validation
CSV_MIN_ROWS = 2
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
HOLDOUT_FRACTION = 0.1  # of the training rows held out for validation when no file is given

Row = TypeVar("Row")  # an example of any training method


class DataError(InvalidRequestError):
    """A training or validation file is malformed (HTTP 400; the fine-tuning job fails with it).

    Attributes:
        line: 1-based line of the offending row (its last line for a CSV record spanning
            several), or None for a problem of the whole file (too few rows, unknown format).
    """

    default_code = "invalid_training_file"

    def __init__(self, message: str, *, line: int | None = None, param: str = "training_file"):
        super().__init__(f"line {line}: {message}" if line is not None else message, param=param)
        self.line = line


@dataclass(frozen=True)
class Example:
    """One training row as token ids; the loss is taken on ``completion_ids`` only."""

    prompt_ids: list[int]
    completion_ids: list[int]  # never empty
    line: int  # 1-based line of the row in its file
    truncated: bool = False  # cut to max_seq_len from the end

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def read_examples(path: str | Path, tokenizer: Tokenizer, max_seq_len: int, *,
                  min_rows: int | None = None, param: str = "training_file") -> list[Example]:
    """Read, validate and tokenize a training (or validation) file.

    The format comes from the extension (``.csv``; ``.jsonl``/``.json``) or, for any other name,
    from the content (a first character ``{`` means JSONL). In a JSONL file every row must have
    the format of the first (``messages``, or ``prompt`` + ``completion``).

    Raises:
        DataError: with the line and the reason: malformed JSON, a row that is not an object,
            missing or non-string fields, an unknown role, no final assistant message, an empty
            completion, a prompt of ``max_seq_len`` tokens or more, a template error; or, for the
            whole file, an undecodable file or fewer than ``min_rows`` rows (default:
            ``MIN_ROWS`` for JSONL, OpenAI's rule, and ``CSV_MIN_ROWS`` for LLM Engine's CSV).
    """
    kind, rows = uniform_rows(path, _row_kind, min_rows=min_rows, param=param)
    examples = []
    for line, row in rows:
        prompt, completion = (chat_to_ids(row["messages"], tokenizer, line, param)
                              if kind == "chat" else text_to_ids(row, tokenizer, line, param))
        examples.append(_fit(prompt, completion, line, max_seq_len, param))
    return examples


def uniform_rows(path: str | Path, kind_of: Callable[[dict, int, str], str], *,
                 min_rows: int | None, param: str) -> tuple[str, list[tuple[int, dict]]]:
    """(the format, [(1-based line, row)]) of a file whose rows all have its first row's format,
    ``kind_of(row, line, param)``; what every training method's reader starts with.

    Raises:
        DataError: an unreadable file, a row in another format than the first (naming both), or
            fewer than ``min_rows`` rows (None: ``MIN_ROWS`` for JSONL, ``CSV_MIN_ROWS`` for CSV).
    """
    is_csv, rows = read_rows(Path(path), param)
    if min_rows is None:
        min_rows = CSV_MIN_ROWS if is_csv else MIN_ROWS
    if len(rows) < min_rows:
        raise DataError(f"the file has {len(rows)} example(s); at least {min_rows} are needed",
                        param=param)
    kind = kind_of(rows[0][1], rows[0][0], param)
    for line, row in rows:
        if (other := kind_of(row, line, param)) != kind:
            raise DataError(f"row is in the {other} format, but the file starts in the {kind} "
                            "format; use one format per file", line=line, param=param)
    return kind, rows


def split_holdout(examples: Sequence[Row], seed: int,
                  fraction: float = HOLDOUT_FRACTION) -> tuple[list[Row], list[Row]]:
    """(train, validation): a ``fraction`` of the rows, at least one, held out at random.

    Deterministic for a given ``seed`` and row order; both parts keep the file's order.

    Raises:
        DataError: fewer than 2 rows (nothing would be left to train on).
    """
    if len(examples) < 2:
        raise DataError("at least 2 examples are needed to hold out a validation set")
    n_val = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(random.Random(seed).sample(range(len(examples)), n_val))
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order the trainer visits ``n`` training examples in epoch ``epoch`` (0-based): a
    shuffle seeded by (seed, epoch), so that a resumed run sees the same batches, and a method
    that works ahead of the loop (DPO's reference log-probs on Ray actors) can follow it."""
    order = list(range(n))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return order


# --- rows -> token ids -----------------------------------------------------------------------

def chat_to_ids(messages: object, tokenizer: Tokenizer, line: int,
                param: str = "training_file") -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one chat row; the completion is the last message.

    The full conversation is rendered once and split where the prompt's rendering (all but the
    last message, with the generation prompt) ends, so prompt + completion are the template's
    own tokens. The completion ends at its last eos (end-of-turn) token. Where the template
    does not render the prompt as a prefix of the whole, or the two tokenizations disagree at
    the boundary, the prompt is rendered alone and the completion is the assistant text + eos.

    Raises:
        DataError: see ``read_examples``.
    """
    _check_messages(messages, line, param)
    try:
        full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    except InvalidRequestError as e:
        raise DataError(e.message, line=line, param=param) from None
    if full[:len(prompt)] == prompt and len(full) > len(prompt):
        completion = full[len(prompt):]
        ends = [i for i, t in enumerate(completion) if t in tokenizer.eos_token_ids]
        completion = completion[:ends[-1] + 1] if ends else completion
    else:
        completion = _completion_ids(messages[-1]["content"], tokenizer)
    return prompt, completion


def text_to_ids(row: dict, tokenizer: Tokenizer, line: int,
                param: str = "training_file") -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids + eos) of a prompt/completion (or prompt/response) row.

    Raises:
        DataError: a missing, non-string or empty field.
    """
    key = "completion" if "completion" in row else "response"
    for field in ("prompt", key):
        if not isinstance(row.get(field), str):
            raise DataError(f"field {field!r} is missing or not a string", line=line, param=param)
    if not row[key].strip():
        raise DataError(f"field {key!r} is empty: there is nothing to learn", line=line,
                        param=param)
    return tokenizer.encode(row["prompt"]), _completion_ids(row[key], tokenizer)


def _completion_ids(text: str, tokenizer: Tokenizer) -> list[int]:
    eos = tokenizer.hf.eos_token_id
    return tokenizer.encode(text, add_special_tokens=False) + ([eos] if eos is not None else [])


def _check_messages(messages: object, line: int, param: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list", line=line, param=param)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f"messages[{i}] must be an object with a 'role'", line=line,
                            param=param)
        if m["role"] not in CHAT_ROLES:
            raise DataError(f"messages[{i}] has role {m['role']!r}; roles are "
                            f"{', '.join(CHAT_ROLES)}", line=line, param=param)
        if not isinstance(m.get("content"), str) and not (m["role"] == "assistant"
                                                          and m.get("tool_calls")):
            raise DataError(f"messages[{i}] ({m['role']}) needs a string 'content'", line=line,
                            param=param)
    if messages[-1]["role"] != "assistant":
        raise DataError("the last message must be the assistant's (the completion to learn); "
                        f"it is {messages[-1]['role']!r}", line=line, param=param)
    if not (messages[-1].get("content") or "").strip():
        raise DataError("the final assistant message is empty: there is nothing to learn",
                        line=line, param=param)


def _fit(prompt: list[int], completion: list[int], line: int, max_seq_len: int,
         param: str) -> Example:
    if len(prompt) >= max_seq_len:
        raise DataError(f"the prompt has {len(prompt)} tokens, so max_seq_len ({max_seq_len}) "
                        "leaves no completion token; shorten the prompt or raise max_seq_len",
                        line=line, param=param)
    room = max_seq_len - len(prompt)
    return Example(prompt, completion[:room], line, truncated=len(completion) > room)


# --- files -> rows ---------------------------------------------------------------------------

def _row_kind(row: dict, line: int, param: str) -> str:
    if "messages" in row:
        return "chat"
    if "prompt" in row and ("completion" in row or "response" in row):
        return "prompt/completion"
    raise DataError(f"row has fields {sorted(row)}; expected 'messages' (chat), or 'prompt' "
                    "and 'completion' (or 'response')", line=line, param=param)


def read_rows(path: Path, param: str) -> tuple[bool, list[tuple[int, dict]]]:
    """(whether the file is CSV, [(1-based line, row object)] of each non-blank JSONL line or
    CSV record)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"file {path} does not exist", param=param) from None
    except UnicodeDecodeError as e:
        raise DataError(f"the file is not UTF-8 text ({e.reason} at byte {e.start})",
                        param=param) from None
    is_csv = path.suffix.lower() == ".csv" or (
        path.suffix.lower() not in (".jsonl", ".json") and not text.lstrip().startswith("{"))
    return is_csv, list(_csv_rows(text, param) if is_csv else _jsonl_rows(text, param))


def _jsonl_rows(text: str, param: str) -> Iterator[tuple[int, dict]]:
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON ({e.msg} at column {e.colno})", line=line,
                            param=param) from None
        if not isinstance(row, dict):
            raise DataError(f"each line must be a JSON object, not {type(row).__name__}",
                            line=line, param=param)
        yield line, row


def _csv_rows(text: str, param: str) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    columns = set(reader.fieldnames or ())
    if not {"prompt", "response"} <= columns:
        raise DataError(f"a CSV file needs the columns 'prompt' and 'response'; its header has "
                        f"{sorted(columns)}", line=1, param=param)
    try:
        for record in reader:
            if not any((v or "").strip() for v in record.values() if isinstance(v, str)):
                continue
            yield reader.line_num, {"prompt": record["prompt"], "response": record["response"]}
    except csv.Error as e:
        raise DataError(f"malformed CSV ({e})", line=reader.line_num, param=param) from None
