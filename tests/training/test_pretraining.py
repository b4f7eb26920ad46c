"""The parts of a pretraining run (``lmforge/training/pretraining``): settings from YAML and
keywords, the schedule, the token file and its windows, the run directory's claim, checkpoints,
and a short run that resumes where an uninterrupted one would be."""

import json

import numpy as np
import pytest
import torch

from lmforge.errors import InvalidRequestError
from lmforge.training import PretrainConfig, pretrain
from lmforge.training.corpora import shakespeare_texts
from lmforge.training.pretraining.checkpoint import KEEP, RunState, latest_checkpoint, \
    save_checkpoint
from lmforge.training.pretraining import run as run_module
from lmforge.training.pretraining.prepare import claim_run_dir, learning_rate
from lmforge.training.pretraining.tokens import TokenStream, tokenize_corpus, \
    unigram_cross_entropy

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "context": 32, "batch_size": 4,
        "vocab_size": 400, "eval_windows": 8}


@pytest.fixture(scope="module")
def plays():
    return [str(p) for p in shakespeare_texts()[:3]]


def test_settings_come_from_yaml_then_keywords(tmp_path, plays):
    path = tmp_path / "run.yaml"
    path.write_text(f"train: {plays[0]}\nout: {tmp_path / 'o'}\nn-layer: 6\nlearning_rate: 3e-4\n")
    config = PretrainConfig.from_sources(path, n_layer=2, max_steps=None)
    assert config.train == [plays[0]] and config.n_layer == 2
    assert config.learning_rate == pytest.approx(3e-4)


@pytest.mark.parametrize("settings,param", [
    ({"n_embd": 30, "n_head": 4}, "n_embd"), ({"arch": "gpt3"}, "arch"),
    ({"context": 0}, "context"), ({"dropout": 1.0}, "dropout"), ({"max_minutes": 0}, "max_minutes"),
    ({"train": ["/no/such.txt"]}, "train"), ({"dtype": "float16"}, "dtype"),
])
def test_bad_settings_name_their_parameter(tmp_path, plays, settings, param):
    with pytest.raises(InvalidRequestError) as e:
        PretrainConfig.from_sources(**{"train": plays, "out": str(tmp_path), **settings})
    assert e.value.param == param


def test_unknown_yaml_keys_are_refused(tmp_path, plays):
    path = tmp_path / "run.yaml"
    path.write_text("n_layers: 6\n")
    with pytest.raises(InvalidRequestError, match="n_layers"):
        PretrainConfig.from_sources(path, train=plays, out=str(tmp_path / "o"))


def test_schedule_warms_up_then_decays_to_the_floor():
    config = PretrainConfig(learning_rate=1e-3, warmup_steps=100, min_lr_ratio=0.1)
    rates = [learning_rate(config, step, 500) for step in range(1, 501)]
    assert rates[0] == pytest.approx(2e-5) and rates[49] == pytest.approx(1e-3)  # warmup 50
    assert max(rates) == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(rates[50:], rates[51:]))
    assert learning_rate(config, 10, None) == pytest.approx(1e-4)  # horizon unknown: warmup


def test_tokens_are_written_once_and_windows_are_reproducible(tmp_path, plays):
    from transformers import AutoTokenizer

    from lmforge.training.bpe import train_bpe_tokenizer
    train_bpe_tokenizer(plays, tmp_path / "tok", vocab_size=400, show_progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    path = tmp_path / "train.bin"
    tokens = tokenize_corpus(plays, tokenizer, 0, path, show_progress=False)
    stamp = path.stat().st_mtime_ns
    again = tokenize_corpus(plays, tokenizer, 0, path, show_progress=False)
    assert path.stat().st_mtime_ns == stamp and np.array_equal(tokens, again)
    assert tokens.dtype == np.uint16 and (tokens == 0).sum() == len(plays)  # one eot per file
    text = open(plays[0], encoding="utf-8").read()
    assert tokenizer.decode(tokens[:50].tolist()) == tokenizer.decode(tokenizer(text).input_ids[:50])
    stream = TokenStream(tokens, 16)
    x, y = stream.batch(4, seed=1, step=7)
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(stream.batch(4, seed=1, step=7)[0], x)
    assert not torch.equal(stream.batch(4, seed=1, step=8)[0], x)
    first = stream.eval_batches(10, 4)
    assert [b[0].shape[0] for b in first] == [4, 4, 2]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, stream.eval_batches(10, 4)))


def test_unigram_cross_entropy_is_the_entropy_of_a_matching_distribution():
    tokens = np.repeat(np.arange(4), 1000)
    assert unigram_cross_entropy(tokens, tokens, 4) == pytest.approx(np.log(4), rel=1e-3)


def test_a_run_directory_is_claimed_and_never_taken_over(tmp_path, plays):
    config = PretrainConfig(train=plays, out=str(tmp_path / "run"))
    claim_run_dir(config)
    claim_run_dir(config)  # the same run: resumes
    with pytest.raises(InvalidRequestError, match="n_layer"):
        claim_run_dir(PretrainConfig(train=plays, out=str(tmp_path / "run"), n_layer=9))
    other = tmp_path / "model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(InvalidRequestError, match="not empty"):
        claim_run_dir(PretrainConfig(train=plays, out=str(other)))


def test_checkpoints_keep_the_newest(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, model, opt, RunState(step=step))
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert len(kept) == KEEP and latest_checkpoint(tmp_path).name == "step-0000040.pt"


def test_an_interrupted_run_resumes_on_the_uninterrupted_loss_curve(tmp_path, plays,
                                                                    monkeypatch):
    """A run stopped after step 6 as Ctrl-C stops it, then run again to 12, has the losses of
    one run to 12: the data, dropout masks and state after a checkpoint are the same."""
    settings = {**TINY, "train": plays, "max_steps": 12, "checkpoint_interval": 5,
                "eval_interval": 4, "dropout": 0.1, "show_progress": False}
    whole = pretrain(out=str(tmp_path / "whole"), **settings)
    after_step = run_module._Run._after_step

    def stop_at_6(self, *args):  # what the first Ctrl-C does: finish the step, then stop
        after_step(self, *args)
        self.stop_requested = self.state.step == 6
    monkeypatch.setattr(run_module._Run, "_after_step", stop_at_6)
    first = pretrain(out=str(tmp_path / "split"), **settings)
    assert first.interrupted and first.steps == 6 and first.resumed_from is None
    assert latest_checkpoint(tmp_path / "split").name == "step-0000006.pt"  # saved on the stop
    monkeypatch.undo()
    second = pretrain(out=str(tmp_path / "split"), **settings)
    assert second.resumed_from == 6 and second.steps == 12 and not second.interrupted
    losses = [_losses(tmp_path / name) for name in ("whole", "split")]
    assert len(losses[0]) == len(losses[1]) == 12
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    assert second.val_loss == pytest.approx(whole.val_loss, rel=1e-5)


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_a_given_tokenizer_is_used_and_saved_with_the_model(tmp_path, plays):
    from transformers import AutoTokenizer

    from lmforge.training.bpe import train_bpe_tokenizer
    train_bpe_tokenizer(plays, tmp_path / "tok", vocab_size=300, show_progress=False)
    settings = {**TINY, "vocab_size": 999}  # ignored: the tokenizer is given
    result = pretrain(train=plays, out=str(tmp_path / "run"), tokenizer=str(tmp_path / "tok"),
                      max_steps=2, show_progress=False, **settings)
    assert len(AutoTokenizer.from_pretrained(result.out)) == 300
    assert json.loads((result.out / "config.json").read_text())["vocab_size"] == 300
