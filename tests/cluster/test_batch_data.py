"""``lmforge batch run --ray`` on the session's Ray cluster with the tiny Llama: the same records
as the single-process runner, in input order; a run that dies midway, rerun with the same
arguments, runs only the lines without a result and writes every custom_id once."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from support.batching import line

from lmforge.cluster import batch_data
from lmforge.cli import main

CHAT = {"model": "tiny", "max_tokens": 4, "temperature": 0}


PROMPTS = ["Once upon", "The capital of", "1, 2, 3,", "Dear Sir", "import numpy", "Hello world"]


def requests(n: int) -> list[str]:
    """``n`` greedy completion lines (distinct prompts, so distinct texts from the tiny random
    model), then a chat line, an embedding line and a line the endpoint refuses (400)."""
    texts = [line(f"text-{i}", {"model": "tiny", "prompt": PROMPTS[i], "max_tokens": 4,
                                "temperature": 0}, "/v1/completions") for i in range(n)]
    return [*texts, line("chat", CHAT | {"messages": [{"role": "user", "content": "Hi"}]}),
            line("embed", {"model": "tiny", "input": "hey"}, "/v1/embeddings"),
            line("too-long", CHAT | {"messages": [{"role": "user", "content": "Hi"}],
                                     "max_tokens": 100000})]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def comparable(record: dict) -> dict:
    """A record without what differs between any two runs: its ids and timestamps, and the
    prompt tokens found in the prefix cache (which depends on the lines the same engine ran
    before: a replica sees only some of them)."""
    response = dict(record["response"])
    body = {k: v for k, v in response.pop("body").items() if k not in ("id", "created")}
    (body.get("usage") or {}).pop("prompt_tokens_details", None)
    response.pop("request_id")
    return {"custom_id": record["custom_id"], "error": record["error"], **response, "body": body}


def records(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_ray_output_equals_the_single_process_runner(ray_cluster, tiny_llama_dir, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(requests(6)) + "\n")
    model = ["--model", tiny_llama_dir, "--served-model-name", "tiny", "--concurrency", "2"]
    here = run("batches", "run", source, "-o", tmp_path / "here.jsonl", *model)
    assert here.exit_code == 0, here.output
    on_ray = run("batch", "run", "--ray", "--ray-address", ray_cluster, "--replicas", "2",
                 source, "-o", tmp_path / "ray.jsonl", *model)
    assert on_ray.exit_code == 0, on_ray.output
    assert "9 requests: 8 succeeded, 1 failed" in on_ray.output
    expected = [comparable(r) for r in records(tmp_path / "here.jsonl")]
    got = [comparable(r) for r in records(tmp_path / "ray.jsonl")]
    assert [r["custom_id"] for r in got] == [f"text-{i}" for i in range(6)] + [
        "chat", "embed", "too-long"]
    assert got == expected
    texts = {r["body"]["choices"][0]["text"] for r in got[:6]}
    assert len(texts) > 1  # the lines' texts differ, so a line's result cannot be another's
    assert not (tmp_path / "ray.jsonl.parts").exists()


def test_a_rerun_after_a_failure_runs_only_the_missing_lines(ray_cluster, tiny_llama_dir,
                                                            tmp_path, monkeypatch):
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(requests(5)) + "\n")
    args = ["batch", "run", "--ray-address", ray_cluster, source, "-o", output, "--model",
            tiny_llama_dir, "--served-model-name", "tiny", "--concurrency", "1"]
    commit = batch_data.commit_part
    committed: list[int] = []

    def dies_at_the_third(parts, rows):  # the driver is killed after two batches of one line
        if len(committed) == 2:
            raise RuntimeError("killed")
        committed.append(rows[0]["pos"])
        return commit(parts, rows)

    monkeypatch.setattr(batch_data, "commit_part", dies_at_the_third)
    with pytest.raises(RuntimeError, match="killed"):
        run(*args)
    monkeypatch.undo()
    assert not output.exists()
    parts = tmp_path / "out.jsonl.parts"
    kept = {r["pos"]: r["record"] for r in batch_data._read_parts(parts).values()}
    assert sorted(kept) == sorted(committed) and len(kept) == 2

    again = run(*args)
    assert again.exit_code == 0, again.output
    # 8 lines: only the 6 without a committed result ran again
    assert "6 requests: 5 succeeded, 1 failed" in again.output
    assert "(2 lines were committed by an earlier run)" in again.output
    final = records(output)
    ids = [r["custom_id"] for r in final]
    assert ids == [f"text-{i}" for i in range(5)] + ["chat", "embed", "too-long"]
    for pos, record in kept.items():  # the committed records themselves, not reruns of them
        assert final[pos] == record
    assert not parts.exists()

    source.write_text("\n".join(requests(2)) + "\n")  # another input over a stale staging dir
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps({"input_sha256": "0" * 64}))
    refused = run(*args)
    assert refused.exit_code == 2 and "delete it to start over" in refused.output
