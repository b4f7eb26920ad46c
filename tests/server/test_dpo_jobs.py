"""DPO fine-tuning jobs through /v1/fine_tuning/jobs on the tiny Llama, as the ``openai`` SDK
sends them (``method={"type": "dpo", ...}``): the job echoes its method with the numbers used,
its metrics events carry TRL's reward metrics per step and on the validation set per epoch, the
reference log-probs are computed once before training, the result is served; bad preference
rows fail the job in validating_files naming the line; a ``lmforge serve`` killed with SIGKILL
mid-training resumes the job without computing the reference log-probs again."""

from __future__ import annotations

import json
import math
import os
import signal
import time

import openai
import pytest
from support.batching import batch_server
from support.serve_process import LmforgeServe, free_port

DPO_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected"}
HYPER = {"n_epochs": 2, "batch_size": 2, "beta": 0.2, "lora_r": 4, "learning_rate": 1e-3,
         "max_seq_len": 64}


def pair(i: int) -> dict:
    return {"input": {"messages": [{"role": "user", "content": f"Question {i}?"}]},
            "preferred_output": [{"role": "assistant", "content": "Yes."}],
            "non_preferred_output": [{"role": "assistant", "content": "No, not at all."}]}


def upload(client, rows, tmp_path, name="prefs.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="fine-tune").id


def wait_job(client, job_id, statuses=("succeeded", "failed", "cancelled"), timeout_s=180.0):
    deadline = time.monotonic() + timeout_s
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in statuses:
        assert time.monotonic() < deadline, f"job still {job.status}"
        time.sleep(0.2)
    return job


def events_of(client, job_id):
    """The job's events, oldest first."""
    return list(reversed(client.fine_tuning.jobs.list_events(job_id, limit=1000).data))


def dpo(hyperparameters: dict) -> dict:
    return {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}


def test_a_dpo_job_reports_trl_metrics_and_its_model_is_served(tiny_llama_dir, tmp_path):
    with batch_server(tiny_llama_dir, tmp_path / "home") as client:
        base = client.model_name
        job = client.fine_tuning.jobs.create(
            model=base, training_file=upload(client, [pair(i) for i in range(12)], tmp_path),
            suffix="prefs", seed=1, method=dpo(HYPER))
        assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
        job = wait_job(client, job.id)
        assert job.status == "succeeded", job.error
        assert job.method.model_dump(exclude_none=True) == dpo(
            {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 1.0, "beta": 0.2})
        events = events_of(client, job.id)
        messages = [e.message for e in events]
        assert "Hyperparameters resolved: n_epochs=2, batch_size=2, learning_rate_multiplier=1.0, "\
               "beta=0.2 (peak learning rate 0.001); 12 optimizer steps on 11 training examples" \
               in messages
        computed = [m for m in messages if m.startswith("Reference log-probs of ")]
        assert len(computed) == 2 and computed[0].startswith("Reference log-probs of 11 pairs "
                                                             "computed in ")  # 1 held out
        metrics = [e.data for e in events if e.type == "metrics"]
        assert len(metrics) == 12 and all(DPO_METRICS <= set(m) for m in metrics)
        # at step 0 the DPO part is log 2 (policy == reference), plus RPO's 0.2 * chosen NLL
        assert metrics[0]["train_loss"] == pytest.approx(
            math.log(2) + 0.2 * metrics[0]["nll_loss"], abs=1e-4)
        assert metrics[0]["rewards/margins"] == pytest.approx(0, abs=1e-3)
        epoch_ends = [m for m in metrics if "eval_loss" in m]
        assert [m["step"] for m in epoch_ends] == [6, 12]
        assert all({f"eval_{k}" for k in DPO_METRICS} <= set(m) for m in epoch_ends)
        assert metrics[-1]["rewards/margins"] > 0 and metrics[-1]["eval_rewards/accuracies"] == 1
        checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
        assert len(checkpoints) == 2
        assert checkpoints[0].metrics.model_extra["eval_rewards/accuracies"] == 1
        header = client.files.content(job.result_files[0]).read().decode().splitlines()[0]
        assert header.startswith("step,epoch,train_loss,valid_loss,learning_rate,rewards/chosen")
        assert job.fine_tuned_model == f"ft:{base}:prefs:{job.id}"
        served = {m.id for m in client.models.list().data}
        assert {c.fine_tuned_model_checkpoint for c in checkpoints} == {
            f"{job.fine_tuned_model}:ckpt-step-{s}" for s in (6, 12)} < served
        first = checkpoints[-1].fine_tuned_model_checkpoint  # newest first: step 6
        assert client.models.delete(first).deleted  # a checkpoint alone
        assert first not in {m.id for m in client.models.list().data}
        answer = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=3,
                                                temperature=0, messages=[
                                                    {"role": "user", "content": "Question 99?"}])
        assert answer.model == job.fine_tuned_model and answer.usage.completion_tokens >= 1
        supervised = client.fine_tuning.jobs.retrieve(client.fine_tuning.jobs.create(
            model=base, training_file=job.training_file, method={"type": "supervised"}).id)
        assert supervised.method.type == "supervised"
        assert supervised.method.supervised.hyperparameters.n_epochs == "auto"


