"""What the judge writes: multiple-choice questions and answers, as JSON schemas (for servers
that honour ``response_format: json_schema``, so parsing cannot fail) and as tolerant parsers
(for the rest: the first JSON value in the reply, code fences and chatter around it ignored,
then a line-by-line fallback for answers).

A question is ``{"question": str, "choices": {"A".."E": str}, "answer": "A".."E"}``; an answer
is a letter or ``"Unsure"``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any

LETTERS = ("A", "B", "C", "D", "E")
UNSURE = "Unsure"


def questions_schema(num_questions: int, max_question_chars: int = 150,
                     max_choice_chars: int = 60) -> dict:
    """JSON schema of the judge's question reply: exactly ``num_questions`` questions.

    The length caps bound the reply (a small judge can loop inside a string until
    ``max_tokens``, which would cut the JSON short): with them, a grammar-constrained reply
    always closes within ``num_questions * (max_question_chars + 5 * max_choice_chars)``
    characters plus the JSON around them."""
    text = {"type": "string", "minLength": 1}
    question = {"type": "object", "additionalProperties": False,
                "required": ["question", "choices", "answer"],
                "properties": {
                    "question": {**text, "maxLength": max_question_chars},
                    "choices": {"type": "object", "additionalProperties": False,
                                "required": list(LETTERS),
                                "properties": {k: {**text, "maxLength": max_choice_chars}
                                               for k in LETTERS}},
                    "answer": {"type": "string", "enum": list(LETTERS)}}}
    return {"type": "object", "additionalProperties": False, "required": ["questions"],
            "properties": {"questions": {"type": "array", "items": question,
                                         "minItems": num_questions,
                                         "maxItems": num_questions}}}


def answers_schema(num_questions: int) -> dict:
    """JSON schema of the judge's answer reply: one letter or "Unsure" per question."""
    answer = {"type": "string", "enum": [*LETTERS, UNSURE]}
    return {"type": "object", "additionalProperties": False, "required": ["answers"],
            "properties": {"answers": {"type": "array", "items": answer,
                                       "minItems": num_questions, "maxItems": num_questions}}}


def response_format(name: str, schema: dict) -> dict:
    """The OpenAI ``response_format`` that asks for ``schema``."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                   "strict": True}}


@dataclass(frozen=True)
class Parsed:
    """A parser's result: the kept items, and how many it had to drop (malformed ones)."""

    items: list
    dropped: int


def first_json(text: str) -> Any:
    """The first JSON object or array in ``text`` (None when there is none)."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[{\[]", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        return value
    return None


def parse_questions(text: str) -> Parsed:
    """The well-formed questions of a reply: a ``{"questions": [...]}`` object or a bare list;
    choices as an A-E mapping or a list of five; the answer as a letter (``"b"``, ``"B)"`` and
    ``"B. text"`` read as B). Anything else is dropped and counted."""
    value = first_json(text)
    if isinstance(value, dict):
        value = value.get("questions")
    if not isinstance(value, list):
        return Parsed([], 1)
    kept = [q for q in map(_question, value) if q is not None]
    return Parsed(kept, len(value) - len(kept))


def _question(item: Any) -> dict | None:
    if not isinstance(item, dict):
        return None
    question, choices, answer = item.get("question"), item.get("choices"), item.get("answer")
    if isinstance(choices, list) and len(choices) == len(LETTERS):
        choices = dict(zip(LETTERS, choices))
    if (not isinstance(question, str) or not question.strip() or not isinstance(choices, dict)
            or set(choices) != set(LETTERS)
            or not all(isinstance(c, str) and c.strip() for c in choices.values())):
        return None
    letter = _letter(answer)
    if letter is None or letter == UNSURE:
        return None
    return {"question": question.strip(), "choices": {k: choices[k].strip() for k in LETTERS},
            "answer": letter}


def _letter(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    value = value.strip()
    if value.lower().startswith("unsure"):
        return UNSURE
    match = re.match(r"\(?([A-Ea-e])(?:$|[\s).:,])", value)
    return match.group(1).upper() if match else None


def parse_answers(text: str, num_questions: int) -> Parsed:
    """``num_questions`` answers from a reply: the JSON ``{"answers": [...]}`` (or a bare list),
    else lines like ``1. B`` / ``2) Unsure``. A missing or unreadable answer becomes "Unsure"
    (scored wrong) and is counted as dropped; extra answers are ignored."""
    value = first_json(text)
    if isinstance(value, dict):
        value = value.get("answers")
    if isinstance(value, list):
        answers = [_letter(v) for v in value[:num_questions]]
    else:
        found = dict(re.findall(r"(?m)^\s*(\d+)\s*[.):-]\s*\(?([A-Ea-e]\b|[Uu]nsure)", text))
        answers = [_letter(found.get(str(i + 1), "")) for i in range(num_questions)]
    answers += [None] * (num_questions - len(answers))
    dropped = sum(a is None for a in answers)
    return Parsed([a or UNSURE for a in answers], dropped)


def render_questions(questions: list[dict]) -> str:
    """The questions as the answer prompt shows them: numbered, one choice per line."""
    blocks = []
    for i, q in enumerate(questions, start=1):
        choices = "\n".join(f"   {k}) {q['choices'][k]}" for k in LETTERS)
        blocks.append(f"{i}. {q['question']}\n{choices}")
    return "\n".join(blocks)


def shuffle_choices(questions: list[dict], seed: str) -> list[dict]:
    """The questions with each one's choices in a seeded random order (``seed`` + its index:
    the pipeline seeds with the article's id, so every candidate of an article sees the same
    order), letters reassigned and the answer moved with its choice.

    A small judge answers by position (the first letter, or the example's) and writes its keys
    at a favourite position too; shown in the writer's order, those biases would line up and
    score every summary alike. Shuffled, a position-biased answer is right by chance only.
    """
    shuffled = []
    for i, q in enumerate(questions):
        order = list(LETTERS)
        random.Random(f"{seed}/{i}").shuffle(order)  # order[j]: the original letter shown as j
        shuffled.append({"question": q["question"],
                         "choices": {LETTERS[j]: q["choices"][k] for j, k in enumerate(order)},
                         "answer": LETTERS[order.index(q["answer"])]})
    return shuffled


def score(answers: list[str], questions: list[dict]) -> int:
    """How many ``answers`` match the questions' keys ("Unsure" never does)."""
    return sum(a == q["answer"] for a, q in zip(answers, questions))
