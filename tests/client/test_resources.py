"""``lmforge.client``'s ``File``, ``Batch``, ``FineTune`` and ``Model`` against a server of their
own (tiny Llama, own store, batch and fine-tuning workers on) over real HTTP: a file's round
trip; a batch from a local path to its results; a fine-tuning job from LLM Engine's CSV with
LLM Engine's hyperparameter names through its statuses and events to a served model, which is
listed, completed with, downloaded as PEFT files and deleted; cancels; and the typed errors."""

from __future__ import annotations

import csv
import json

import pytest
from support.batching import batch_server, line

from lmforge.client import (
    BadRequestError,
    Batch,
    BatchJobStatus,
    BatchStatus,
    Completion,
    ConflictError,
    File,
    FineTune,
    Model,
    NotFoundError,
    TimeoutError,
    configure,
)

# trains in a few seconds on the tiny model (as test_fine_tuning_jobs.py)
HYPER = {"epochs": "2", "lr": "1e-3", "batch_size": 4, "lora_r": 4, "max_seq_len": 64}


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    with batch_server(tiny_llama_dir, tmp_path_factory.mktemp("client_home")) as client:
        configure(base_url=str(client.base_url))
        yield client
        configure()


@pytest.fixture(scope="module")
def training_csv(tmp_path_factory):
    """LLM Engine's format: a CSV with ``prompt`` and ``response`` columns."""
    path = tmp_path_factory.mktemp("data") / "pirate.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "response"])
        writer.writerows([(f"Question {i}?", "Arr, matey!") for i in range(12)])
    return path


def test_a_file_round_trip(server, tmp_path):
    data = "".join(json.dumps({"prompt": f"p{i}", "completion": "c"}) + "\n" for i in range(20))
    path = tmp_path / "rows.jsonl"
    path.write_text(data)
    uploaded = File.upload(path)
    assert uploaded.size == len(data) and uploaded.filename == "rows.jsonl"
    assert uploaded.purpose == "fine-tune"
    with open(path, "rb") as f:  # an open file works as well as a path
        second = File.upload(f, purpose="user_data")
    with open(path, "r") as f:  # in text mode too, as LLM Engine's reference opens it
        text_mode = File.upload(f, purpose="user_data")
    assert File.download(text_mode.id).content == data and text_mode.filename == "rows.jsonl"
    File.delete(text_mode.id)
    assert File.get(uploaded.id).model_dump() == uploaded.model_dump()
    assert [f.id for f in File.list().files][:2] == [second.id, uploaded.id]  # newest first
    assert second.id not in {f.id for f in File.list(purpose="fine-tune").files}
    assert File.download(uploaded.id).content == data
    assert b"".join(File.iter_content(uploaded.id)).decode() == data
    assert File.download_to(uploaded.id, tmp_path / "copy.jsonl").read_text() == data
    deleted = File.delete(uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id
    with pytest.raises(NotFoundError):
        File.get(uploaded.id)
    with pytest.raises(NotFoundError):
        File.download_to(uploaded.id, tmp_path / "gone.jsonl")
    assert not (tmp_path / "gone.jsonl").exists() and not (tmp_path / "gone.jsonl.part").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"custom_id": "a"}\nnot json\n')
    with pytest.raises(BadRequestError, match="Line 2"):
        File.upload(bad, purpose="batch")


def test_a_batch_from_a_local_file_to_its_results(server, tmp_path):
    body = {"model": server.model_name, "prompt": "Hello", "max_tokens": 3, "temperature": 0}
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(line(f"r{i}", body, "/v1/completions") for i in range(3)) + "\n")
    batch = Batch.create(path, endpoint="/v1/completions", metadata={"run": "client-test"})
    assert batch.metadata == {"run": "client-test"} and batch.endpoint == "/v1/completions"
    seen = []
    done = Batch.wait(batch.id, poll_interval=0.1, on_update=seen.append)
    assert done.status is BatchStatus.COMPLETED and seen[-1] == done
    assert (done.request_counts.total, done.request_counts.completed) == (3, 3)
    records = [json.loads(x) for x in File.download(done.output_file_id).content.splitlines()]
    expected = Completion.create(server.model_name, "Hello", max_new_tokens=3, temperature=0)
    assert [r["custom_id"] for r in records] == ["r0", "r1", "r2"]
    assert {r["response"]["body"]["choices"][0]["text"] for r in records} == {
        expected.output.text}
    assert done.id in {b.id for b in Batch.list().batches}
    with pytest.raises(ConflictError):
        Batch.cancel(done.id)
    with pytest.raises(NotFoundError):
        Batch.get("batch_nope")
    with pytest.raises(FileNotFoundError):
        Batch.create(tmp_path / "missing.jsonl")


