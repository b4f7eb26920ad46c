"""Every failure answers with the OpenAI envelope and the right status; the server survives them."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from support.connection import KeepAlive
from fastapi.testclient import TestClient
from pydantic import BaseModel
from support.serving import serve

from lmforge.config import ServerConfig
from lmforge.engine.request import RequestOutput
from lmforge.errors import EngineDeadError
from lmforge.server import build_app
from lmforge.server.generation import sse_events

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]


def chat(**overrides):
    return {"json": {"model": "MODEL", "messages": USER, **overrides}}


# (id, method, path, request kwargs for httpx, status, param, text the message must contain)
CASES = [
    ("malformed-json", "POST", CHAT, {"content": b'{"model": ', "headers": {
        "content-type": "application/json"}}, 400, None, "could not parse the JSON"),
    ("array-body", "POST", CHAT, {"json": [1, 2]}, 400, None, "JSON object"),
    ("empty-body", "POST", CHAT, {"content": b""}, 400, None, "empty"),
    ("unknown-model", "POST", CHAT, {"json": {"model": "gpt-9", "messages": USER}}, 404, "model",
     "The model `gpt-9` does not exist."),
    ("temperature-type", "POST", CHAT, chat(temperature="hot"), 400, "temperature", "number"),
    ("temperature-range", "POST", CHAT, chat(temperature=5), 400, "temperature", "between 0 and 2"),
    ("max-tokens-0", "POST", CHAT, chat(max_tokens=0), 400, "max_tokens", "at least 1"),
    ("max-completion-tokens-0", "POST", CHAT, chat(max_completion_tokens=0), 400,
     "max_completion_tokens", "at least 1"),
    ("unknown-field", "POST", CHAT, chat(foo=1), 400, "foo",
     "Unrecognized request argument supplied: foo"),
    ("n-0", "POST", CHAT, chat(n=0), 400, "n", "between 1 and 128"),
    ("n-129", "POST", COMPLETIONS, {"json": {"model": "MODEL", "prompt": "a", "n": 129}}, 400,
     "n", "between 1 and 128"),
    ("best-of-below-n", "POST", COMPLETIONS, {"json": {"model": "MODEL", "prompt": "a",
     "best_of": 1, "n": 2}}, 400, "best_of", "between n (2) and 20"),
    ("top-logprobs-range", "POST", CHAT, chat(logprobs=True, top_logprobs=21), 400,
     "top_logprobs", "between 0 and 20"),
    ("top-logprobs-without-logprobs", "POST", CHAT, chat(top_logprobs=2), 400, "logprobs",
     "logprobs must be set to true"),
    ("tool-choice-without-tools", "POST", CHAT, chat(tool_choice="required"), 400,
     "tool_choice", "only allowed when tools"),
    ("response-format-type", "POST", CHAT, chat(response_format={"type": "yaml"}), 400,
     "response_format", "must be one of"),
    ("invalid-json-schema", "POST", CHAT, chat(response_format={"type": "json_schema",
     "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}), 400, "response_format",
     "Invalid JSON schema"),
    ("invalid-regex", "POST", COMPLETIONS, {"json": {"model": "MODEL", "prompt": "a",
     "regex": "([a-z]"}}, 400, "regex", "Invalid regex"),
    ("nan-temperature", "POST", CHAT, {"content": b'{"model": "MODEL", "messages": [{"role": '
     b'"user", "content": "Hi"}], "temperature": NaN}'}, 400, "temperature", "finite"),
    ("infinite-top-p", "POST", CHAT, {"content": b'{"model": "MODEL", "messages": [{"role": '
     b'"user", "content": "Hi"}], "top_p": Infinity}'}, 400, "top_p", "finite"),
    ("too-many-stops", "POST", CHAT, chat(stop=[f"s{i}" for i in range(17)]), 400, "stop",
     "at most 16"),
    ("logit-bias-key", "POST", CHAT, chat(logit_bias={"x": 5}), 400, "logit_bias", "token ids"),
    ("logit-bias-range", "POST", CHAT, chat(logit_bias={"1": 150}), 400, "logit_bias",
     "between -100 and 100"),
    ("logit-bias-out-of-vocab", "POST", CHAT, chat(logit_bias={"1000000": 1}), 400, "logit_bias",
     "outside the vocabulary"),
    ("stream-options-without-stream", "POST", CHAT, chat(stream_options={"include_usage": True}),
     400, "stream_options", "stream"),
    ("empty-messages", "POST", CHAT, chat(messages=[]), 400, "messages", "at least one"),
    ("missing-messages", "POST", CHAT, {"json": {"model": "MODEL"}}, 400, "messages",
     "Missing required parameter"),
    ("bad-role", "POST", CHAT, chat(messages=[{"role": "bot", "content": "x"}]), 400,
     "messages[0].role", "'user'"),
    ("image-part", "POST", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), 400,
     "messages[0].content[0].type", "'text'"),
    ("stop-type", "POST", CHAT, chat(stop=5), 400, "stop", "valid"),
    ("token-out-of-vocab", "POST", COMPLETIONS, {"json": {"model": "MODEL",
     "prompt": [1, 10**6]}}, 400, "prompt", "outside the vocabulary"),
    ("empty-prompt", "POST", COMPLETIONS, {"json": {"model": "MODEL", "prompt": ""}}, 400,
     "prompt", "empty"),
    ("completion-logprobs-range", "POST", COMPLETIONS, {"json": {"model": "MODEL", "prompt": "a",
     "logprobs": 6}}, 400, "logprobs", "between 0 and 5"),
    ("suffix", "POST", COMPLETIONS, {"json": {"model": "MODEL", "prompt": "a", "suffix": "b"}},
     400, "suffix", "not supported"),
    ("lone-surrogate-content", "POST", CHAT, {"content": b'{"model": "MODEL", "messages": '
     b'[{"role": "user", "content": "\\udb6d"}]}'}, 400, None, "messages[0].content holds a lone"),
    ("lone-surrogate-prompt", "POST", COMPLETIONS, {"content": b'{"model": "MODEL", "prompt": '
     b'["ok", "a\\udc00b"]}'}, 400, None, "prompt[1] holds a lone UTF-16 surrogate"),
    ("lone-surrogate-key", "POST", CHAT, {"content": b'{"model": "MODEL", "messages": [], '
     b'"\\ud800": 1}'}, 400, None, "lone UTF-16 surrogate"),
    ("stream-string", "POST", CHAT, chat(stream="True"), 400, "stream", "valid boolean"),
    ("echo-string", "POST", COMPLETIONS, {"json": {"model": "MODEL", "prompt": "a",
     "echo": "true"}}, 400, "echo", "valid boolean"),
    ("max-tokens-string", "POST", CHAT, chat(max_tokens="5"), 400, "max_tokens", "valid integer"),
    ("temperature-string", "POST", CHAT, chat(temperature="0.5"), 400, "temperature",
     "valid number"),
    ("content-and-message", "POST", CHAT, chat(messages=[{"role": "user", "content": "a",
     "message": "b"}]), 400, "message", "alias"),
    ("embeddings-bad-input-type", "POST", "/v1/embeddings", {"json": {"model": "MODEL",
     "input": {"text": "x"}}}, 400, "input", "valid"),
    ("get-on-post-route", "GET", CHAT, {}, 405, None, "GET /v1/chat/completions"),
    ("unknown-path", "POST", "/v1/nothing", {"json": {}}, 404, None, "Invalid URL"),
    ("unknown-model-card", "GET", "/v1/models/gpt-9", {}, 404, "model", "gpt-9"),
]


def _with_model(kwargs: dict, model: str) -> dict:
    if isinstance(kwargs.get("json"), dict) and kwargs["json"].get("model") == "MODEL":
        return {**kwargs, "json": {**kwargs["json"], "model": model}}
    if isinstance(kwargs.get("content"), bytes) and b'"MODEL"' in kwargs["content"]:
        return {**kwargs, "content": kwargs["content"].replace(b'"MODEL"', f'"{model}"'.encode())}
    return kwargs


def assert_envelope(resp) -> dict:
    body = resp.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_error_table(base_url, model, case):
    """Each bad request gets its status and the envelope, and the client keeps its keep-alive
    connection: the next request on the same socket is served."""
    _, method, path, kwargs, status, param, text = case
    kwargs = _with_model(kwargs, model)
    connection = KeepAlive(base_url)
    got, _, body = connection.request(method, path, json=kwargs.get("json"),
                                      content=kwargs.get("content"),
                                      headers=kwargs.get("headers"))
    assert got == status, body
    error = assert_envelope(httpx.Response(got, content=body))
    assert error["param"] == param
    assert text in error["message"]
    if status == 400:
        assert error["type"] == "invalid_request_error"
    assert connection.request("GET", "/v1/models")[0] == 200 and connection.same_socket
    connection.close()


def test_server_still_answers_after_the_table(http, model, wait_idle):
    resp = http.post(CHAT, json={"model": model, "messages": USER, "max_tokens": 2})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] >= 1
    wait_idle(5.0)  # no failed request left anything behind


def test_sdk_raises_typed_errors(client, model):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=USER)
    assert info.value.code == "model_not_found" and info.value.param == "model"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=USER, temperature=5, stream=True)
    assert info.value.param == "temperature"


def test_unexpected_exception_is_a_generic_500(engine):
    app = build_app(engine, ServerConfig())

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret internal detail")

    resp = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert resp.status_code == 500
    error = assert_envelope(resp)
    assert error["type"] == "server_error" and "secret" not in resp.text


def test_a_500_keeps_the_keep_alive_connection(engine):
    """Starlette re-raises after its 500 and uvicorn then drops the connection; the error
    boundary answers instead, so the next request on the same socket is served."""
    app = build_app(engine, ServerConfig(fine_tuning=False))

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret internal detail")

    with serve(app, lifespan="off") as url:
        connection = KeepAlive(url)
        status, _, body = connection.request("GET", "/boom")
        assert status == 500 and b"secret" not in body
        assert connection.request("GET", "/health")[0] == 200 and connection.same_socket


def test_api_keys_are_enforced_on_v1_only(engine):
    client = TestClient(build_app(engine, ServerConfig(api_keys=["k1", "k2"])))
    assert client.get("/health").json() == {"status": "ok"}
    resp = client.get("/v1/models")
    assert resp.status_code == 401 and assert_envelope(resp)["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_context_length_error_names_the_numbers(http, model, engine, stream):
    n = len(engine.tokenizer.apply_chat_template(USER))
    resp = http.post(CHAT, json={"model": model, "messages": USER, "max_tokens": 500,
                                 "stream": stream})
    assert resp.status_code == 400  # a plain HTTP error even when streaming was asked for
    error = assert_envelope(resp)
    assert error["code"] == "context_length_exceeded"
    assert (f"maximum context length is 512 tokens. However, you requested {n + 500} tokens "
            f"({n} in the prompt, 500 for the completion)") in error["message"]


class _Chunk(BaseModel):
    text: str


class _FailingGeneration:
    """Yields one delta, then the engine dies: what a stream sees after its headers went out."""

    id = "chatcmpl-test"
    closed = False

    async def outputs(self):
        yield 0, RequestOutput("r", "Hel", [1], False, None, 3, 0, 1)
        raise EngineDeadError("the engine loop failed; restart the server")

    async def aclose(self):
        self.closed = True


def test_error_after_stream_started_is_an_sse_error_event():
    gen = _FailingGeneration()

    async def collect() -> list[str]:
        return [e async for e in sse_events(gen, lambda i, out, r: _Chunk(text=out.text), [],
                                             None)]

    events = asyncio.run(collect())
    assert events[0] == 'data: {"text":"Hel"}\n\n'
    assert json.loads(events[1].removeprefix("data: "))["error"]["code"] == "engine_dead"
    assert events[2:] == ["data: [DONE]\n\n"] and gen.closed
