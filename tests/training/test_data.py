"""Training data: the three formats, the chat template split, validation with line numbers,
and the hold-out (the SFT collator: test_sft.py)."""

import json

import pytest

from lmforge.training.data import (
    DataError,
    Example,
    chat_to_ids,
    read_examples,
    split_holdout,
)

EOS = 2  # SmolLM2's <|im_end|>


def _chat(i):
    return {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": f"What is {i} + {i}?"},
                         {"role": "assistant", "content": f"{2 * i}."}]}


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_chat_split_is_the_templates_own_tokens(smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = [{"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Say yes."},
                {"role": "assistant", "content": "Yes."}]
    prompt, completion = chat_to_ids(messages, tok, line=1)
    full = tok.apply_chat_template(messages, add_generation_prompt=False)
    # the template writes "<|im_end|>\n" after each turn: the completion stops at <|im_end|>
    assert prompt + completion + tok.encode("\n", add_special_tokens=False) == full
    assert prompt == tok.apply_chat_template(messages[:-1], add_generation_prompt=True)
    assert tok.decode(completion, skip_special_tokens=False) == "Yes.<|im_end|>"
    assert completion[-1] == EOS


def test_three_formats_read_alike(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    rows = [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(10)]
    pc = read_examples(_write_jsonl(tmp_path / "pc.jsonl", rows), tok, 64)
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("prompt,response\n" + "".join(f"Q{i}:, A{i}\n" for i in range(9))
                        + '"Q9:"," A9"\n')
    from_csv = read_examples(csv_path, tok, 64)
    assert [(e.prompt_ids, e.completion_ids) for e in pc] == [
        (e.prompt_ids, e.completion_ids) for e in from_csv]
    assert pc[3].prompt_ids == tok.encode("Q3:")
    assert pc[3].completion_ids == tok.encode(" A3", add_special_tokens=False) + [EOS]
    assert [e.line for e in from_csv] == list(range(2, 12))  # the header is line 1
    chat = read_examples(_write_jsonl(tmp_path / "chat.data", [_chat(i) for i in range(10)]),
                         tok, 64)  # no known extension: detected by content
    assert tok.decode(chat[4].completion_ids, skip_special_tokens=False) == "8.<|im_end|>"


def test_multiline_csv_record_reports_its_line(tmp_path, smollm2_tokenizer):
    path = tmp_path / "d.csv"
    path.write_text("prompt,response\n" + 'a,"two\nlines"\n' + "".join(
        f"p{i},r{i}\n" for i in range(8)) + "p,\n")
    with pytest.raises(DataError) as e:
        read_examples(path, smollm2_tokenizer, 64)
    assert e.value.line == 12 and "'response'" in e.value.message


@pytest.mark.parametrize("bad, reason", [
    ('{"messages": [', "invalid JSON"),
    ("[1, 2]", "JSON object"),
    ({"text": "hi"}, "expected 'messages'"),
    ({"prompt": "x", "completion": "y"}, "one format per file"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     "string 'content'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be the assistant"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     "empty"),
    ({"messages": [{"role": "user", "content": "word " * 80},
                   {"role": "assistant", "content": "x"}]}, "leaves no completion token"),
])
def test_bad_row_fails_with_line_and_reason(tmp_path, smollm2_tokenizer, bad, reason):
    rows = [_chat(i) for i in range(12)]
    rows.insert(4, bad)  # line 5
    with pytest.raises(DataError) as e:
        read_examples(_write_jsonl(tmp_path / "bad.jsonl", rows), smollm2_tokenizer, 64)
    assert e.value.line == 5
    assert e.value.message.startswith("line 5: ") and reason in e.value.message
    assert e.value.to_envelope()["error"]["param"] == "training_file"
    assert e.value.status_code == 400


def test_file_level_errors(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    with pytest.raises(DataError, match="at least 10"):
        read_examples(_write_jsonl(tmp_path / "few.jsonl", [_chat(1)] * 9), tok, 64)
    # LLM Engine's CSV has no minimum of its own: its reference's 5-row file is read, 1 row is not
    (tmp_path / "five.csv").write_text("prompt,response\n" + "q,a\n" * 5)
    assert len(read_examples(tmp_path / "five.csv", tok, 64)) == 5
    (tmp_path / "one.csv").write_text("prompt,response\nq,a\n")
    with pytest.raises(DataError, match="at least 2"):
        read_examples(tmp_path / "one.csv", tok, 64)
    (tmp_path / "x.csv").write_text("question,answer\na,b\n")
    with pytest.raises(DataError, match="columns 'prompt' and 'response'") as e:
        read_examples(tmp_path / "x.csv", tok, 64, param="validation_file")
    assert e.value.param == "validation_file"
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="not UTF-8"):
        read_examples(tmp_path / "bin.jsonl", tok, 64)


def test_long_completion_is_truncated_from_the_end(tmp_path, smollm2_tokenizer):
    rows = [{"prompt": "Q:", "completion": " yes"}] * 9 + [
        {"prompt": "Q:", "completion": " word" * 100}]
    examples = read_examples(_write_jsonl(tmp_path / "long.jsonl", rows), smollm2_tokenizer, 16)
    assert examples[-1].truncated and examples[-1].num_tokens == 16
    assert not examples[0].truncated


def test_holdout_is_ten_percent_deterministic_and_at_least_one():
    examples = [Example([1], [i], line=i + 1) for i in range(25)]
    train, val = split_holdout(examples, seed=3)
    assert len(val) == 2 and len(train) == 23  # round(2.5) = 2
    assert split_holdout(examples, seed=3) == (train, val)
    assert split_holdout(examples, seed=4)[1] != val
    assert {e.line for e in train} | {e.line for e in val} == set(range(1, 26))
    assert len(split_holdout(examples[:3], seed=0)[1]) == 1
    with pytest.raises(DataError):
        split_holdout(examples[:1], seed=0)

