"""``lmforge files ...`` (click's CliRunner) against the session server over real HTTP: each
command prints a table, or with ``--json`` the client's object; download writes the exact
bytes; server errors and an unreachable server are one ``Error:`` line that says what to run
next, with exit status 1."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from support.serving import serve

from lmforge.cli import main
from lmforge.config import ServerConfig
from lmforge.server import build_app

DATA = b'{"custom_id": "a"}\n{"custom_id": "b"}\n'


@pytest.fixture
def lmforge(base_url, monkeypatch):
    """``lmforge(*args)`` -> the click Result, aimed at the session server by the env var."""
    monkeypatch.setenv("LMFORGE_BASE_URL", base_url)
    monkeypatch.delenv("LMFORGE_API_KEY", raising=False)
    runner = CliRunner()
    return lambda *args: runner.invoke(main, ["files", *map(str, args)], catch_exceptions=False)


def ok_json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_upload_list_get_download_delete(lmforge, tmp_path):
    path = tmp_path / "lines.jsonl"
    path.write_bytes(DATA)
    created = ok_json(lmforge("upload", path, "--purpose", "batch", "--json"))
    assert created["object"] == "file" and created["filename"] == "lines.jsonl"
    assert created["size"] == created["bytes"] == len(DATA) and created["purpose"] == "batch"
    assert ok_json(lmforge("get", created["id"], "--json")) == created
    assert ok_json(lmforge("list", "--purpose", "batch", "--limit", 1, "--json")) == [created]
    assert lmforge("download", created["id"]).stdout_bytes == DATA
    out = tmp_path / "copy.jsonl"
    assert ok_json(lmforge("download", created["id"], "-o", out, "--json")) == {
        "id": created["id"], "path": str(out), "bytes": len(DATA)}
    assert out.read_bytes() == DATA and not (tmp_path / "copy.jsonl.part").exists()
    assert ok_json(lmforge("delete", created["id"], "--json")) == {
        "id": created["id"], "object": "file", "deleted": True}


def test_tables_show_whole_ids(lmforge, tmp_path):
    path = tmp_path / "a-rather-long-file-name-for-the-table.jsonl"
    path.write_bytes(DATA)
    created = ok_json(lmforge("upload", path, "--purpose", "batch", "--json"))
    listed = lmforge("list", "--purpose", "batch")
    assert listed.exit_code == 0
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["id", "filename", "purpose", "bytes", "created"]
    assert rows[0].split()[:4] == [created["id"], path.name, "batch", str(len(DATA))]
    shown = [line.split() for line in lmforge("get", created["id"]).stdout.splitlines()]
    assert ["id", created["id"]] in shown and ["size", str(len(DATA))] in shown
    assert lmforge("delete", created["id"]).stdout == f"Deleted {created['id']}.\n"
    written = lmforge("download", created["id"], "-o", tmp_path / "x")
    assert written.exit_code == 1 and "See `lmforge files list`" in written.output


def test_expires_after_option(lmforge, tmp_path):
    path = tmp_path / "x.txt"
    path.write_bytes(b"x")
    created = ok_json(lmforge("upload", path, "--purpose", "user_data",
                              "--expires-after", 7200, "--json"))
    assert created["expires_at"] == created["created_at"] + 7200
    lmforge("delete", created["id"])


def test_server_errors_are_one_line_with_the_next_command(lmforge, tmp_path):
    result = lmforge("get", "file-nope")
    assert result.exit_code == 1
    assert result.output == ("Error: No such File object: file-nope (HTTP 404). "
                             "See `lmforge files list`.\n")
    out = tmp_path / "never.bin"
    result = lmforge("download", "file-nope", "-o", out)
    assert result.exit_code == 1 and "No such File object" in result.output
    assert not out.exists() and not (tmp_path / "never.bin.part").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"a": 1}\nnot json\n')
    result = lmforge("upload", bad, "--purpose", "batch")
    assert result.exit_code == 1 and "Line 2 of the file is not a JSON object" in result.output
    result = lmforge("list", "--limit", 0)  # click checks the range before any request
    assert result.exit_code == 2 and "--limit" in result.output


def test_unreachable_server_names_lmforge_serve(lmforge):
    result = lmforge("list", "--base-url", "http://127.0.0.1:9/v1")
    assert result.exit_code == 1
    [line] = result.output.splitlines()
    assert line.startswith("Error: cannot reach the lmforge server at http://127.0.0.1:9 ")
    assert "Start one with `lmforge serve`" in line and "--base-url" in line


def test_api_key(engine, base_url, lmforge, monkeypatch):
    with serve(build_app(engine, ServerConfig(api_keys=["sesame"])), lifespan="off") as url:
        result = lmforge("list", "--base-url", url)
        assert result.exit_code == 1 and "didn't provide an API key" in result.output
        assert "Pass --api-key or set LMFORGE_API_KEY" in result.output
        keyed = ok_json(lmforge("list", "--base-url", url, "--api-key", "sesame", "--json"))
        assert isinstance(keyed, list)
        monkeypatch.setenv("LMFORGE_API_KEY", "sesame")
        assert lmforge("list", "--base-url", f"{url}/v1/").exit_code == 0
