"""``lmforge tokenizer train`` on a real play: the directory it writes loads in transformers;
bad settings are a usage error (exit 2) naming the fix."""

from __future__ import annotations

from click.testing import CliRunner
from transformers import AutoTokenizer

from lmforge.cli import main
from lmforge.training.corpora import shakespeare_texts


def test_train_writes_a_tokenizer_transformers_loads(tmp_path):
    play = shakespeare_texts()[0]
    out = tmp_path / "tok"
    result = CliRunner().invoke(main, ["tokenizer", "train", str(play), "--out", str(out),
                                       "--vocab-size", "600"])
    assert result.exit_code == 0, result.output
    assert "600-token byte-level BPE vocabulary on 1 file(s)" in result.output
    assert len(AutoTokenizer.from_pretrained(out)) == 600


def test_a_vocabulary_too_small_is_a_usage_error(tmp_path):
    play = shakespeare_texts()[0]
    result = CliRunner().invoke(main, ["tokenizer", "train", str(play), "--out",
                                       str(tmp_path / "tok"), "--vocab-size", "100"])
    assert result.exit_code == 2 and "vocab_size must be at least 257" in result.output
