"""``lmforge batches ...`` against a batch server, and ``lmforge batches run`` (the offline runner,
no server) on the tiny model: tables and ``--json``, the same records as the server writes,
errors as one line (naming the list command of a missing id) with a non-zero exit."""

from __future__ import annotations

import json
import re
import sys

import pytest
from support.batching import batch_server, line
from click.testing import CliRunner

from lmforge.cli import main


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    with batch_server(tiny_llama_dir, tmp_path_factory.mktemp("cli_home")) as client:
        yield client


def run(*args, env=None):
    result = CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)
    return result


def test_batches_create_wait_get_list_cancel(server, tmp_path):
    env = {"LMFORGE_BASE_URL": str(server.base_url)}
    body = {"model": server.model_name, "prompt": "Hi", "max_tokens": 3, "temperature": 0}
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(line(f"x{i}", body, "/v1/completions") for i in range(3)))
    created = run("batches", "create", "--input", path, "--endpoint", "/v1/completions",
                  "--metadata", "team=nlp", "--json", env=env)
    assert created.exit_code == 0, created.output
    batch = json.loads(created.stdout)
    assert batch["status"] == "validating" and batch["metadata"] == {"team": "nlp"}
    waited = run("batches", "wait", batch["id"], "--poll", "0.1", "--timeout", "60", "--json",
                 env=env)
    assert waited.exit_code == 0, waited.output
    done = json.loads(waited.stdout)
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 3
    assert "3/3" in waited.stderr  # the progress bar
    assert json.loads(run("batches", "get", batch["id"], "--json", env=env).stdout) == done
    listed = json.loads(run("batches", "list", "--limit", "5", "--json", env=env).stdout)
    assert batch["id"] in [b["id"] for b in listed] and len(listed) <= 5
    table = run("batches", "list", env=env).stdout.splitlines()
    assert table[0].split()[:3] == ["id", "status", "endpoint"]
    assert [batch["id"], "completed", "/v1/completions", "3/3"] in [r.split()[:4] for r in table]
    refused = run("batches", "cancel", batch["id"], env=env)
    assert refused.exit_code == 1 and "completed" in refused.output and "HTTP 409" in refused.output
    missing = run("batches", "get", "batch_nope", env=env)
    assert missing.exit_code == 1 and "See `lmforge batches list`" in missing.output
    no_file = run("batches", "create", "--input-file-id", "file-nope", env=env)
    assert no_file.exit_code == 1 and "See `lmforge files list`" in no_file.output
    both = run("batches", "create", "--input", path, "--input-file-id", "file-x", env=env)
    assert both.exit_code == 2 and "exactly one" in both.output


def test_offline_batch_run_writes_every_line_in_order(tiny_llama_dir, tmp_path):
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
            "temperature": 0}
    lines = [line("a", chat), line("b", {"model": "tiny", "input": "hey"}, "/v1/embeddings"),
             line("c", chat | {"max_tokens": 100000})]
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(lines) + "\n")
    result = run("batches", "run", source, "-o", output, "--model", tiny_llama_dir,
                 "--served-model-name", "tiny")
    assert result.exit_code == 0, result.output
    assert "3 requests: 2 succeeded, 1 failed" in result.output
    assert re.search(r"lmforge ready in [\d.]+ s: imports [\d.]+ s, .*checkpoint", result.output)
    records = [json.loads(x) for x in output.read_text().splitlines()]
    assert [r["custom_id"] for r in records] == ["a", "b", "c"]
    assert [r["response"]["status_code"] for r in records] == [200, 200, 400]
    assert records[0]["response"]["body"]["object"] == "chat.completion"
    assert records[1]["response"]["body"]["data"][0]["object"] == "embedding"

    source.write_text(line("a", chat | {"model": "other"}) + "\n")
    bad = run("batches", "run", source, "-o", output, "--model", tiny_llama_dir,
              "--served-model-name", "tiny")
    assert bad.exit_code == 2 and "line 1" in bad.output and "other" in bad.output


def test_batch_run_ray_without_ray_names_the_extra(tmp_path, monkeypatch):
    """``batch`` is ``batches``; ``--ray`` without Ray installed fails in one line naming the
    extra, before any model loads (``--model`` here does not even exist)."""
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    source = tmp_path / "in.jsonl"
    source.write_text(line("a", {"model": "m", "prompt": "Hi"}, "/v1/completions") + "\n")
    result = run("batch", "run", "--ray", source, "-o", tmp_path / "out.jsonl", "--model",
                 tmp_path / "no-such-model")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: this needs Ray, which is not installed: pip install 'lmforge[ray]'"]
    plain = run("batches", "run", source, "-o", tmp_path / "out.jsonl", "--replicas", "2")
    assert plain.exit_code == 2 and "--replicas: only with --ray (add --ray" in plain.output
