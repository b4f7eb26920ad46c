"""API keys: ``Authorization: Bearer KEY`` or ``x-api-key: KEY`` on every route but GET /health
(unknown URLs and routes added by any router included), 401 in the OpenAI envelope otherwise."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.serving import serve

from lmforge.config import ServerConfig
from lmforge.server import build_app

KEYS = ["key-one", "key-two"]

# every kind of route: inference, models, tokenize, metrics, embeddings (if present) and
# URLs no router serves; the gate answers before routing, so all are 401 alike
ROUTES = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
          ("GET", "/v1/models/x"), ("POST", "/v1/embeddings"), ("POST", "/tokenize"),
          ("POST", "/detokenize"), ("GET", "/metrics"), ("GET", "/no/such/url"),
          ("POST", "/health"), ("GET", "/docs")]


@pytest.fixture(scope="module")
def keyed_url(engine, base_url):  # base_url: the session engine is started
    with serve(build_app(engine, ServerConfig(api_keys=KEYS)), lifespan="off") as url:
        yield url


def assert_401(resp: httpx.Response) -> dict:
    assert resp.status_code == 401, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize("method,path", ROUTES)
def test_every_route_needs_a_key(keyed_url, method, path):
    error = assert_401(httpx.request(method, keyed_url + path, json={}))
    assert "didn't provide an API key" in error["message"]


@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}, {"Authorization": "key-one"},
    {"Authorization": "Basic key-one"}, {"Authorization": "Bearer key-one-and-more"},
    {"Authorization": "Bearer"}, {"Authorization": "Bearer \u00e9t\u00e9"}])
def test_wrong_keys_are_refused(keyed_url, headers):
    # bytes: httpx sends non-ASCII header values only as raw bytes
    resp = httpx.get(f"{keyed_url}/v1/models",
                     headers={k: v.encode("utf-8") for k, v in headers.items()})
    assert_401(resp)


@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer key-one"}, {"authorization": "bearer key-two"},
    {"x-api-key": "key-two"}, {"x-api-key": "wrong", "Authorization": "Bearer key-one"}])
def test_good_keys_pass(keyed_url, headers):
    resp = httpx.get(f"{keyed_url}/v1/models", headers=headers)
    assert resp.status_code == 200, resp.text
    resp = httpx.post(f"{keyed_url}/tokenize", headers=headers, json={"prompt": "Hi"})
    assert resp.status_code == 200, resp.text


def test_health_is_open(keyed_url):
    resp = httpx.get(f"{keyed_url}/health")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}


def test_a_key_reaches_unknown_urls_only_as_404(keyed_url):
    resp = httpx.get(f"{keyed_url}/no/such/url", headers={"x-api-key": "key-one"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_url"


def test_openai_sdk_api_key(keyed_url, model):
    good = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key="key-two", max_retries=0)
    assert [m.id for m in good.models.list()] == [model]
    reply = good.chat.completions.create(model=model, max_tokens=2,
                                         messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].finish_reason in ("stop", "length")
    bad = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.completions.create(model=model, prompt="Hi", max_tokens=2)
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"


def test_refusals_are_counted_under_their_route(keyed_url):
    assert_401(httpx.get(f"{keyed_url}/v1/models/some-model"))
    text = httpx.get(f"{keyed_url}/metrics", headers={"x-api-key": "key-one"}).text
    counts = {tuple(sorted(s.labels.items())): s.value
              for family in text_string_to_metric_families(text) for s in family.samples
              if s.name == "lmforge:http_requests_total"}
    labels = (("handler", "/v1/models/{model_id:path}"), ("method", "GET"), ("status", "401"))
    assert counts[labels] >= 1