@pytest.mark.parametrize("row, reason", [
    ({"input": {"messages": [{"role": "user", "content": "Hi"}]},
      "preferred_output": [{"role": "assistant", "content": "Same."}],
      "non_preferred_output": [{"role": "assistant", "content": "Same."}]}, "identical"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A"}]},
     "expected 'input', 'preferred_output'"),
    ({"prompt": "Hi", "chosen": "A", "rejected": "B"}, "one format per file"),
])
def test_a_bad_preference_row_fails_the_job_in_validating_files(tiny_llama_dir, tmp_path, row,
                                                               reason):
    with batch_server(tiny_llama_dir, tmp_path / "home") as client:
        rows = [pair(i) for i in range(6)] + [row] + [pair(i) for i in range(6, 12)]
        job = client.fine_tuning.jobs.create(model=client.model_name,
                                             training_file=upload(client, rows, tmp_path),
                                             method=dpo({}))
        job = wait_job(client, job.id, ("failed", "succeeded", "running"), timeout_s=60)
        assert job.status == "failed" and job.error.code == "invalid_file"
        assert job.error.message.startswith("line 7: ") and reason in job.error.message
        assert job.error.param == "training_file"


def test_dpo_requests_the_api_refuses(client, model, tmp_path):
    file_id = upload(client, [pair(i) for i in range(12)], tmp_path)
    for body, param in (
            ({"method": dpo({}), "hyperparameters": {"n_epochs": 1}}, "hyperparameters"),
            ({"method": {"type": "dpo", "supervised": {}}}, "method.supervised"),
            ({"method": dpo({"beta": 0})}, "method.dpo.hyperparameters.beta"),
            ({"method": dpo({"loss_type": "kto"})}, None),
            ({"method": {"type": "reinforcement"}}, None)):
        with pytest.raises(openai.BadRequestError) as info:
            client.fine_tuning.jobs.create(model=model, training_file=file_id,
                                           extra_body=body)
        if param is not None:
            assert info.value.body["param"] == param, info.value.body


def test_a_killed_server_resumes_a_dpo_job_without_recomputing_reference_logps(tiny_llama_dir,
                                                                               tmp_path):
    home, port = tmp_path / "home", free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--model", str(tiny_llama_dir), "--port", str(port)]
    server = LmforgeServe(args, home)
    try:
        server.wait(url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)
        job = client.fine_tuning.jobs.create(
            model=client.models.list().data[0].id,
            training_file=upload(client, [pair(i) for i in range(40)], tmp_path), seed=2,
            method=dpo(HYPER | {"n_epochs": 3, "batch_size": 1}))
        deadline = time.monotonic() + 120
        while not client.fine_tuning.jobs.checkpoints.list(job.id).data:  # epoch 1 is done
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=30)
    finally:
        server.terminate()
    server = LmforgeServe(args, home)
    try:
        server.wait(url)
        job = wait_job(client, job.id)
        assert job.status == "succeeded", job.error
        messages = [e.message for e in events_of(client, job.id)]
        computed = [m for m in messages if " computed in " in m]
        read = [m for m in messages if m.startswith("Reference log-probs of ")
                and "read from" in m]
        assert len(computed) == 2 and len(read) == 2, messages  # train and valid, once each
        assert read[0] == ("Reference log-probs of 36 pairs read from train.pt (computed "
                           "before a restart, not again)")
        assert any(m.startswith("Resuming from checkpoint-36 ") for m in messages)
    finally:
        server.terminate()


def test_dpo_on_a_fine_tuned_model_uses_it_as_the_reference(tiny_llama_dir, tmp_path):
    """OpenAI's SFT then DPO: a DPO job whose ``model`` is an ``ft:`` model starts from it (its
    step-0 log-probs are the SFT model's, not the base's, with zero margins: the reference is
    the SFT model) and serves the two adapters stacked as one model of the base."""
    sft_rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                              {"role": "assistant", "content": "Yes."}]} for i in range(12)]
    with batch_server(tiny_llama_dir, tmp_path / "home") as client:
        base = client.model_name
        sft = wait_job(client, client.fine_tuning.jobs.create(
            model=base, training_file=upload(client, sft_rows, tmp_path, "sft.jsonl"),
            suffix="sft", seed=1, extra_body={"hyperparameters": {
                k: HYPER[k] for k in ("n_epochs", "batch_size", "lora_r", "learning_rate",
                                      "max_seq_len")}}).id)
        assert sft.status == "succeeded", sft.error
        prefs = upload(client, [pair(i) for i in range(12)], tmp_path)
        jobs = {name: client.fine_tuning.jobs.create(model=model, training_file=prefs,
                                                     suffix=name, seed=1, method=dpo(HYPER))
                for name, model in (("on-sft", sft.fine_tuned_model), ("on-base", base))}
        done = {name: wait_job(client, job.id) for name, job in jobs.items()}
        assert all(j.status == "succeeded" for j in done.values()), done
        on_sft = done["on-sft"]
        assert on_sft.model == sft.fine_tuned_model
        assert on_sft.fine_tuned_model == f"ft:{base}:on-sft:{on_sft.id}"
        first = {name: next(e.data for e in events_of(client, j.id) if e.type == "metrics")
                 for name, j in done.items()}
        assert first["on-sft"]["rewards/margins"] == pytest.approx(0, abs=1e-3)
        # the SFT model already says "Yes.": its chosen answers are likelier than the base's
        assert first["on-sft"]["logps/chosen"] > first["on-base"]["logps/chosen"] + 1
        served = {m.id: m for m in client.models.list().data}
        assert served[on_sft.fine_tuned_model].parent == base
        for checkpoint in client.fine_tuning.jobs.checkpoints.list(on_sft.id).data:
            assert checkpoint.fine_tuned_model_checkpoint in served
        answer = client.completions.create(model=on_sft.fine_tuned_model, prompt="Question 1?",
                                           max_tokens=2, temperature=0)
        assert answer.model == on_sft.fine_tuned_model
        with pytest.raises(openai.BadRequestError) as info:
            client.fine_tuning.jobs.create(model=f"ft:{base}:nope:ftjob-x", training_file=prefs,
                                           method=dpo({}))
        assert info.value.body["param"] == "model"
