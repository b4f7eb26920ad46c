"""``/v1/fine_tuning/jobs`` through the ``openai`` SDK on the session server: create (checked at
once: base model, files, hyperparameters), list, retrieve, events, checkpoints, cancel; bad
requests are 4xx in the OpenAI envelope. (The session app runs no fine-tune worker, so a job
stays ``validating_files`` until cancelled.)"""

from __future__ import annotations

import json

import openai
import pytest

ROWS = [{"messages": [{"role": "user", "content": f"Say hi {i}"},
                      {"role": "assistant", "content": "Ahoy!"}]} for i in range(4)]


@pytest.fixture(scope="module")
def training_file(client, tmp_path_factory):
    path = tmp_path_factory.mktemp("ft") / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="fine-tune").id


def test_create_list_retrieve_events_cancel(client, model, training_file):
    job = client.fine_tuning.jobs.create(
        model=model, training_file=training_file, suffix="pirate", seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
        extra_body={"hyperparameters": {"lora_r": 4}}, metadata={"team": "x"})
    assert job.status == "validating_files" and job.id.startswith("ftjob-")
    assert (job.model, job.seed, job.training_file) == (model, 7, training_file)
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == "auto"
    assert job.metadata == {"team": "x"} and job.fine_tuned_model is None
    assert client.fine_tuning.jobs.retrieve(job.id).id == job.id
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=50).data]
    events = client.fine_tuning.jobs.list_events(job.id).data
    assert events[0].message == f"Created fine-tuning job: {job.id}"
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"  # idempotent
    assert client.fine_tuning.jobs.list_events(job.id).data[0].message == \
        "Fine-tuning job cancelled"


def test_a_seed_is_chosen_when_none_is_given(client, model, training_file):
    job = client.fine_tuning.jobs.create(model=model, training_file=training_file)
    assert isinstance(job.seed, int)
    client.fine_tuning.jobs.cancel(job.id)


BAD = [
    ({"model": "other"}, 400, "model"),
    ({"training_file": "file-none"}, 404, "training_file"),
    ({"validation_file": "file-none"}, 404, "validation_file"),
    ({"suffix": "has space"}, 400, "suffix"),
    ({"hyperparameters": {"n_epochs": 0}}, 400, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"lora_r": 0}}, 400, "hyperparameters.lora_r"),
    ({"hyperparameters": {"bogus": 1}}, 400, "hyperparameters.bogus"),
    ({"method": {"type": "reinforcement"}}, 400, "method.type"),
    ({"method": {"type": "dpo"}, "hyperparameters": {"n_epochs": 1}}, 400, "hyperparameters"),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, 400, "integrations"),
]


@pytest.mark.parametrize("extra,status,param", BAD)
def test_bad_job_requests(http, model, training_file, extra, status, param):
    body = {"model": model, "training_file": training_file} | extra
    resp = http.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param, resp.json()


def test_unknown_job_and_wrong_file_purpose(client, model, tmp_path):
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-none")
    path = tmp_path / "b.jsonl"
    path.write_text('{"a": 1}\n')
    with open(path, "rb") as f:
        batch_file = client.files.create(file=f, purpose="batch").id
    with pytest.raises(openai.BadRequestError, match="fine-tune"):
        client.fine_tuning.jobs.create(model=model, training_file=batch_file)


def test_a_csv_training_file_uploads_for_fine_tune(client, tmp_path):
    """LLM Engine's CSV (prompt, response) is accepted as a fine-tune file (the job checks it)."""
    path = tmp_path / "train.csv"
    path.write_text("prompt,response\n" + "".join(f"Say {i},Ahoy {i}\n" for i in range(10)))
    with open(path, "rb") as f:
        assert client.files.create(file=f, purpose="fine-tune").purpose == "fine-tune"
