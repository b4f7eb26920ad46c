"""``lmforge.client``'s transport against a small app of scripted answers over real HTTP: the
status -> typed error map with the server's message, retries on 429/5xx honouring
``Retry-After`` (the waits are recorded, not slept), no retry of 4xx or timeouts, uploads rewound
before a retry, an error event inside a stream, the API key and base URL from ``configure`` or
the environment, and an unreachable server."""

from __future__ import annotations

import asyncio
import builtins
import email.utils
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from support.serving import serve

from lmforge.client import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    Completion,
    ConflictError,
    File,
    NotFoundError,
    RateLimitError,
    ServerError,
    TimeoutError,
    configure,
    transport,
)


def envelope(message: str, param: str | None = None, type: str = "invalid_request_error"):
    return {"error": {"message": message, "type": type, "param": param, "code": None}}


class Script:
    """The answers the app gives, in order, per path; what it received."""

    def __init__(self):
        self.answers: dict[str, list] = {}
        self.received: list[dict] = []


@pytest.fixture(scope="module")
def scripted():
    script = Script()
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE"])
    async def answer(path: str, request: Request):
        body = await request.body()
        script.received.append({"path": "/" + path, "headers": dict(request.headers),
                                "body": body})
        answers = script.answers.get("/" + path) or []
        reply = answers.pop(0) if answers else JSONResponse(COMPLETION)
        return reply if isinstance(reply, Response) else await reply()

    with serve(app) as url:
        yield script, url


@pytest.fixture
def server(scripted, monkeypatch):
    """The scripted app, the client pointed at it, and the retry waits recorded (not slept)."""
    script, url = scripted
    script.answers.clear()
    script.received.clear()
    waits: list[float] = []
    monkeypatch.setattr(transport, "_pause", waits.append)
    monkeypatch.delenv("LMFORGE_API_KEY", raising=False)
    configure(base_url=url)
    yield script, url, waits
    configure()


