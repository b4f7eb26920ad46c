"""The jobs store fixture: a throwaway SQLite home per test, and the same tests on a PostgreSQL
database when ``LMFORGE_TEST_DATABASE_URL`` names one (e.g.
``postgresql+psycopg://postgres@/db?host=/tmp/pg&port=55432``); without one they run on SQLite
only."""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa

from lmforge.jobs.store import Store

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
