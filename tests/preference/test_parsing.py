"""The judge's replies: schemas the grammar engine accepts, tolerant parsers, the JSONL log."""

from __future__ import annotations

import json

import jsonschema
import pytest

from lmforge.preference.log import JsonlLog
from lmforge.preference.parsing import (LETTERS, answers_schema, parse_answers,
                                        parse_questions, questions_schema, render_questions,
                                        score, shuffle_choices)

Q = {"question": "Who?", "choices": {c: f"c{c}" for c in "ABCDE"}, "answer": "B"}


def test_schemas_validate_exactly_the_expected_shape():
    jsonschema.validate({"questions": [Q] * 5}, questions_schema(5))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"questions": [Q] * 4}, questions_schema(5))
    jsonschema.validate({"answers": ["A", "Unsure", "E"]}, answers_schema(3))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"answers": ["A", "maybe", "E"]}, answers_schema(3))


def test_questions_parser_tolerates_chatter_and_counts_drops():
    bad = {"question": "", "choices": Q["choices"], "answer": "A"}
    listed = {"question": "Where?", "choices": ["1", "2", "3", "4", "5"], "answer": "c)"}
    text = "Sure! ```json\n" + json.dumps({"questions": [Q, bad, listed, {"x": 1}]}) + "\n```"
    parsed = parse_questions(text)
    assert parsed.dropped == 2
    assert parsed.items[1] == {"question": "Where?", "choices": dict(zip("ABCDE", "12345")),
                               "answer": "C"}
    assert parse_questions("no json at all").items == []


def test_answers_parser_reads_json_or_numbered_lines():
    assert parse_answers('{"answers": ["a", "Unsure", "E"]}', 3).items == ["A", "Unsure", "E"]
    lines = parse_answers("1. B\n2) unsure\n3: maybe\n", 3)
    assert lines.items == ["B", "Unsure", "Unsure"] and lines.dropped == 1
    short = parse_answers('["A"]', 3)
    assert short.items == ["A", "Unsure", "Unsure"] and short.dropped == 2


def test_score_and_rendering():
    questions = [Q, {**Q, "answer": "A"}]
    assert score(["B", "A"], questions) == 2
    assert score(["Unsure", "B"], questions) == 0
    assert render_questions([Q]).splitlines()[:2] == ["1. Who?", "   A) cA"]


def test_log_resumes_and_cuts_a_torn_line(tmp_path):
    path = tmp_path / "x.jsonl"
    log = JsonlLog(path, "key")
    log.append({"key": "a", "v": 1})
    log.append({"key": "b", "v": 2})
    with pytest.raises(ValueError):
        log.append({"key": "a", "v": 3})
    with path.open("a") as f:
        f.write('{"key": "c", "v"')  # the process died mid-line
    again = JsonlLog(path, "key")
    assert list(again.records) == ["a", "b"] and "c" not in again
    again.append({"key": "c", "v": 3})
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b", "c"]


def test_shuffled_choices_keep_the_answer_with_its_text_and_are_seeded():
    questions = [{"question": f"q{i}", "choices": {c: f"text {c}" for c in LETTERS},
                  "answer": "A"} for i in range(20)]
    shown = shuffle_choices(questions, "article/0")
    assert shown == shuffle_choices(questions, "article/0")
    assert all(q["choices"][q["answer"]] == "text A" for q in shown)
    assert all(sorted(q["choices"].values()) == sorted(questions[0]["choices"].values())
               for q in shown)
    assert len({q["answer"] for q in shown}) > 2  # the key no longer sits at one position
    assert shown != shuffle_choices(questions, "article/1")
