"""``/v1/batches`` through the ``openai`` SDK on servers with their own tiny engine and store:
a batch runs to ``completed`` with bodies equal to the online endpoint's, validation failures
list their lines, cancel and expiry keep partial results and report the rest, bad requests are
4xx in the OpenAI envelope."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from support.batching import batch_server, line, results, upload, wait_status

GREEDY = {"temperature": 0, "max_tokens": 4}


@pytest.fixture(scope="module")
def client(tiny_llama_dir, tmp_path_factory):
    with batch_server(tiny_llama_dir, tmp_path_factory.mktemp("batch_home"),
                      batch_concurrency=3) as c:
        yield c


def chat(model: str, text: str, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], **GREEDY, **kw}


def test_chat_batch_completes_with_the_online_bodies(client, tmp_path):
    model = client.model_name
    bodies = {f"req-{i}": chat(model, f"Count to {i}") for i in range(5)}
    bodies["too-long"] = chat(model, "word " * 600)  # over the 512-token context: a 400 line
    file_id = upload(client, [line(k, v) for k, v in bodies.items()], tmp_path)
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "nightly"})
    assert batch.status == "validating" and batch.metadata == {"job": "nightly"}
    batch = wait_status(client, batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (6, 5, 1)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert batch.model == model
    out, err = results(client, batch)
    assert [r["custom_id"] for r in out] == [f"req-{i}" for i in range(5)]  # input order
    assert [r["custom_id"] for r in err] == ["too-long"]
    assert err[0]["response"]["status_code"] == 400
    assert err[0]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    usage = 0
    for record in out:
        assert record["id"].startswith("batch_req_") and record["error"] is None
        body = record["response"]["body"]
        assert record["response"]["status_code"] == 200 and body["object"] == "chat.completion"
        online = client.chat.completions.create(**bodies[record["custom_id"]])
        choice = body["choices"][0]
        assert choice["message"]["content"] == online.choices[0].message.content
        assert choice["finish_reason"] == online.choices[0].finish_reason
        assert body["usage"]["prompt_tokens"] == online.usage.prompt_tokens
        usage += body["usage"]["prompt_tokens"]
    assert batch.usage.input_tokens == usage
    assert client.batches.retrieve(batch.id).status == "completed"
    listed = client.batches.list(limit=100)
    assert batch.id in [b.id for b in listed.data]
    with pytest.raises(openai.ConflictError, match="completed"):
        client.batches.cancel(batch.id)


def test_completions_and_embeddings_batches(client, tmp_path):
    model = client.model_name
    for endpoint, body in [("/v1/completions", {"model": model, "prompt": "Once", **GREEDY}),
                           ("/v1/embeddings", {"model": model, "input": "hello"})]:
        file_id = upload(client, [line("a", body, endpoint), line("b", body, endpoint)],
                         tmp_path)
        batch = wait_status(client, client.batches.create(
            input_file_id=file_id, endpoint=endpoint, completion_window="24h").id)
        out, err = results(client, batch)
        assert batch.status == "completed" and not err and len(out) == 2
        assert out[0]["response"]["body"]["object"] in ("text_completion", "list")
        assert out[0]["response"]["body"]["usage"]["prompt_tokens"] > 0


def test_validation_failure_lists_every_bad_line(client, tmp_path):
    model = client.model_name
    lines = [
        line("ok", chat(model, "hi")),
        json.dumps({"custom_id": "x", "url": "/v1/chat/completions"}),  # no method, no body
        line("ok", chat(model, "again")),  # duplicate custom_id
        line("url", chat(model, "hi"), url="/v1/completions"),
        json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/chat/completions",
                    "body": chat(model, "hi")}),
        line("model", chat("no-such-model", "hi")),
        line("temp", chat(model, "hi", temperature="hot")),
        line("stream", chat(model, "hi", stream=True)),
        line("n", chat(model, "hi", n=0)),
    ]
    batch = client.batches.create(input_file_id=upload(client, lines, tmp_path),
                                  endpoint="/v1/chat/completions", completion_window="24h")
    batch = wait_status(client, batch.id)
    assert batch.status == "failed" and batch.failed_at
    errors = {e.line: e.code for e in batch.errors.data}
    assert errors == {2: "invalid_request", 3: "duplicate_custom_id",
                      4: "mismatched_endpoint", 5: "invalid_request", 6: "model_not_found",
                      7: "invalid_request", 8: "invalid_request", 9: "invalid_request"}
    assert batch.output_file_id is None and batch.error_file_id is None


def test_cancel_keeps_partial_results_and_reports_the_rest(client, tmp_path):
    model = client.model_name
    slow = {"temperature": 0, "max_tokens": 200, "ignore_eos": True}
    lines = [line(f"c{i}", {"model": model, "messages": [{"role": "user", "content": "x"}],
                            **slow}) for i in range(30)]
    batch = client.batches.create(input_file_id=upload(client, lines, tmp_path),
                                  endpoint="/v1/chat/completions", completion_window="24h")
    wait_status(client, batch.id, {"in_progress"})
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    batch = wait_status(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    out, err = results(client, batch)
    ids = [r["custom_id"] for r in out + err]
    assert sorted(ids) == sorted(f"c{i}" for i in range(30))  # each line exactly once
    cancelled = [r for r in err if r["error"] and r["error"]["code"] == "batch_cancelled"]
    assert cancelled and all(r["response"] is None for r in cancelled)
    counts = batch.request_counts
    assert counts.completed == len(out) and counts.failed == len(err) and counts.total == 30
    assert client.batches.cancel(batch.id).status == "cancelled"  # idempotent


def test_expired_batch_keeps_what_finished(tiny_llama_dir, tmp_path):
    with batch_server(tiny_llama_dir, tmp_path / "home", batch_window_s=1.5,
                      batch_concurrency=2) as c:
        body = {"model": c.model_name, "messages": [{"role": "user", "content": "x"}],
                "temperature": 0, "max_tokens": 100, "ignore_eos": True}
        lines = [line(f"e{i}", body) for i in range(40)]
        batch = c.batches.create(input_file_id=upload(c, lines, tmp_path),
                                 endpoint="/v1/chat/completions", completion_window="24h")
        assert batch.expires_at - batch.created_at <= 2
        batch = wait_status(c, batch.id)
        assert batch.status == "expired" and batch.expired_at
        out, err = results(c, batch)
        assert sorted(r["custom_id"] for r in out + err) == sorted(f"e{i}" for i in range(40))
        expired = [r for r in err if r["error"] and r["error"]["code"] == "batch_expired"]
        assert expired and len(out) + len(expired) == 40


BAD = [
    ({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions",
      "completion_window": "24h"}, 404, "input_file_id"),
    ({"input_file_id": "x", "endpoint": "/v1/responses", "completion_window": "24h"}, 400,
     "endpoint"),
    ({"input_file_id": "x", "endpoint": "/v1/completions", "completion_window": "1h"}, 400,
     "completion_window"),
    ({"input_file_id": "x", "endpoint": "/v1/completions", "completion_window": "24h",
      "metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata"),
    ({"endpoint": "/v1/completions", "completion_window": "24h"}, 400, "input_file_id"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_batch_requests(client, body, status, param):
    resp = httpx.post(f"{client.base_url}batches", json=body)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param


def test_unknown_batch_is_404_and_a_non_batch_file_is_400(client, tmp_path):
    for call in (lambda: client.batches.retrieve("batch_nope"),
                 lambda: client.batches.cancel("batch_nope")):
        with pytest.raises(openai.NotFoundError):
            call()
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n')
    with open(path, "rb") as f:
        file_id = client.files.create(file=f, purpose="user_data").id
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/completions",
                              completion_window="24h")


def test_a_batch_created_while_another_runs_is_validated_at_once(client, tmp_path):
    model = client.model_name
    slow = [line(f"s{i}", chat(model, f"story {i}", max_tokens=64, ignore_eos=True))
            for i in range(12)]
    first = client.batches.create(input_file_id=upload(client, slow, tmp_path),
                                  endpoint="/v1/chat/completions", completion_window="24h")
    wait_status(client, first.id, {"in_progress"})
    # SGLang's spelling of the url, and no model: both accepted
    queued = [line(f"q{i}", {"messages": [{"role": "user", "content": "hi"}], **GREEDY},
                   url="/chat/completions") for i in range(3)]
    bad = [line("b0", chat(model, "hi")), line("b1", chat("gpt-9", "hi"))]
    second = client.batches.create(input_file_id=upload(client, queued, tmp_path),
                                   endpoint="/v1/chat/completions", completion_window="24h")
    third = client.batches.create(input_file_id=upload(client, bad, tmp_path),
                                  endpoint="/v1/chat/completions", completion_window="24h")
    second = wait_status(client, second.id, {"in_progress"}, timeout_s=10)
    third = wait_status(client, third.id, {"failed"}, timeout_s=10)
    assert client.batches.retrieve(first.id).status == "in_progress"  # still running
    assert (second.request_counts.total, second.request_counts.completed) == (3, 0)
    assert second.model == model
    assert [(e.line, e.code) for e in third.errors.data] == [(2, "model_not_found")]
    # a batch cancelled while it waits for its turn ends at once, without running a line
    assert client.batches.cancel(second.id).status == "cancelling"
    second = wait_status(client, second.id, timeout_s=10)
    assert second.status == "cancelled"
    assert client.batches.retrieve(first.id).status == "in_progress"
    out, err = results(client, second)
    assert not out and [r["error"]["code"] for r in err] == ["batch_cancelled"] * 3
    client.batches.cancel(first.id)
    assert wait_status(client, first.id).status == "cancelled"
