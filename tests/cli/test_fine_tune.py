"""``lmforge fine-tune ...`` against a server of its own (tiny Llama, own store) that trains
jobs: create with a local file and --follow ends with the succeeded job (the client's object,
``status`` in LLM Engine's words) on stdout and the events and a loss bar on stderr; get, list
and events print what the server holds, as tables, lines or ``--json``; cancelling a finished job
exits 1; a bad training file ends --follow with exit 1 naming the line."""

from __future__ import annotations

import json

import pytest
from support.batching import batch_server
from click.testing import CliRunner

from lmforge.cli import main

ROWS = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                      {"role": "assistant", "content": "Arr, matey!"}]} for i in range(12)]
# trains in a few seconds on the tiny model (as test_fine_tuning_jobs.py)
HYPER = ["--n-epochs", "2", "--batch-size", "4", "--lora-r", "4", "--learning-rate", "1e-3",
         "--max-seq-len", "64"]


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    with batch_server(tiny_llama_dir, tmp_path_factory.mktemp("ft_cli_home")) as client:
        yield client


def run(server, *args):
    env = {"LMFORGE_BASE_URL": str(server.base_url)}
    return CliRunner().invoke(main, ["fine-tune", *map(str, args)], env=env,
                              catch_exceptions=False)


def write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_create_follow_get_list_events_cancel(server, tmp_path):
    created = run(server, "create", "--model", server.model_name, "--training",
                  write(tmp_path, "train.jsonl", ROWS), "--validation",
                  write(tmp_path, "val.jsonl", ROWS[2:]), "--suffix", "pirate", "--seed", 3,
                  *HYPER, "--follow", "--poll", "0.1", "--json")
    assert created.exit_code == 0, created.output
    job = json.loads(created.stdout)  # stdout: the final job only
    assert job["status"] == "SUCCESS" and job["server_status"] == "succeeded"
    assert job["seed"] == 3
    assert job["fine_tuned_model"] == f"ft:{server.model_name}:pirate:{job['id']}"
    # resolved when the files were validated: 1 beside the given --learning-rate
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 4,
                                      "learning_rate_multiplier": 1.0}
    assert job["validation_file"] and job["training_file"] != job["validation_file"]
    assert f"Created fine-tuning job: {job['id']}" in created.stderr
    assert "Fine-tuning job started" in created.stderr
    assert "train_loss=" in created.stderr and "eval_loss=" in created.stderr  # the loss bar
    assert "Step 1: training loss" not in created.stderr  # metrics feed the bar, not lines

    assert json.loads(run(server, "get", job["id"], "--json").stdout) == job
    shown = [line.split() for line in run(server, "get", job["id"]).stdout.splitlines()]
    assert ["status", "SUCCESS"] in shown and ["server_status", "succeeded"] in shown
    listed = json.loads(run(server, "list", "--limit", 5, "--json").stdout)
    assert job["id"] in [j["id"] for j in listed]
    table = [line.split() for line in run(server, "list").stdout.splitlines()]
    assert [job["id"], "SUCCESS", server.model_name, job["fine_tuned_model"]] in [
        r[:4] for r in table]

    lines = run(server, "events", job["id"], "--limit", 1000).stdout.splitlines()
    assert lines[0].endswith(f" info  Created fine-tuning job: {job['id']}")  # oldest first
    assert "The job has successfully completed" in lines[-1]
    assert any(" info  Step 1: training loss=" in x for x in lines)
    assert len(run(server, "events", job["id"], "--limit", 2).stdout.splitlines()) == 2
    events = json.loads(run(server, "events", job["id"], "--limit", 2, "--json").stdout)
    assert [e["message"] for e in events] == [x.split(None, 3)[3] for x in lines[-2:]]
    followed = run(server, "events", job["id"], "--follow", "--poll", "0.1", "--json")
    assert followed.exit_code == 0 and json.loads(followed.stdout) == job

    refused = run(server, "cancel", job["id"])
    assert refused.exit_code == 1
    assert refused.stderr == f"Error: fine-tuning job {job['id']} already succeeded; nothing " \
                             "to cancel\n"
    missing = run(server, "get", "ftjob-nope")
    assert missing.exit_code == 1 and "ftjob-nope" in missing.stderr
    assert "HTTP 404" in missing.stderr and "See `lmforge fine-tune list`" in missing.stderr
    both = run(server, "create", "--model", "m", "--training-file", "file-x", "--training",
               tmp_path / "train.jsonl")
    assert both.exit_code == 2 and "exactly one" in both.output


def test_a_bad_training_file_ends_follow_with_exit_1_naming_the_line(server, tmp_path):
    rows = ROWS[:4] + [{"messages": [{"role": "user", "content": "no answer"}]}] + ROWS[5:]
    result = run(server, "create", "--training", write(tmp_path, "bad.jsonl", rows), *HYPER,
                 "--follow", "--poll", "0.1", "--json")  # --model: the server's base model
    assert result.exit_code == 1
    job = json.loads(result.stdout)
    assert job["status"] == "FAILURE" and job["model"] == server.model_name
    assert job["error"]["message"].startswith("line 5: ")
    assert f"Error: fine-tuning job {job['id']} failed: line 5: " in result.stderr


def test_create_a_dpo_job_and_follow_its_reward_accuracy(server, tmp_path):
    pairs = [{"prompt": f"Question {i}?", "chosen": " Yes.", "rejected": " No, never."}
             for i in range(12)]
    created = run(server, "create", "--model", server.model_name, "--method", "dpo", "--beta",
                  "0.2", "--training", write(tmp_path, "prefs.jsonl", pairs), *HYPER,
                  "--follow", "--poll", "0.1", "--json")
    assert created.exit_code == 0, created.output
    job = json.loads(created.stdout)
    assert job["status"] == "SUCCESS" and job["method"]["type"] == "dpo"
    assert job["method"]["dpo"]["hyperparameters"]["beta"] == 0.2
    assert "reward_acc=" in created.stderr and "train_loss=" in created.stderr
    assert "Reference log-probs of 11 pairs computed" in created.stderr
    plain = CliRunner().invoke(main, ["fine-tune", "create", "--training-file", "file-x",
                                      "--beta", "0.1"])
    assert plain.exit_code == 2 and "--method dpo" in plain.output
