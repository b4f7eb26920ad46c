"""Fixtures of the server, client and CLI tests: one real engine on the tiny random Llama, served
by uvicorn on a free loopback port in a background thread for the whole session, and the clients
that drive it.

Everything goes over real HTTP, so the tests see exactly what the ``openai`` SDK and curl see.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from lmforge.config import CacheConfig, EngineConfig, ModelConfig, ServerConfig
from lmforge.engine.async_engine import AsyncEngine
from lmforge.server import build_app


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 (port 0: the OS picks a free one) in a thread."""

    def __init__(self, app: FastAPI):
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start; see the log above")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def engine(tiny_llama_dir) -> Iterator[AsyncEngine]:
    """The real engine on the tiny Llama (context 512); 128 blocks x 16 tokens of KV cache."""
    config = EngineConfig(model=ModelConfig(model=str(tiny_llama_dir)),
                          cache=CacheConfig(num_blocks=128))
    engine = AsyncEngine.from_config(config)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def long_engine(tiny_llama_dir, tmp_path_factory) -> Iterator[AsyncEngine]:
    """The tiny Llama with its context raised to 16384 tokens (1024 blocks, 8 MB of KV cache),
    so that one request can decode for many seconds: the disconnect tests need requests that
    cannot finish before the client leaves."""
    directory = tmp_path_factory.mktemp("tiny_llama_long")
    shutil.copytree(tiny_llama_dir, directory, dirs_exist_ok=True)
    config = json.loads((directory / "config.json").read_text())
    config["max_position_embeddings"] = 16384
    (directory / "config.json").write_text(json.dumps(config))
    engine = AsyncEngine.from_config(EngineConfig(model=ModelConfig(model=str(directory)),
                                                  cache=CacheConfig(num_blocks=1024)))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def long_base_url(long_engine) -> Iterator[str]:
    # no fine-tuning worker: it would train the session store's jobs (test_fine_tuning_api.py)
    with ServerThread(build_app(long_engine, ServerConfig(fine_tuning=False))) as url:
        yield url


@pytest.fixture(scope="session")
def base_url(engine) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of the served app (the lifespan starts the engine). It runs
    no fine-tuning jobs (tests/server/test_fine_tuning_api.py trains on a server of its own)."""
    with ServerThread(build_app(engine, ServerConfig(fine_tuning=False))) as url:
        yield url


@pytest.fixture(scope="session")
def model(engine) -> str:
    return engine.model_name


@pytest.fixture(scope="session")
def client(base_url) -> openai.OpenAI:
    """The official SDK, no retries (a retry would hide a failure)."""
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=30)


@pytest.fixture(scope="session")
def http(base_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30) as c:
        yield c


def make_wait_idle(engine: AsyncEngine) -> Callable[[float], float]:
    def wait(deadline_s: float = 5.0) -> float:
        start = time.monotonic()
        while True:
            stats = engine.stats()
            if (stats.num_running == 0 and stats.num_waiting == 0
                    and stats.num_free_blocks == stats.num_total_blocks):
                return time.monotonic() - start
            if time.monotonic() - start > deadline_s:
                pytest.fail(f"engine not idle within {deadline_s} s: {stats}")
            time.sleep(0.01)

    return wait


@pytest.fixture
def wait_idle(engine) -> Callable[[float], float]:
    """``wait_idle(deadline_s)``: poll until the engine has no request and every KV block is
    free; returns the seconds it took, fails after the deadline."""
    return make_wait_idle(engine)


@pytest.fixture
def long_wait_idle(long_engine) -> Callable[[float], float]:
    return make_wait_idle(long_engine)


@pytest.fixture(scope="session")
def smollm2_base_url() -> Iterator[str]:
    """The real default model (SmolLM2-135M-Instruct GGUF) served like the tiny one; context cut
    to 1024 tokens and 64 KV blocks to keep memory small. Loading takes ~10 s."""
    config = EngineConfig(model=ModelConfig(max_model_len=1024), cache=CacheConfig(num_blocks=64))
    engine = AsyncEngine.from_config(config)
    try:
        with ServerThread(build_app(engine, ServerConfig(fine_tuning=False))) as url:
            yield url
    finally:
        engine.shutdown()
