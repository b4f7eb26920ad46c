"""Tokenizer loading, chat templates and incremental detokenization on the real SmolLM2 tokenizer.

The oracle for loading and templates is transformers itself (``AutoTokenizer`` on the GGUF file);
the oracle for the detokenizer is ``Tokenizer.decode`` of the whole output, cut at the stop string.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lmforge.errors import InvalidRequestError, ModelLoadError
from lmforge.tokenizer import IncrementalDetokenizer, Tokenizer

MULTILINGUAL = (
    "The quick brown fox jumps over the lazy dog. Emoji: 😀🎉👍🏽🇫🇷 and a family 👨‍👩‍👧. "
    "中文字符的处理很重要。日本語のテキストもあります。한국어 문장도 있습니다. "
    "Ελληνικά, русский текст, العربية, हिन्दी, and math ∑∫√∞ ≠ ≤. Done!"
)
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi 👋, what is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "中文呢?"},
]


@pytest.fixture(scope="module")
def gguf_reference(smollm2_gguf_path):
    """transformers' own GGUF-converted tokenizer, bypassing lmforge and its cache (~4.5 s)."""
    return AutoTokenizer.from_pretrained(
        str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name
    )


def stream(tokenizer, output_ids, prompt_ids=(), **kwargs):
    """Feed ``output_ids`` one at a time; return (update deltas, flush delta, detokenizer)."""
    detok = IncrementalDetokenizer(tokenizer, list(prompt_ids), **kwargs)
    deltas = [detok.update([token_id]) for token_id in output_ids]
    return deltas, detok.flush(), detok


# ---------------------------------------------------------------------------------------- loading


def test_smollm2_special_tokens(smollm2_tokenizer):
    assert smollm2_tokenizer.vocab_size == 49152
    assert smollm2_tokenizer.eos_token_ids == frozenset({2})
    assert smollm2_tokenizer.hf.convert_ids_to_tokens(2) == "<|im_end|>"
    assert smollm2_tokenizer.bos_token_id == 1


