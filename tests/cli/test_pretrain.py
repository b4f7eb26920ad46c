"""``lmforge pretrain`` as a user runs it, in real subprocesses: ``kill -9`` and the same command
again continues the loss curve of an uninterrupted run; Ctrl-C saves a checkpoint and exits
cleanly; ``--train a b c`` takes every file; bad settings are usage errors."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from lmforge.cli import main
from lmforge.cli.pretrain import pretrain
from lmforge.training.corpora import shakespeare_texts

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--context", "32",
        "--batch-size", "4", "--vocab-size", "400", "--eval-interval", "50", "--dtype", "float32"]


@pytest.fixture(scope="module")
def plays():
    return [str(p) for p in shakespeare_texts()[:3]]


def command(plays, out, *extra):
    return [sys.executable, "-m", "lmforge.cli", "pretrain", "--train", *plays, "--out", str(out),
            *TINY, *extra]


def wait_for(predicate, proc, what, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"pretrain exited before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {what} in {timeout_s} s"
        time.sleep(0.02)


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_kill_9_then_the_same_command_continues_the_loss_curve(plays, tmp_path):
    steps = ["--max-steps", "300", "--checkpoint-interval", "20"]
    whole = subprocess.run(command(plays, tmp_path / "whole", *steps), capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(command(plays, out, *steps), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for(lambda: (out / "checkpoints" / "step-0000040.pt").exists(), proc, "checkpoint 40")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "config.json").exists()  # it died before it could export anything

    again = subprocess.run(command(plays, out, *steps), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming at step" in again.stderr
    assert "trained: 300 steps" in again.stdout
    np.testing.assert_allclose(losses(out), losses(tmp_path / "whole"), rtol=1e-5)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(plays, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(plays, out, "--max-steps", "100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 5, proc,
             "5 steps")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "interrupted:" in stdout
    step = int(stdout.split("interrupted: ")[1].split(" steps")[0])
    assert (out / "checkpoints" / f"step-{step:07d}.pt").exists()
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()


def test_train_and_valid_take_every_file_up_to_the_next_option():
    ctx = pretrain.make_context("pretrain", ["--train", "a.txt", "b.txt", "c.txt", "--valid",
                                             "v.txt", "w.txt", "--out", "o", "--n-layer", "2"])
    assert ctx.params["train"] == ("a.txt", "b.txt", "c.txt")
    assert ctx.params["valid"] == ("v.txt", "w.txt")
    assert ctx.params["out"] == "o" and ctx.params["n_layer"] == 2


def test_bad_settings_are_usage_errors(plays, tmp_path):
    result = CliRunner().invoke(main, ["pretrain", "--train", *plays, "--out",
                                       str(tmp_path / "o"), "--n-embd", "30", "--n-head", "4"])
    assert result.exit_code == 2 and "multiple of n_head" in result.output
    result = CliRunner().invoke(main, ["pretrain", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "at least one text file" in result.output


def test_a_yaml_config_gives_what_the_command_line_leaves_out(plays, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n" + "".join(f"  - {p}\n" for p in plays) +
                      "n-embd: 30\nn_head: 4\n")
    result = CliRunner().invoke(main, ["pretrain", "--config", str(config), "--out",
                                       str(tmp_path / "o")])
    assert result.exit_code == 2 and "n_embd (30) must be a multiple of n_head (4)" in result.output
