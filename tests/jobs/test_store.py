"""The jobs store's root (``jobs/store.py``), on a throwaway SQLite home per test (and a
PostgreSQL URL when one is given, see ``conftest.py``): files page in both orders, deletes take
row and bytes, temporary uploads are never files."""

from __future__ import annotations

import time


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
