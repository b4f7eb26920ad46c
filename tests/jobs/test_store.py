"""The jobs store, on a throwaway SQLite home per test (and a PostgreSQL URL when one is given):
each migration runs once and is recorded, files page in both orders, deletes take row and
bytes, temporary uploads are never files; batch statuses only move forward, a line's result is
recorded once with its counts and usage."""

from __future__ import annotations

import os
import time

import pytest
import sqlalchemy as sa

from lmforge.jobs import store as store_module
from lmforge.jobs.store import MIGRATIONS, Store


# A PostgreSQL URL (e.g. postgresql+psycopg://postgres@/db?host=/tmp/pg&port=55432) runs the
# store tests on it too; without one they run on SQLite only.
POSTGRES_URL = os.environ.get("LMFORGE_TEST_DATABASE_URL")


@pytest.fixture(params=["sqlite", pytest.param("url", marks=pytest.mark.skipif(
    not POSTGRES_URL, reason="set LMFORGE_TEST_DATABASE_URL to test a PostgreSQL store"))])
def store(request, tmp_path):
    s = Store(POSTGRES_URL if request.param == "url" else None, home=tmp_path)
    yield s
    if request.param == "url":  # the next test starts from an empty database
        with s.db.begin() as conn:
            for table in ("fine_tuning_checkpoints", "fine_tuning_events", "fine_tuning_jobs",
                          "batch_results", "batches", "files", "_migrations"):
                conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
    s.close()


def recorded(store: Store) -> list[tuple[int, str]]:
    with store.db.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(
            "SELECT version, name FROM _migrations ORDER BY version"))]


def test_migrations_apply_once_and_are_recorded(tmp_path, monkeypatch):
    first = Store(home=tmp_path)
    assert recorded(first) == [(v, name) for v, name, _ in MIGRATIONS]
    assert sa.inspect(first.db).has_table("files")
    assert first.migrate() == []  # nothing left to apply
    first.close()
    calls = []
    monkeypatch.setattr(store_module, "MIGRATIONS", [
        *MIGRATIONS, (max(v for v, _, _ in MIGRATIONS) + 1, "a test column",
                      lambda conn: calls.append(conn.execute(sa.text(
                          "ALTER TABLE files ADD COLUMN note VARCHAR(8)"))))])
    second = Store(home=tmp_path)  # the same home: only the new entry runs
    assert len(calls) == 1 and recorded(second)[-1][1] == "a test column"
    second.close()
    third = Store(home=tmp_path)
    assert third.migrate() == [] and len(calls) == 1
    third.close()


def test_add_get_and_bytes(store, tmp_path):
    temp = store.temp_path()
    temp.write_bytes(b'{"a": 1}\n')
    record = store.add_file(temp, "in.jsonl", "batch")
    assert not temp.exists() and store.path(record.id).read_bytes() == b'{"a": 1}\n'
    assert record.id.startswith("file-") and record.bytes == 9 and record.expires_at is None
    assert abs(record.created_at - time.time()) < 5
    assert store.get_file(record.id) == record
    from_bytes = store.add_file(b"xyz", "x.txt", "user_data", expires_after=3600)
    assert from_bytes.expires_at == from_bytes.created_at + 3600 and from_bytes.bytes == 3
    assert store.get_file("file-missing") is None


def test_list_pages_in_both_orders(store):
    ids = [store.add_file(f"{i}".encode(), f"{i}.txt", "batch" if i % 2 else "evals").id
           for i in range(5)]
    newest = ids[::-1]
    page, more = store.list_files(limit=2)
    assert [f.id for f in page] == newest[:2] and more
    page, more = store.list_files(limit=2, after=newest[1])
    assert [f.id for f in page] == newest[2:4] and more
    page, more = store.list_files(limit=2, after=newest[3])
    assert [f.id for f in page] == newest[4:] and not more
    page, more = store.list_files(limit=3, order="asc", after=ids[1])
    assert [f.id for f in page] == ids[2:] and not more
    page, more = store.list_files(purpose="batch", order="asc")
    assert [f.id for f in page] == ids[1::2] and not more
    assert store.list_files(limit=5)[1] is False


def test_delete_removes_row_and_bytes(store):
    record = store.add_file(b"gone", "g.txt", "user_data")
    assert store.delete_file(record.id)
    assert store.get_file(record.id) is None and not store.path(record.id).exists()
    assert store.delete_file(record.id) is False
    assert store.list_files() == ([], False)


def test_temporary_files_are_never_files(store):
    temp = store.temp_path()
    temp.write_bytes(b"half an upload")
    assert temp.parent == store.files_dir and temp.name.startswith(".")
    assert store.list_files() == ([], False)
    assert store.get_file(temp.name) is None


def test_expired_files(store):
    now = int(time.time())
    soon = store.add_file(b"s", "s.txt", "user_data", expires_at=now + 10)
    store.add_file(b"k", "k.txt", "user_data")
    assert store.expired_files(now) == []
    assert store.expired_files(now + 10) == [soon.id]


def test_batch_statuses_only_move_forward(store):
    batch = store.add_batch("/v1/completions", "file-x", "24h", 60, {"k": "v"})
    assert (batch.status, batch.expires_at - batch.created_at, batch.metadata) == (
        "validating", 60, {"k": "v"})
    assert not store.transition(batch.id, "completed")  # not from validating
    assert store.transition(batch.id, "in_progress")
    assert not store.transition(batch.id, "in_progress")  # a second writer loses
    assert store.transition(batch.id, "cancelling")
    assert not store.transition(batch.id, "finalizing")
    assert store.transition(batch.id, "cancelled", output_file_id="file-o")
    final = store.get_batch(batch.id)
    assert (final.status, final.output_file_id) == ("cancelled", "file-o")
    assert final.in_progress_at and final.cancelling_at and final.cancelled_at
    assert store.unfinished_batches() == []


def test_a_result_is_recorded_once_with_its_counts_and_usage(store):
    batch = store.add_batch("/v1/completions", "file-x", "24h", 60, None)
    assert store.add_result(batch.id, 3, "c", True, {"x": 1}, (10, 4, 5))
    assert not store.add_result(batch.id, 3, "c", True, {"x": 2}, (10, 4, 5))  # again: no-op
    assert store.add_result(batch.id, 0, "a", False, {"e": 1})
    got = store.get_batch(batch.id)
    assert (got.completed, got.failed, got.input_tokens, got.cached_tokens,
            got.output_tokens) == (1, 1, 10, 4, 5)
    assert store.done_lines(batch.id) == {0, 3}
    assert [(line, ok) for line, ok, _ in store.results(batch.id)] == [(0, False), (3, True)]
    assert [b.id for b in store.unfinished_batches()] == [batch.id]


def test_batches_page_newest_first_even_with_equal_ranks(store, monkeypatch):
    monkeypatch.setattr(time, "time_ns", lambda: 1_700_000_000_000_000_000)  # a coarse clock
    ids = [store.add_batch("/v1/completions", "f", "24h", 60, None).id for _ in range(5)]
    seen, after = [], None
    while True:
        page, more = store.list_batches(limit=2, after=after)
        seen += [b.id for b in page]
        if not more:
            break
        after = page[-1].id
    assert sorted(seen) == sorted(ids) and len(seen) == 5