@pytest.mark.parametrize("text", ["Hello world", "  leading spaces\tand\ttabs\n\n", MULTILINGUAL])
def test_encode_decode_round_trip(smollm2_tokenizer, text):
    ids = smollm2_tokenizer.encode(text)
    assert ids and all(0 <= i < smollm2_tokenizer.vocab_size for i in ids)
    assert smollm2_tokenizer.decode(ids) == text


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    smollm2_tokenizer, gguf_reference, add_generation_prompt
):
    ours = smollm2_tokenizer.apply_chat_template(
        CONVERSATION, add_generation_prompt=add_generation_prompt
    )
    reference = gguf_reference.apply_chat_template(
        CONVERSATION, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    if isinstance(reference, Mapping):  # transformers 5 returns a BatchEncoding
        reference = reference["input_ids"]
    assert ours == list(reference)
    text = smollm2_tokenizer.decode(ours, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_default_system_prompt_is_rendered(smollm2_tokenizer):
    ids = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    text = smollm2_tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_gguf_cache_gives_identical_tokenizer(smollm2_gguf_path, smollm2_tokenizer, gguf_reference):
    cached = Tokenizer.from_gguf(smollm2_gguf_path)  # the session fixture already filled the cache
    cache_root = Path(cached.hf.name_or_path)
    assert cache_root.parent == Path(os.environ["LMFORGE_CACHE"]) / "tokenizers"
    assert (cache_root / "tokenizer.json").is_file()
    assert cached.vocab_size == len(gguf_reference) == 49152
    assert cached.eos_token_ids == {gguf_reference.eos_token_id} == {2}
    assert cached.bos_token_id == gguf_reference.bos_token_id
    assert cached.chat_template == gguf_reference.chat_template
    for text in ["Hello world", MULTILINGUAL, "<|im_start|>user\nx<|im_end|><repo_name>"]:
        assert cached.encode(text) == gguf_reference.encode(text)
    every_id = [[i] for i in range(len(gguf_reference))]
    for skip in (True, False):
        assert cached.hf.batch_decode(every_id, skip_special_tokens=skip) == (
            gguf_reference.batch_decode(every_id, skip_special_tokens=skip)
        )


def test_missing_gguf_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Tokenizer.from_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ModelLoadError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")


def test_from_pretrained_reads_generation_config_eos_list(smollm2_tokenizer, tmp_path):
    smollm2_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.eos_token_ids == frozenset({0, 2})
    assert loaded.chat_template == smollm2_tokenizer.chat_template


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_llama3_dir", "tiny_qwen2_dir"])
def test_tiny_checkpoints_carry_the_smollm2_tokenizer(request, fixture, smollm2_tokenizer):
    directory = request.getfixturevalue(fixture)
    loaded = Tokenizer.from_pretrained(directory)
    assert loaded.eos_token_ids == frozenset({2})
    expected = smollm2_tokenizer.apply_chat_template(CONVERSATION)
    assert loaded.apply_chat_template(CONVERSATION) == expected
    config = json.loads((directory / "config.json").read_text())
    assert config["vocab_size"] == 49152 and (directory / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------- chat templates


def test_chat_template_override(smollm2_tokenizer):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    ids = smollm2_tokenizer.apply_chat_template(CONVERSATION[1:3], chat_template=template)
    expected = "[user] Hi 👋, what is 2+2?\n[assistant] 4.\n"
    assert ids == smollm2_tokenizer.encode(expected, add_special_tokens=False)


def test_no_template_names_the_fix(smollm2_tokenizer, tmp_path):
    smollm2_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    bare = Tokenizer.from_pretrained(tmp_path)
    assert bare.chat_template is None
    with pytest.raises(InvalidRequestError, match="--chat-template FILE"):
        bare.apply_chat_template(CONVERSATION)
    assert bare.apply_chat_template(CONVERSATION, chat_template="{{ messages[0]['content'] }}") == (
        bare.encode("You are terse.", add_special_tokens=False)
    )


def test_template_exception_becomes_invalid_request(smollm2_tokenizer):
    template = (
        "{% if messages[0]['role'] == 'tool' %}"
        "{{ raise_exception('tool roles are not supported') }}{% endif %}"
    )
    with pytest.raises(InvalidRequestError, match="tool roles are not supported") as info:
        smollm2_tokenizer.apply_chat_template(
            [{"role": "tool", "content": "x"}], chat_template=template
        )
    assert info.value.param == "messages" and info.value.status_code == 400


def test_missing_content_becomes_invalid_request(smollm2_tokenizer):
    # SmolLM2's template concatenates message['content'] with '+', which fails on None.
    with pytest.raises(InvalidRequestError) as info:
        smollm2_tokenizer.apply_chat_template([{"role": "user", "content": None}])
    assert info.value.param == "messages"


# ------------------------------------------------------------------------ incremental detokenizer


def test_multibyte_characters_never_emit_replacement_chars(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode(MULTILINGUAL)
    # The test is only meaningful if some character really spans several byte-level tokens.
    assert any("\ufffd" in smollm2_tokenizer.decode([i]) for i in ids)
    prompt = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "Say it"}])
    deltas, tail, detok = stream(smollm2_tokenizer, ids, prompt)
    assert not any("\ufffd" in d for d in deltas + [tail])
    assert "".join(deltas) + tail == detok.output_text == smollm2_tokenizer.decode(ids)
    assert tail == "" and not detok.stopped  # no stop strings: nothing is held back


def check_stop_stream(tokenizer, text, stop, expected, **kwargs):
    """Stream ``text``'s tokens; every partial output must be a prefix of ``expected``."""
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [], stop=stop, **kwargs)
    for token_id in ids:
        delta = detok.update([token_id])
        assert expected.startswith(detok.output_text), f"leaked {delta!r}"
    assert detok.stopped and detok.output_text == expected  # found by update(), not flush()
    assert detok.update(tokenizer.encode(" more text")) == "" and detok.flush() == ""


def test_stop_string_across_tokens_is_cut_exactly(smollm2_tokenizer):
    text = "Hello there, my friend. The end is near."
    stop = "re, my fri"
    ids = smollm2_tokenizer.encode(text)
    pieces = [smollm2_tokenizer.decode([i]) for i in ids]
    assert all(stop not in p for p in pieces)  # it spans token boundaries
    check_stop_stream(smollm2_tokenizer, text, [stop], "Hello the")


def test_stop_string_included_in_output(smollm2_tokenizer):
    text = "Hello there, my friend. The end is near."
    check_stop_stream(
        smollm2_tokenizer,
        text,
        ["re, my fri"],
        "Hello there, my fri",
        include_stop_str_in_output=True,
    )


def test_earliest_stop_string_wins(smollm2_tokenizer):
    text = "Hello there, my friend. The end is near."
    check_stop_stream(smollm2_tokenizer, text, ["end", "near", "my f"], "Hello there, ")
    check_stop_stream(smollm2_tokenizer, text, ["The end", "d. T"], "Hello there, my frien")
    # " there" is one token, so "he" and "there" complete in the same update: position decides.
    assert smollm2_tokenizer.decode(smollm2_tokenizer.encode(text)[1:2]) == " there"
    check_stop_stream(smollm2_tokenizer, text, ["he", "there"], "Hello ")