COMPLETION = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
              "choices": [{"index": 0, "text": " Paris", "finish_reason": "stop",
                           "logprobs": None}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


def create():
    return Completion.create(model="m", prompt="The capital of France is")


@pytest.mark.parametrize("status,kind", [
    (400, BadRequestError), (413, BadRequestError), (422, BadRequestError),
    (409, ConflictError), (401, AuthenticationError), (403, AuthenticationError),
    (404, NotFoundError)])
def test_4xx_is_typed_with_the_servers_message_and_not_retried(server, status, kind):
    script, _, waits = server
    script.answers["/v1/completions"] = [JSONResponse(envelope("bad top_k", "top_k"), status)]
    with pytest.raises(kind) as caught:
        create()
    e = caught.value
    assert (e.message, e.param, e.status_code, e.type) == ("bad top_k", "top_k", status,
                                                           "invalid_request_error")
    assert f"(HTTP {status})" in str(e)
    assert len(script.received) == 1 and waits == []


def test_429_is_retried_honouring_retry_after_then_succeeds(server):
    script, _, waits = server
    busy = JSONResponse(envelope("queue full", type="requests"), 429,
                        headers={"Retry-After": "1.5"})
    busy_ms = JSONResponse(envelope("queue full"), 429, headers={"retry-after-ms": "250"})
    script.answers["/v1/completions"] = [busy, busy_ms, JSONResponse(COMPLETION)]
    response = create()
    assert response.output.text == " Paris" and response.request_id == "cmpl-1"
    assert response.output.num_prompt_tokens == 5 and response.output.num_completion_tokens == 1
    assert waits == [1.5, 0.25] and len(script.received) == 3


def test_retry_after_as_an_http_date_and_out_of_range_values():
    in_10s = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8 <= transport.retry_wait(0, httpx.Headers({"retry-after": in_10s})) <= 10
    # over 60 s (or 0, or garbage): the exponential backoff, 0.5 s * 2^attempt up to 8 s, -25%
    for value in ("120", "0", "soon"):
        for attempt, full in ((0, 0.5), (1, 1.0), (3, 4.0), (6, 8.0)):
            wait = transport.retry_wait(attempt, httpx.Headers({"retry-after": value}))
            assert 0.75 * full <= wait <= full


def test_5xx_is_retried_max_retries_times_then_raised(server):
    script, url, waits = server
    script.answers["/v1/completions"] = [JSONResponse(envelope("engine died", type="server_error"),
                                                      503)] * 3
    with pytest.raises(ServerError) as caught:
        create()
    assert caught.value.status_code == 503 and caught.value.message == "engine died"
    assert len(script.received) == 3 and len(waits) == 2  # 1 try + max_retries (2)

    configure(base_url=url, max_retries=0)
    script.answers["/v1/completions"] = [PlainTextResponse("upstream gone", 502)]
    with pytest.raises(ServerError, match="upstream gone"):
        create()
    assert len(script.received) == 4 and len(waits) == 2

    configure(base_url=url, max_retries=1)
    script.answers["/v1/completions"] = [JSONResponse(envelope("busy"), 429)] * 2
    with pytest.raises(RateLimitError):
        create()
    assert len(script.received) == 6 and len(waits) == 3


def test_a_timeout_is_not_retried_and_is_a_builtin_timeout_error(server):
    script, _, waits = server

    async def slow():
        await asyncio.sleep(2)
        return JSONResponse(COMPLETION)

    script.answers["/v1/completions"] = [slow]
    with pytest.raises(TimeoutError, match="did not answer in time") as caught:
        Completion.create(model="m", prompt="x", timeout=0.3)
    assert isinstance(caught.value, builtins.TimeoutError)
    assert isinstance(caught.value, APIConnectionError)
    assert len(script.received) == 1 and waits == []


def test_an_upload_is_sent_whole_again_on_retry(server, tmp_path):
    script, _, waits = server
    data = b'{"custom_id": "a"}\n' * 1000
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    stored = {"id": "file-1", "object": "file", "bytes": len(data), "created_at": 0,
              "filename": "in.jsonl", "purpose": "batch"}
    script.answers["/v1/files"] = [JSONResponse(envelope("later"), 503), JSONResponse(stored)]
    assert File.upload(path, purpose="batch").size == len(data)
    assert len(script.received) == 2 and len(waits) == 1
    assert all(data in r["body"] for r in script.received)


def test_an_error_event_inside_a_stream_raises_after_the_pieces_before_it(server):
    script, _, _ = server
    chunk = {**COMPLETION, "usage": None,
             "choices": [{"index": 0, "text": " Par", "finish_reason": None, "logprobs": None}]}

    async def sse():
        import json

        events = [f"data: {json.dumps(chunk)}\n\n",
                  f"data: {json.dumps(envelope('engine died', type='server_error'))}\n\n",
                  "data: [DONE]\n\n"]
        return StreamingResponse(iter(events), media_type="text/event-stream")

    script.answers["/v1/completions"] = [sse]
    pieces = Completion.create(model="m", prompt="x", stream=True)
    assert next(pieces).output.text == " Par"
    with pytest.raises(ServerError, match="engine died") as caught:
        next(pieces)
    assert caught.value.status_code is None


def test_async_calls_retry_and_map_errors_too(server, monkeypatch):
    script, _, _ = server
    asleep: list[float] = []

    async def record(seconds):
        asleep.append(seconds)

    monkeypatch.setattr(transport, "_apause", record)

    async def run():
        script.answers["/v1/completions"] = [
            JSONResponse(envelope("busy"), 429, headers={"Retry-After": "2"}),
            JSONResponse(COMPLETION)]
        response = await Completion.acreate(model="m", prompt="x")
        script.answers["/v1/completions"] = [JSONResponse(envelope("no such model", "model"),
                                                          404)]
        with pytest.raises(NotFoundError, match="no such model"):
            await Completion.acreate(model="m", prompt="x")
        return response

    assert asyncio.run(run()).output.text == " Paris" and asleep == [2.0]


def test_api_key_and_base_url_from_configure_or_the_environment(server, monkeypatch):
    script, url, _ = server
    configure(base_url=url + "/v1/", api_key="sk-configured")  # "/v1" as OpenAI clients write it
    create()
    assert script.received[-1]["path"] == "/v1/completions"
    assert script.received[-1]["headers"]["authorization"] == "Bearer sk-configured"

    configure()
    monkeypatch.setenv("LMFORGE_BASE_URL", url)
    monkeypatch.setenv("LMFORGE_API_KEY", "sk-env")
    create()
    assert script.received[-1]["headers"]["authorization"] == "Bearer sk-env"

    monkeypatch.delenv("LMFORGE_API_KEY")
    create()
    assert "authorization" not in script.received[-1]["headers"]


def test_an_unreachable_server_says_how_to_start_one(server):
    _, _, waits = server
    configure(base_url="http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(APIConnectionError, match="lmforge serve") as caught:
        create()
    assert "127.0.0.1:9" in str(caught.value) and len(waits) == 2  # connections are retried


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="max_retries"):
        configure(max_retries=-1)
    with pytest.raises(ValueError, match="timeout"):
        configure(timeout=0)
