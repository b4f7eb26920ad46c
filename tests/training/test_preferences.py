"""Preference data (``training/preferences.py``): OpenAI's, TRL's and Anyscale's formats give the
same pair of token sequences, bad rows fail with their line, long answers are cut."""

import json

import pytest

from lmforge.training.data import DataError, chat_to_ids
from lmforge.training.preferences import read_preferences

EOS = 2  # SmolLM2's <|im_end|>


def _messages(i):
    return [{"role": "system", "content": "Answer in one sentence."},
            {"role": "user", "content": f"What is {i} times {i}?"}]


def _answers(i):
    return ({"role": "assistant", "content": f"It is {i * i}."},
            {"role": "assistant", "content": f"Well, {i} times {i} is a product, and products "
                                             f"are sums repeated, so it comes to {i * i}."})


def _openai(i):
    good, bad = _answers(i)
    return {"input": {"messages": _messages(i)}, "preferred_output": [good],
            "non_preferred_output": [bad]}


def _trl(i):
    good, bad = _answers(i)
    return {"prompt": _messages(i), "chosen": [good], "rejected": [bad]}


def _anyscale(i):
    good, bad = _answers(i)
    return {"chosen": [*_messages(i), good], "rejected": [*_messages(i), bad]}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("make", [_openai, _trl, _anyscale])
def test_the_three_formats_give_the_chat_templates_own_pairs(make, tmp_path, smollm2_tokenizer):
    pairs = read_preferences(_write(tmp_path / "p.jsonl", [make(i) for i in range(10)]),
                             smollm2_tokenizer, 512)
    good, bad = _answers(3)
    prompt, chosen = chat_to_ids([*_messages(3), good], smollm2_tokenizer, 1)
    _, rejected = chat_to_ids([*_messages(3), bad], smollm2_tokenizer, 1)
    assert (pairs[3].prompt_ids, pairs[3].chosen_ids, pairs[3].rejected_ids) == (
        prompt, chosen, rejected)
    assert chosen[-1] == rejected[-1] == EOS and len(rejected) > len(chosen)
    assert [p.line for p in pairs] == list(range(1, 11)) and not pairs[0].truncated


def test_trl_strings_are_prompt_tokens_then_each_answer_and_eos(tmp_path, smollm2_tokenizer):
    rows = [_trl_text(i) for i in range(10)]
    pair = read_preferences(_write(tmp_path / "p.jsonl", rows), smollm2_tokenizer, 512)[0]
    assert pair.prompt_ids == smollm2_tokenizer.encode("Q0: two plus two?")
    assert pair.chosen_ids == smollm2_tokenizer.encode(" Four.", add_special_tokens=False) + [EOS]
    assert pair.num_tokens == 2 * len(pair.prompt_ids) + len(pair.chosen_ids) + len(
        pair.rejected_ids)


def _trl_text(i):
    return {"prompt": f"Q{i}: two plus two?", "chosen": " Four.", "rejected": " Five."}


@pytest.mark.parametrize("make,row,reason", [
    (_openai, {**_openai(0), "non_preferred_output": _openai(0)["preferred_output"]},
     "identical"),
    (_openai, {**_openai(0), "preferred_output": [{"role": "user", "content": "x"}]},
     "one assistant message"),
    (_anyscale, {"chosen": [*_messages(0), _answers(0)[0]],
                 "rejected": [*_messages(1), _answers(0)[1]]}, "share every message but the last"),
    (_trl_text, {"prompt": "a", "chosen": "b", "rejected": "b"}, "identical"),
    (_trl_text, {"prompt": "a", "chosen": ["b"], "rejected": "c"}, "must be strings"),
    (_openai, {"prompt": "a", "answer": "b"}, "expected 'input'"),
    (_openai, _trl(0), "trl format, but the file starts in the openai format"),
])
def test_a_bad_row_fails_with_its_line(tmp_path, smollm2_tokenizer, make, row, reason):
    rows = [make(i) for i in range(10)]
    rows[6] = row
    with pytest.raises(DataError, match=reason) as e:
        read_preferences(_write(tmp_path / "p.jsonl", rows), smollm2_tokenizer, 512)
    assert e.value.line == 7 and str(e.value).startswith("line 7: ")


def test_too_few_rows_and_long_prompts_are_refused_long_answers_cut(tmp_path, smollm2_tokenizer):
    path = _write(tmp_path / "p.jsonl", [_openai(i) for i in range(10)])
    with pytest.raises(DataError, match="at least 10"):
        read_preferences(_write(tmp_path / "few.jsonl", [_openai(0)] * 3), smollm2_tokenizer,
                         512)
    with pytest.raises(DataError, match="leaves no answer token"):
        read_preferences(path, smollm2_tokenizer, 8)
    pair = read_preferences(path, smollm2_tokenizer, 512)[0]
    width = len(pair.prompt_ids) + len(pair.chosen_ids) + 2
    cut = read_preferences(path, smollm2_tokenizer, width)[0]
    assert cut.truncated and cut.chosen_ids == pair.chosen_ids
    assert cut.rejected_ids == pair.rejected_ids[:len(pair.chosen_ids) + 2]
