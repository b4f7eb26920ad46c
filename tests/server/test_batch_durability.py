"""Batches survive SIGKILL: a real ``lmforge serve`` process is killed mid-batch and started
again on the same ``LMFORGE_HOME``; the batch resumes, every ``custom_id`` appears exactly once
across the output and error files, the counts match, and the status never goes backwards. A
cancel and an expiry that span a kill end the same way."""

from __future__ import annotations

import time

from support.batching import ServerProcess, line, results, upload, wait_status

SLOW = {"temperature": 0, "max_tokens": 48, "ignore_eos": True}


def slow_lines(n: int, prefix: str) -> list[str]:
    return [line(f"{prefix}{i}", {"model": "tiny", "messages": [
        {"role": "user", "content": f"story {i}"}], **SLOW}) for i in range(n)]


def wait_completed_at_least(client, batch_id: str, k: int, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while (batch := client.batches.retrieve(batch_id)).request_counts.completed < k:
        assert batch.status in ("validating", "in_progress"), batch.status
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return batch


def check_each_line_once(client, batch, ids: list[str]):
    out, err = results(client, batch)
    assert sorted(r["custom_id"] for r in out + err) == sorted(ids)
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (len(ids), len(out), len(err))
    return out, err


def test_a_killed_batch_resumes_and_runs_each_line_once(tiny_llama_dir, tmp_path):
    server = ServerProcess(tiny_llama_dir, tmp_path / "home", "--batch-concurrency", "2",
                           "--job-lease-s", "3")  # a restart takes its own jobs back sooner
    ids = [f"r{i}" for i in range(16)]
    try:
        client = server.start()
        batch = client.batches.create(input_file_id=upload(client, slow_lines(16, "r"), tmp_path),
                                      endpoint="/v1/chat/completions", completion_window="24h")
        before = wait_completed_at_least(client, batch.id, 3)
        server.kill()
        assert before.request_counts.completed < 16, "finished before the kill; slow it down"
        client = server.start()
        after = client.batches.retrieve(batch.id)  # resumed, not restarted or lost
        assert after.status in ("in_progress", "finalizing", "completed")
        assert after.request_counts.completed >= before.request_counts.completed
        batch = wait_status(client, batch.id)
        assert batch.status == "completed"
        out, err = check_each_line_once(client, batch, ids)
        assert not err and all(r["response"]["status_code"] == 200 for r in out)
        resumed = [x for x in server.output if f"batch {batch.id}: resuming" in x]
        assert len(resumed) == 1 and "of 16 lines already have a result" in resumed[0]
    finally:
        server.kill()


def test_cancel_and_expiry_that_span_a_kill(tiny_llama_dir, tmp_path):
    server = ServerProcess(tiny_llama_dir, tmp_path / "home", "--batch-concurrency", "1",
                           "--batch-window-s", "6", "--job-lease-s", "3")
    try:
        client = server.start()
        expiring = client.batches.create(
            input_file_id=upload(client, slow_lines(40, "e"), tmp_path),
            endpoint="/v1/chat/completions", completion_window="24h")
        cancelled = client.batches.create(
            input_file_id=upload(client, slow_lines(5, "c"), tmp_path),
            endpoint="/v1/chat/completions", completion_window="24h")
        wait_completed_at_least(client, expiring.id, 1)
        client.batches.cancel(cancelled.id)  # queued behind the first: cancelling until driven
        server.kill()
        time.sleep(max(0.0, expiring.expires_at + 1 - time.time()))  # the window passes while down
        client = server.start()
        expiring = wait_status(client, expiring.id)
        assert expiring.status == "expired"
        out, err = check_each_line_once(client, expiring, [f"e{i}" for i in range(40)])
        assert out and any(r["error"] and r["error"]["code"] == "batch_expired" for r in err)
        cancelled = wait_status(client, cancelled.id)
        assert cancelled.status == "cancelled"
        out, err = check_each_line_once(client, cancelled, [f"c{i}" for i in range(5)])
        assert {r["error"]["code"] for r in err} == {"batch_cancelled"}
    finally:
        server.kill()
