"""The fine-tune worker's reading of trainer events: what each event class writes to the job's
events and checkpoints, and the results CSV, in the exact shapes the API has always served."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from lmforge.jobs.fine_tuning_store import results_csv
from lmforge.jobs.fine_tuning_worker import FineTuningWorker
from lmforge.training.events import (
    CheckpointEvent,
    MessageEvent,
    ResumeEvent,
    StepEvent,
)


class _Jobs:
    """Records the store calls (``data``/``metrics`` as the JSON text the store writes)."""

    def __init__(self):
        self.calls = []

    def add_event(self, job_id, message, level="info", type="message", data=None):
        self.calls.append(("event", job_id, message, type, json.dumps(data)))

    def add_checkpoint(self, job_id, step_number, metrics, path):
        self.calls.append(("checkpoint", job_id, step_number, json.dumps(metrics), path))


def test_events_are_stored_in_the_openai_shapes():
    worker = SimpleNamespace(jobs=_Jobs())
    job, metrics = SimpleNamespace(id="ftjob-1"), []
    events = [ResumeEvent(None, 0, 0), ResumeEvent("checkpoint-3", 1, 3),
              MessageEvent("Training on 18 examples"), MessageEvent(""),
              StepEvent(1, 1, 12.5, 0.0), StepEvent(3, 1, 11.25, 0.03, eval_loss=10.125),
              CheckpointEvent(3, 1, Path("/w/ftjob-1/checkpoint-3"), 11.25, 10.125)]
    for event in events:
        FineTuningWorker._record(worker, job, metrics, event)
    assert worker.jobs.calls == [
        ("event", "ftjob-1", ("Restarting from step 1: no checkpoint was saved before the "
                              "server stopped"), "message",
         '{"checkpoint": null, "epoch": 0, "step": 0}'),
        ("event", "ftjob-1", "Resuming from checkpoint-3 (epoch 1, step 3)", "message",
         '{"checkpoint": "checkpoint-3", "epoch": 1, "step": 3}'),
        ("event", "ftjob-1", "Training on 18 examples", "message", "null"),
        ("event", "ftjob-1", "Step 1: training loss=12.5000", "metrics",
         '{"step": 1, "epoch": 1, "train_loss": 12.5, "learning_rate": 0.0}'),
        ("event", "ftjob-1", "Step 3: training loss=11.2500, validation loss=10.1250", "metrics",
         ('{"step": 3, "epoch": 1, "train_loss": 11.25, "learning_rate": 0.03, '
          '"eval_loss": 10.125}')),
        ("checkpoint", "ftjob-1", 3, ('{"step": 3, "train_loss": 11.25, "valid_loss": 10.125, '
                                      '"full_valid_loss": 10.125}'), "/w/ftjob-1/checkpoint-3"),
    ]
    assert metrics == [events[4], events[5]]
    assert results_csv(metrics) == (b"step,epoch,train_loss,valid_loss,learning_rate\r\n"
                                     b"1,1,12.5,,0.0\r\n3,1,11.25,10.125,0.03\r\n")
