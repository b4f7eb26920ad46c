"""Batch rows (``jobs/batch_store.py``), on a throwaway SQLite home per test (and a PostgreSQL
URL when one is given, see ``conftest.py``): batch statuses only move forward, a line's result
is recorded once with its counts and usage, pages are stable under a coarse clock."""

from __future__ import annotations

import time

import pytest

from lmforge.jobs.batch_store import BatchStore
from lmforge.protocol.statuses import BatchStatus


@pytest.fixture
def batches(store):
    return BatchStore(store)


def test_batch_statuses_only_move_forward(batches):
    batch = batches.add_batch("/v1/completions", "file-x", "24h", 60, {"k": "v"})
    assert (batch.status, batch.expires_at - batch.created_at, batch.metadata) == (
        BatchStatus.VALIDATING, 60, {"k": "v"})
    assert not batches.transition(batch.id, BatchStatus.COMPLETED)  # not from validating
    assert batches.transition(batch.id, BatchStatus.IN_PROGRESS)
    assert not batches.transition(batch.id, BatchStatus.IN_PROGRESS)  # a second writer loses
    assert batches.transition(batch.id, BatchStatus.CANCELLING)
    assert not batches.transition(batch.id, BatchStatus.FINALIZING)
    assert batches.transition(batch.id, BatchStatus.CANCELLED, output_file_id="file-o")
    final = batches.get_batch(batch.id)
    assert (final.status, final.output_file_id) == (BatchStatus.CANCELLED, "file-o")
    assert final.status is BatchStatus.CANCELLED  # read back as the enum, not a plain str
    assert final.in_progress_at and final.cancelling_at and final.cancelled_at
    assert batches.unfinished_batches() == []


def test_a_result_is_recorded_once_with_its_counts_and_usage(batches):
    batch = batches.add_batch("/v1/completions", "file-x", "24h", 60, None)
    assert batches.add_result(batch.id, 3, "c", True, {"x": 1}, (10, 4, 5))
    assert not batches.add_result(batch.id, 3, "c", True, {"x": 2}, (10, 4, 5))  # again: no-op
    assert batches.add_result(batch.id, 0, "a", False, {"e": 1})
    got = batches.get_batch(batch.id)
    assert (got.completed, got.failed, got.input_tokens, got.cached_tokens,
            got.output_tokens) == (1, 1, 10, 4, 5)
    assert batches.done_lines(batch.id) == {0, 3}
    assert [(line, ok) for line, ok, _ in batches.results(batch.id)] == [(0, False), (3, True)]
    assert [b.id for b in batches.unfinished_batches()] == [batch.id]


def test_batches_page_newest_first_even_with_equal_ranks(batches, monkeypatch):
    monkeypatch.setattr(time, "time_ns", lambda: 1_700_000_000_000_000_000)  # a coarse clock
    ids = [batches.add_batch("/v1/completions", "f", "24h", 60, None).id for _ in range(5)]
    seen, after = [], None
    while True:
        page, more = batches.list_batches(limit=2, after=after)
        seen += [b.id for b in page]
        if not more:
            break
        after = page[-1].id
    assert sorted(seen) == sorted(ids) and len(seen) == 5


def test_a_status_value_is_taken_as_its_enum_and_anything_else_refused(batches):
    batch = batches.add_batch("/v1/completions", "file-x", "24h", 60, None)
    assert batches.transition(batch.id, "in_progress")  # the plain value, as stored
    assert batches.get_batch(batch.id).status is BatchStatus.IN_PROGRESS
    with pytest.raises(ValueError):
        batches.transition(batch.id, "done")  # no such status