def test_stop_string_made_of_multibyte_characters(smollm2_tokenizer):
    check_stop_stream(smollm2_tokenizer, MULTILINGUAL, ["👍🏽", "日本"], MULTILINGUAL.split("👍🏽")[0])


def test_hold_back_and_flush_without_stop(smollm2_tokenizer):
    text = "A short answer"
    ids = smollm2_tokenizer.encode(text)
    detok = IncrementalDetokenizer(smollm2_tokenizer, [], stop=["never seen"])
    for k, token_id in enumerate(ids, start=1):
        detok.update([token_id])
        so_far = smollm2_tokenizer.decode(ids[:k])
        assert detok.output_text == so_far[: max(0, len(so_far) - 9)]  # hold back len(stop) - 1
    assert detok.flush() == text[-9:] and detok.output_text == text and not detok.stopped


def test_flush_releases_incomplete_character_as_decode_does(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("ok 😀")
    while not smollm2_tokenizer.decode(ids).endswith("\ufffd"):
        ids = ids[:-1]  # cut the emoji mid-way, as a length limit would
    deltas, tail, _ = stream(smollm2_tokenizer, ids)
    assert "".join(deltas) + tail == smollm2_tokenizer.decode(ids) and tail.endswith("\ufffd")


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(smollm2_tokenizer, skip):
    ids = smollm2_tokenizer.encode("Yes.<|im_end|>\n<|im_start|>user\nOk 中文")
    assert 2 in ids and 1 in ids
    deltas, tail, _ = stream(smollm2_tokenizer, ids, skip_special_tokens=skip)
    text = "".join(deltas) + tail
    assert text == smollm2_tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in text) == (not skip)


def test_special_token_as_stop_string(smollm2_tokenizer):
    text = "Yes.<|im_end|>\nmore"
    check_stop_stream(smollm2_tokenizer, text, ["<|im_end|>"], "Yes.", skip_special_tokens=False)


def test_random_slices_property(smollm2_tokenizer):
    """300 random token windows of multilingual text (often starting or ending mid-character)."""
    rng = random.Random(0)
    ids = smollm2_tokenizer.encode(MULTILINGUAL * 2)
    for _ in range(300):
        start = rng.randrange(len(ids) - 1)
        output = ids[start : start + rng.randint(1, 40)]
        full = smollm2_tokenizer.decode(output)
        stop = []
        if rng.random() < 0.5 and full:
            at = rng.randrange(len(full))
            stop = [full[at : at + rng.randint(1, 6)]]
        expected = full[: full.find(stop[0])] if stop else full
        detok = IncrementalDetokenizer(smollm2_tokenizer, ids[:start], stop=stop)
        for token_id in output:
            delta = detok.update([token_id])
            assert expected.startswith(detok.output_text)  # no spurious U+FFFD, no stop leak
            # A window that starts mid-character legitimately begins with U+FFFD, as decode() shows.
            assert not delta.endswith("\ufffd") or full.startswith("\ufffd")
        detok.flush()
        assert detok.output_text == expected and detok.stopped == bool(stop)


def test_leading_space_tokenizer_keeps_the_first_space():
    """A Llama-2-style SentencePiece BPE (Metaspace, byte fallback) whose decode strips the first
    "▁": the output after a prompt must keep it, as vLLM does, and bytes must still be joined."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    chars = "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?"
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(chars)
    merges = [("▁", "P"), ("▁P", "a"), ("r", "i")]
    vocab = {p: i for i, p in enumerate(pieces + [a + b for a, b in merges])}
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)
    rust = RustTokenizer(bpe)
    rust.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    # Llama 2's decoder: "▁" -> " ", <0xNN> -> bytes, join, strip the sequence's first space.
    rust.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=rust, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer = Tokenizer(hf)
    prompt = tokenizer.encode("The capital is", add_special_tokens=False)
    byte_tokens = tokenizer.encode("中😀", add_special_tokens=False)[1:]  # [1:]: drop its "▁"
    assert len(byte_tokens) == 7  # 3 + 4 UTF-8 bytes, one <0xNN> token each
    output = [vocab[p] for p in ["▁Pa", "ri", "s", "▁"]] + byte_tokens
    assert tokenizer.decode(output).startswith("Paris")  # plain decode drops the space
    deltas, tail, _ = stream(tokenizer, output, prompt)
    assert "".join(deltas) + tail == " Paris 中😀"
    assert not any("\ufffd" in d for d in deltas)
