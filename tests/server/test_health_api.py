"""GET /health: 200 ``{"status": "ok"}``; 503 while the model loads (the /v1 routes too), when
loading failed, when the engine loop died, and when it has not stepped within the watchdog."""

from __future__ import annotations

import shutil
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest
from support.serving import serve, stalled, wait_for

from lmforge.config import CacheConfig, EngineConfig, ModelConfig, ServerConfig
from lmforge.engine.async_engine import AsyncEngine
from lmforge.errors import ModelLoadError
from lmforge.server import build_app, build_loading_app


def test_health_ok(http):
    resp = http.get("/health")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}


def test_watchdog_reports_a_stalled_engine_loop(engine, base_url, model, monkeypatch):
    # more than the idle loop's 1 s heartbeat, so only the stall can trip it
    app = build_app(engine, ServerConfig(watchdog_timeout=1.5))
    with serve(app, lifespan="off") as url, ThreadPoolExecutor(1) as pool:
        assert httpx.get(f"{url}/health").status_code == 200
        with stalled(engine, monkeypatch) as release:
            reply = pool.submit(httpx.post, f"{url}/v1/completions", timeout=30, json={
                "model": model, "prompt": "Hi", "max_tokens": 2})
            wait_for(lambda: httpx.get(f"{url}/health").status_code == 503, "a 503")
            body = httpx.get(f"{url}/health").json()
            release.set()
            assert reply.result(timeout=30).status_code == 200
        assert body["status"] == "unhealthy" and "watchdog 1.5 s" in body["reason"]
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, "healthy again")


def test_dead_engine_loop_is_unhealthy(engine, base_url, http, monkeypatch):
    monkeypatch.setattr(engine, "error", RuntimeError("boom"))
    resp = http.get("/health")
    assert resp.status_code == 503 and resp.json()["status"] == "unhealthy"
    assert "died" in resp.json()["reason"]


@pytest.fixture
def other_tiny_dir(tiny_llama_dir, tmp_path):
    """The tiny Llama under another name, so a model id proves which engine answers."""
    directory = tmp_path / "tiny-late"
    shutil.copytree(tiny_llama_dir, directory)
    return directory


def test_loading_answers_503_until_ready(other_tiny_dir):
    loading: Future = Future()
    app = build_loading_app(loading, ServerConfig(api_keys=["k"]))
    auth = {"Authorization": "Bearer k"}
    with serve(app) as url:
        resp = httpx.get(f"{url}/health")
        assert resp.status_code == 503 and resp.json()["status"] == "loading"
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"),
                             ("POST", "/tokenize")]:
            resp = httpx.request(method, url + path, headers=auth, json={})
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"]["code"] == "model_loading"
            assert resp.headers["retry-after"] == "5"
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key still comes first
        assert httpx.get(f"{url}/metrics", headers=auth).status_code == 200
        # files and batches need the store, not the model: they answer while it loads
        assert httpx.get(f"{url}/v1/files", headers=auth).status_code == 200
        assert httpx.get(f"{url}/v1/batches", headers=auth).status_code == 200

        loading.set_result(AsyncEngine.from_config(EngineConfig(
            model=ModelConfig(model=str(other_tiny_dir)), cache=CacheConfig(num_blocks=32))))
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, "ready")
        assert httpx.get(f"{url}/v1/models", headers=auth).json()["data"][0]["id"] == "tiny-late"
        resp = httpx.post(f"{url}/v1/completions", headers=auth, timeout=30, json={
            "model": "tiny-late", "prompt": "Hi", "max_tokens": 2})
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] >= 1


def test_failed_load_is_unhealthy():
    loading: Future = Future()
    with serve(build_loading_app(loading, ServerConfig())) as url:
        loading.set_exception(ModelLoadError("model 'x' not found"))
        wait_for(lambda: httpx.get(f"{url}/health").json()["status"] == "unhealthy", "unhealthy")
        resp = httpx.get(f"{url}/health")
        assert resp.status_code == 503 and "loading the model failed" in resp.json()["reason"]
        assert "'x'" not in resp.text  # /health is open: the details stay in the log
        resp = httpx.get(f"{url}/v1/models")
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "model_load_failed"
