"""An append-only JSONL file keyed by one field: what every stage writes, and how a killed run
resumes without writing a line twice.

A line is appended and flushed as soon as its result arrives. On open, the lines already there
are read back; a torn last line (the process died mid-write) is cut off, so the file stays valid
JSONL and that item is simply redone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator


class JsonlLog:
    """``path``'s records by ``record[key]``; ``append`` adds one (a key already present is a
    bug in the caller and raises ``ValueError``)."""

    def __init__(self, path: str | Path, key: str) -> None:
        self.path = Path(path)
        self.key = key
        self.records: dict[str, dict] = {}
        if self.path.exists():
            self._read_back()

    def _read_back(self) -> None:
        data = self.path.read_bytes()
        good = 0  # bytes up to the end of the last complete, parseable line
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            self.records[str(record[self.key])] = record
            good += len(line)
        if good < len(data):
            with self.path.open("r+b") as handle:
                handle.truncate(good)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records.values())

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def append(self, record: dict) -> None:
        key = str(record[self.key])
        if key in self.records:
            raise ValueError(f"{self.path.name}: {self.key}={key!r} is already written")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records[key] = record


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Write ``rows`` to ``path`` whole, atomically (a temp file renamed over it): for files
    derived from the logs, such as the pairs, which are rewritten rather than appended."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                       encoding="utf-8")
    partial.replace(path)
    return path
