"""Helpers of the batch tests: a server with its own engine and jobs store, batch input files,
and reading a batch's results back."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
from support.serving import serve

from lmforge.config import CacheConfig, EngineConfig, ModelConfig, ServerConfig
from lmforge.engine.async_engine import AsyncEngine
from lmforge.jobs.store import Store
from lmforge.server import build_app

FINAL = {"completed", "failed", "expired", "cancelled"}


@contextmanager
def batch_server(model_dir: Path, home: Path, **server: Any) -> Iterator[openai.OpenAI]:
    """An ``openai`` client of a fresh server (own engine, own store under ``home``, the app's
    lifespan on, so its batch worker runs) on the tiny model; ``server``: ServerConfig fields."""
    engine = AsyncEngine.from_config(EngineConfig(model=ModelConfig(model=str(model_dir)),
                                                  cache=CacheConfig(num_blocks=128)))
    app = build_app(engine, ServerConfig(**server), store=Store(home=home))
    with serve(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)
        client.model_name = engine.model_name  # type: ignore[attr-defined]
        yield client


def line(custom_id: str, body: dict[str, Any], url: str = "/v1/chat/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def upload(client: openai.OpenAI, lines: list[str], tmp_path: Path) -> str:
    path = tmp_path / f"input-{time.monotonic_ns()}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="batch").id


def wait_status(client: openai.OpenAI, batch_id: str, statuses: set[str] = FINAL,
                timeout_s: float = 60.0) -> Any:
    """Poll until the batch is in one of ``statuses``; also checks the status never goes back."""
    order = ["validating", "in_progress", "finalizing", "cancelling", "completed", "failed",
             "expired", "cancelled"]
    seen = -1
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        rank = order.index(batch.status)
        assert rank >= seen, (batch.status, order[seen])
        seen = max(seen, rank)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status} after {timeout_s} s"
        time.sleep(0.1)


def results(client: openai.OpenAI, batch: Any) -> tuple[list[dict], list[dict]]:
    """(output records, error records) of a finished batch."""
    def read(file_id: str | None) -> list[dict]:
        if file_id is None:
            return []
        text = client.files.content(file_id).read().decode()
        return [json.loads(x) for x in text.splitlines() if x.strip()]

    return read(batch.output_file_id), read(batch.error_file_id)


class ServerProcess:
    """``lmforge serve`` on the tiny model as a real subprocess with its own ``LMFORGE_HOME``;
    ``start()`` returns an ``openai`` client once it serves, ``kill()`` sends SIGKILL."""

    def __init__(self, model_dir: Path, home: Path, *args: str):
        self.cmd = [sys.executable, "-m", "lmforge.cli", "serve", "--model", str(model_dir),
                    "--served-model-name", "tiny", "--port", "0", "--num-kv-blocks", "128",
                    "--log-level", "warning", *args]
        self.env = {**os.environ, "LMFORGE_HOME": str(home)}
        self.proc: subprocess.Popen | None = None
        self.output: list[str] = []  # every line the server printed, all starts together

    def start(self) -> openai.OpenAI:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=self.env)
        lines: queue.Queue = queue.Queue()

        def read(stdout) -> None:
            for text in stdout:
                self.output.append(text)
                lines.put(text)

        threading.Thread(target=read, args=(self.proc.stdout,), daemon=True).start()
        while True:
            text = lines.get(timeout=60).strip()
            if match := re.match(r"lmforge serving tiny on (http://\S+/v1)$", text):
                client = openai.OpenAI(base_url=match.group(1), api_key="x", max_retries=0,
                                       timeout=30)
                client.model_name = "tiny"  # type: ignore[attr-defined]
                return client

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
