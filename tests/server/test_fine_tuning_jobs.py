"""Fine-tuning jobs run end to end on a server of their own (tiny Llama, own store): a job goes
validating_files -> queued -> running -> succeeded with metrics events, a checkpoint per epoch
and a results file; its "auto" hyperparameters become numbers when its files are validated
(an event and a log line say so); its model is served at once as
``ft:<base>:<suffix>:<job id>`` next to the base, and again after a restart; a bad file fails
the job at once naming the line; a running job can be cancelled; a job the server stopped
resumes from its checkpoint, or restarts from step 1 without one, and says which."""

from __future__ import annotations

import json
import logging
import time

import openai
import pytest
from support.batching import batch_server

ROWS = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                      {"role": "assistant", "content": "Arr, matey!"}]} for i in range(12)]


def upload(client, rows, tmp_path, name="train.jsonl") -> str:
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="fine-tune").id


def wait_job(client, job_id, statuses, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in statuses:
        assert time.monotonic() < deadline, f"job still {job.status}"
        time.sleep(0.2)
    return job


HYPER = {"n_epochs": 2, "batch_size": 4, "lora_r": 4, "learning_rate": 1e-3, "max_seq_len": 64}
WORKER_LOG = "lmforge.jobs.fine_tuning_worker"


def messages_of(client, job_id) -> list[str]:
    """The job's event messages, oldest first."""
    return [e.message for e in reversed(client.fine_tuning.jobs.list_events(job_id,
                                                                            limit=1000).data)]


def test_a_job_trains_and_its_model_is_served_at_once_and_after_a_restart(tiny_llama_dir,
                                                                        tmp_path, caplog):
    home = tmp_path / "home"
    with batch_server(tiny_llama_dir, home) as client, caplog.at_level(logging.INFO, WORKER_LOG):
        base = client.model_name
        job = client.fine_tuning.jobs.create(model=base, training_file=upload(client, ROWS,
                                                                              tmp_path),
                                             suffix="pirate", seed=3,
                                             extra_body={"hyperparameters": HYPER})
        job = wait_job(client, job.id, {"succeeded", "failed", "cancelled"})
        assert job.status == "succeeded", job.error
        # given values kept; the multiplier is 1 beside a given learning_rate
        assert job.hyperparameters.model_dump() == {"n_epochs": 2, "batch_size": 4,
                                                    "learning_rate_multiplier": 1.0}
        resolved = ("Hyperparameters resolved: n_epochs=2, batch_size=4, "
                    "learning_rate_multiplier=1.0 (peak learning rate 0.001); 6 optimizer steps "
                    "on 11 training examples")  # 12 rows, 1 held out, 3 steps an epoch
        assert resolved in messages_of(client, job.id)
        assert f"fine-tuning job {job.id}: {resolved}" in caplog.messages
        assert job.fine_tuned_model == f"ft:{base}:pirate:{job.id}"
        assert job.trained_tokens > 0 and job.finished_at and len(job.result_files) == 1
        results = client.files.content(job.result_files[0]).read().decode().splitlines()
        assert results[0] == "step,epoch,train_loss,valid_loss,learning_rate" and len(results) > 2
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        messages = [e.message for e in reversed(events)]
        assert messages[0] == f"Created fine-tuning job: {job.id}"
        assert "Fine-tuning job started" in messages and messages[-1].startswith(
            "The job has successfully completed")
        metrics = [e for e in events if e.type == "metrics"]
        assert metrics and all({"step", "train_loss", "learning_rate"} <= set(e.data)
                               for e in metrics)
        checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
        assert len(checkpoints) == 2 and checkpoints[0].metrics.valid_loss is not None
        models = {m.id: m for m in client.models.list().data}
        assert models[job.fine_tuned_model].parent == base and models[base].parent is None
        for model in (job.fine_tuned_model, base):
            resp = client.chat.completions.create(model=model, max_tokens=4, messages=[
                {"role": "user", "content": "Question 99?"}])
            assert resp.model == model and resp.usage.completion_tokens >= 1
    with batch_server(tiny_llama_dir, home) as client:  # a restart: still served
        deadline = time.monotonic() + 10
        while job.fine_tuned_model not in {m.id for m in client.models.list().data}:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert client.chat.completions.create(model=job.fine_tuned_model, max_tokens=2, messages=[
            {"role": "user", "content": "hi"}]).choices
        # each checkpoint is a model too (OpenAI's), kept until the job's model is deleted
        names = [c.fine_tuned_model_checkpoint
                 for c in client.fine_tuning.jobs.checkpoints.list(job.id).data]
        assert names == [f"{job.fine_tuned_model}:ckpt-step-{s}" for s in (6, 3)]
        for name in names:
            assert client.completions.create(model=name, prompt="hi", max_tokens=2).model == name
        assert client.models.delete(job.fine_tuned_model).deleted
        assert {m.id for m in client.models.list().data} == {base}
        assert not (home / "fine_tunes" / job.id).exists()
    with batch_server(tiny_llama_dir, home) as client:  # deleted stays deleted
        time.sleep(1.5)  # the worker's first pass registers what is left
        assert {m.id for m in client.models.list().data} == {base}
        assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"


def test_a_bad_file_fails_at_once_and_a_running_job_cancels(tiny_llama_dir, tmp_path):
    with batch_server(tiny_llama_dir, tmp_path / "home") as client:
        rows = ROWS[:4] + [{"messages": [{"role": "user", "content": "no answer"}]}] + ROWS[5:]
        bad = client.fine_tuning.jobs.create(model=client.model_name,
                                             training_file=upload(client, rows, tmp_path))
        bad = wait_job(client, bad.id, {"failed"}, timeout_s=30)
        assert bad.error.code == "invalid_file" and bad.error.message.startswith("line 5: ")
        assert bad.error.param == "training_file"
        slow = client.fine_tuning.jobs.create(
            model=client.model_name, training_file=upload(client, ROWS * 20, tmp_path, "big.jsonl"),
            extra_body={"hyperparameters": HYPER | {"n_epochs": 20, "batch_size": 1}})
        wait_job(client, slow.id, {"running"}, timeout_s=60)
        assert client.fine_tuning.jobs.cancel(slow.id).status == "cancelled"
        time.sleep(2)  # the training thread stops at its next step
        job = client.fine_tuning.jobs.retrieve(slow.id)
        assert job.status == "cancelled" and job.fine_tuned_model is None
        assert len(client.models.list().data) == 1
        with pytest.raises(openai.ConflictError):
            client.fine_tuning.jobs.cancel(bad.id)


def test_a_job_running_when_the_server_stops_resumes_from_its_checkpoint(tiny_llama_dir,
                                                                         tmp_path, caplog):
    home = tmp_path / "home"
    with batch_server(tiny_llama_dir, home) as client:
        job = client.fine_tuning.jobs.create(
            model=client.model_name, training_file=upload(client, ROWS * 4, tmp_path),
            extra_body={"hyperparameters": HYPER | {"n_epochs": 4, "batch_size": 1}})
        deadline = time.monotonic() + 60
        while not client.fine_tuning.jobs.checkpoints.list(job.id).data:  # an epoch is done
            assert time.monotonic() < deadline
            time.sleep(0.1)
    # the server stopped mid-training (as after a crash, the job is still "running")
    with batch_server(tiny_llama_dir, home) as client, caplog.at_level(logging.INFO, WORKER_LOG):
        assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
        job = wait_job(client, job.id, {"succeeded", "failed", "cancelled"})
        assert job.status == "succeeded", job.error
        events = client.fine_tuning.jobs.list_events(job.id, limit=500).data
        resumes = [e for e in events if e.message.startswith("Resum")]
        assert len(resumes) == 1, [e.message for e in resumes]
        step, epoch = resumes[0].data["step"], resumes[0].data["epoch"]
        assert epoch >= 1 and step == 43 * epoch  # 48 rows, 5 held out: 43 steps an epoch
        assert resumes[0].message == f"Resuming from checkpoint-{step} (epoch {epoch}, step {step})"
        assert f"fine-tuning job {job.id}: {resumes[0].message}" in caplog.messages
        assert len(client.fine_tuning.jobs.checkpoints.list(job.id).data) >= 4  # one per epoch
        assert job.fine_tuned_model in {m.id for m in client.models.list().data}


def test_a_job_stopped_before_its_first_checkpoint_says_it_restarts_from_step_1(
        tiny_llama_dir, tmp_path, caplog):
    home = tmp_path / "home"
    with batch_server(tiny_llama_dir, home) as client:
        job = client.fine_tuning.jobs.create(  # 432 steps an epoch: stopped long before its end
            model=client.model_name, training_file=upload(client, ROWS * 40, tmp_path),
            extra_body={"hyperparameters": HYPER | {"n_epochs": 1, "batch_size": 1}})
        deadline = time.monotonic() + 60
        while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(
                job.id, limit=5).data):  # training has begun
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with batch_server(tiny_llama_dir, home) as client, caplog.at_level(logging.INFO, WORKER_LOG):
        restart = "Restarting from step 1: no checkpoint was saved before the server stopped"
        deadline = time.monotonic() + 60
        while restart not in (messages := messages_of(client, job.id)):
            assert time.monotonic() < deadline, messages[-5:]
            time.sleep(0.1)
        assert not client.fine_tuning.jobs.checkpoints.list(job.id).data
        assert not any(m.startswith("Resuming") for m in messages)
        assert f"fine-tuning job {job.id}: {restart}" in caplog.messages
        assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
