"""Fine-tuning job rows (``jobs/fine_tuning_store.py``, store migration 2) and the job request schema:
statuses only move forward, events and checkpoints page newest first, hyperparameters from both
places merge with range errors naming the field."""

from __future__ import annotations

import pytest

from lmforge.errors import InvalidRequestError
from lmforge.jobs.fine_tuning_store import FineTuningStore
from lmforge.jobs.store import Store
from lmforge.protocol.fine_tuning import FineTuningJobCreate
from lmforge.protocol.statuses import FineTuningStatus


@pytest.fixture
def jobs(tmp_path):
    store = Store(home=tmp_path)
    yield FineTuningStore(store)
    store.close()


def new_job(jobs: FineTuningStore, **kw):
    return jobs.add_job("base", "file-t", None, "mine", 42, {"n_epochs": 2}, None, None, **kw)


def test_job_statuses_only_move_forward_and_final_ones_stamp_finished_at(jobs):
    job = new_job(jobs)
    assert (job.status, job.hyperparameters, job.finished_at) == (
        FineTuningStatus.VALIDATING_FILES, {"n_epochs": 2}, None)
    assert not jobs.transition(job.id, FineTuningStatus.RUNNING)  # must be queued first
    assert jobs.transition(job.id, FineTuningStatus.QUEUED)
    assert jobs.transition(job.id, FineTuningStatus.RUNNING)
    assert jobs.transition(job.id, FineTuningStatus.SUCCEEDED, fine_tuned_model="ft:base:mine:x",
                           trained_tokens=123, result_files=["file-r"])
    assert not jobs.transition(job.id, FineTuningStatus.CANCELLED)  # finished
    done = jobs.get_job(job.id)
    assert (done.status, done.fine_tuned_model, done.trained_tokens, done.result_files) == (
        FineTuningStatus.SUCCEEDED, "ft:base:mine:x", 123, ["file-r"])
    assert done.status is FineTuningStatus.SUCCEEDED  # read back as the enum, not a plain str
    assert done.finished_at is not None and jobs.unfinished_jobs() == []
    other = new_job(jobs)
    assert jobs.transition(other.id, FineTuningStatus.FAILED,
                           error={"code": "invalid_file", "message": "m"})
    assert jobs.get_job(other.id).error == {"code": "invalid_file", "message": "m"}
    listed, more = jobs.list_jobs(limit=1)
    assert [j.id for j in listed] == [other.id] and more


def test_events_and_checkpoints_page_newest_first(jobs):
    job = new_job(jobs)
    for step in range(5):
        jobs.add_event(job.id, f"step {step}", type="metrics", data={"step": step})
    page, more = jobs.list_events(job.id, limit=3)
    assert [e.data["step"] for e in page] == [4, 3, 2] and more
    page, more = jobs.list_events(job.id, limit=3, after=page[-1].id)
    assert [e.data["step"] for e in page] == [1, 0] and not more
    jobs.add_checkpoint(job.id, 10, {"valid_loss": 1.5}, "/x/10")
    jobs.add_checkpoint(job.id, 20, {"valid_loss": 1.2}, "/x/20")
    checkpoints, _ = jobs.list_checkpoints(job.id)
    assert [(c.step_number, c.metrics["valid_loss"]) for c in checkpoints] == [(20, 1.2),
                                                                               (10, 1.5)]


def test_hyperparameters_merge_from_both_places_and_check_ranges():
    body = FineTuningJobCreate(model="m", training_file="f", hyperparameters={"n_epochs": 3,
                                                                             "lora_r": 4},
                               method={"type": "supervised", "supervised": {
                                   "hyperparameters": {"n_epochs": 5, "batch_size": "auto"}}})
    assert body.resolved() == {"n_epochs": 5, "lora_r": 4, "batch_size": "auto"}
    bad = FineTuningJobCreate(model="m", training_file="f", hyperparameters={"n_epochs": 99})
    with pytest.raises(InvalidRequestError) as e:
        bad.resolved()
    assert e.value.param == "hyperparameters.n_epochs"
    with pytest.raises(InvalidRequestError, match="integrations"):
        FineTuningJobCreate(model="m", training_file="f",
                            integrations=[{"type": "wandb"}]).resolved()