def test_a_fine_tune_from_llm_engine_csv_to_a_served_model(server, training_csv, tmp_path):
    job = FineTune.create(model=server.model_name, training_file=str(training_csv),
                          hyperparameters=HYPER, suffix="pirate", seed=3)
    assert job.status is BatchJobStatus.PENDING and job.server_status == "validating_files"
    assert job.hyperparameters["n_epochs"] == 2 and job.seed == 3
    events = []
    done = FineTune.wait(job.id, poll_interval=0.2, on_event=events.append)
    assert done.status is BatchJobStatus.SUCCESS and done.server_status == "succeeded"
    name = f"ft:{server.model_name}:pirate:{job.id}"
    assert done.fine_tuned_model == name and FineTune.get(job.id).model_dump() == done.model_dump()
    # every event once, oldest first, the same as get_events
    listed = FineTune.get_events(job.id).events
    assert [e.id for e in listed] == [e.id for e in events]
    assert [e.timestamp for e in listed] == sorted(e.timestamp for e in listed)
    assert listed[0].message.startswith("Created fine-tuning job") and listed[-1].level == "info"
    assert any(e.type == "metrics" and "train_loss" in e.data for e in listed)
    assert job.id in {j.id for j in FineTune.list().jobs}
    cancelled = FineTune.cancel(job.id)  # it already succeeded
    assert not cancelled.success and cancelled.job.status is BatchJobStatus.SUCCESS

    assert Completion.create(name, "Question 3?", max_new_tokens=4).output.num_completion_tokens
    models = {m.name: m for m in Model.list().model_endpoints}
    assert not models[server.model_name].fine_tuned
    assert models[name].fine_tuned and models[name].model_name == server.model_name
    assert Model.get(name).model_dump() == models[name].model_dump()

    download = Model.download(name, output_dir=tmp_path / "adapter")
    assert download.urls["adapter.zip"].endswith("/adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert set(download.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert Model.download(name).files is None
    with pytest.raises(NotFoundError, match="base model"):
        Model.download(server.model_name)
    with pytest.raises(ValueError, match="download_format"):
        Model.download(name, download_format="gguf")

    assert Model.delete(name).deleted
    with pytest.raises(NotFoundError):
        Model.get(name)
    with pytest.raises(BadRequestError):
        Model.delete(server.model_name)


def test_cancel_timeout_and_refusals_of_fine_tunes(server, training_csv):
    job = FineTune.create(server.model_name, str(training_csv),
                          hyperparameters={**HYPER, "epochs": 20})
    with pytest.raises(TimeoutError, match="keeps running"):
        FineTune.wait(job.id, poll_interval=0.05, timeout=0)
    cancelled = FineTune.cancel(job.id)
    assert cancelled.success
    assert FineTune.wait(job.id, poll_interval=0.1).status is BatchJobStatus.CANCELLED
    assert FineTune.cancel(job.id).success  # cancelling twice is fine

    with pytest.raises(FileNotFoundError):
        FineTune.create(server.model_name, "no/such/train.jsonl")
    with pytest.raises(NotFoundError):
        FineTune.create(server.model_name, "file-nope")
    with pytest.raises(BadRequestError) as caught:
        FineTune.create("not-served", str(training_csv))
    assert caught.value.param == "model"
    with pytest.raises(BadRequestError) as caught:
        FineTune.create(server.model_name, str(training_csv), hyperparameters={"epochs": 99})
    assert caught.value.param == "hyperparameters.n_epochs"
    with pytest.raises(NotFoundError):
        FineTune.get("ftjob-nope")
