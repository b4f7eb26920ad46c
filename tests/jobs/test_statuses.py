"""Batch and fine-tuning statuses (``protocol/statuses.py``, their transitions in
``jobs/statuses.py``): OpenAI's values, the wire schemas' own types; a status object reads, prints and serializes as its plain string, so the JSON
objects the routes send are byte for byte what they were with bare strings; the transition maps
only move forward."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lmforge.client import types as client_types
from lmforge.jobs.batch_store import BatchStore
from lmforge.jobs.fine_tuning_store import FineTuningStore
from lmforge.jobs.statuses import (
    BATCH_FROM,
    FINE_TUNING_FROM,
    UNFINISHED_BATCHES,
    UNFINISHED_FINE_TUNES,
)
from lmforge.protocol import batches as batch_protocol
from lmforge.protocol import fine_tuning as fine_tuning_protocol
from lmforge.protocol.statuses import BatchStatus, FineTuningStatus
from lmforge.server.batches import batch_object
from lmforge.server.fine_tuning import job_object


def test_the_wire_schemas_and_the_client_use_these_values():
    """One definition for the wire and the store; the client, which may import nothing of the
    server (``tests/test_layout.py``), keeps its own copy of the batch statuses: the same."""
    assert batch_protocol.Batch.model_fields["status"].annotation is BatchStatus
    assert fine_tuning_protocol.FineTuningJob.model_fields["status"].annotation is FineTuningStatus
    assert [s.value for s in client_types.BatchStatus] == [s.value for s in BatchStatus]
    assert [s.value for s in BatchStatus] == ["validating", "failed", "in_progress", "finalizing",
                                               "completed", "expired", "cancelling", "cancelled"]
    assert [s.value for s in FineTuningStatus] == ["validating_files", "queued", "running",
                                                    "succeeded", "failed", "cancelled"]


@pytest.mark.parametrize("status", [*BatchStatus, *FineTuningStatus])
def test_a_status_is_its_plain_string(status):
    assert status == status.value and isinstance(status, str)
    assert str(status) == f"{status}" == status.value  # error messages read as before
    assert json.dumps({"status": status}) == json.dumps({"status": status.value})


def test_final_statuses_are_not_unfinished_and_never_move_again():
    assert UNFINISHED_BATCHES == (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS,
                                  BatchStatus.FINALIZING, BatchStatus.CANCELLING)
    assert UNFINISHED_FINE_TUNES == (FineTuningStatus.VALIDATING_FILES, FineTuningStatus.QUEUED,
                                     FineTuningStatus.RUNNING)
    for table in (BATCH_FROM, FINE_TUNING_FROM):
        assert not any(before.is_final() for sources in table.values() for before in sources)


def test_the_json_objects_are_unchanged_by_the_enum(store):
    batches, jobs = BatchStore(store), FineTuningStore(store)
    batch = batches.add_batch("/v1/completions", "file-x", "24h", 60, {"k": "v"})
    batches.transition(batch.id, BatchStatus.IN_PROGRESS)
    batch = batches.get_batch(batch.id)
    job = jobs.add_job("base", "file-t", None, None, 1, {"n_epochs": 2}, None, None)
    for record, build in ((batch, batch_object), (job, job_object)):
        plain = dataclasses.replace(record, status=record.status.value)
        assert type(plain.status) is str and type(record.status) is not str
        assert build(record).model_dump_json() == build(plain).model_dump_json()
        assert f'"status":"{record.status.value}"' in build(record).model_dump_json()
