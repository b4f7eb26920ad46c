"""``lmforge serve`` on SIGTERM: stops accepting connections, lets in-flight requests finish
within --shutdown-timeout, aborts the rest with an error the client can read, exits with 0.

Real subprocesses on the tiny Llama with its context raised to 16384 tokens, so that a stream
can outlast the shutdown timeout.
"""

from __future__ import annotations

import json
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest


class ServeProcess:
    """``lmforge serve`` in a subprocess; ``url`` once it announces it serves the model."""

    def __init__(self, model_dir: Path, *args: str):
        cmd = [sys.executable, "-m", "lmforge.cli", "serve", "--model", str(model_dir),
               "--served-model-name", "tiny", "--port", "0", "--num-kv-blocks", "1100",
               "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = ""

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_ready(self) -> str:
        while not self.url:
            line = self.lines.get(timeout=60)
            if match := re.match(r"lmforge serving tiny on (http://\S+)/v1$", line.strip()):
                self.url = match.group(1)
        return self.url

    def refuses_connections(self) -> bool:
        address = urlparse(self.url)
        try:
            socket.create_connection((address.hostname, address.port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:  # queued just before the listener closed: try again
            pass
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def long_tiny_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_llama_16k")
    shutil.copytree(tiny_llama_dir, directory, dirs_exist_ok=True)
    config = json.loads((directory / "config.json").read_text())
    config["max_position_embeddings"] = 16384
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def open_stream(client: httpx.Client, max_tokens: int) -> tuple[httpx.Response, Iterator[str]]:
    """Start a streamed completion (with a usage chunk) and read its first event: the request
    is running."""
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    resp = client.send(client.build_request("POST", "/v1/completions", json=body), stream=True)
    assert resp.status_code == 200
    lines = (line for line in resp.iter_lines() if line)
    assert next(lines).startswith("data: {")
    return resp, lines


@pytest.fixture(scope="module")
def servers(long_tiny_dir) -> Iterator[dict[str, ServeProcess]]:
    """A patient server (60 s to drain) and an impatient one (1 s), started together: their
    startup (imports, loading) is most of the cost."""
    procs = {"patient": ServeProcess(long_tiny_dir, "--shutdown-timeout", "60"),
             "impatient": ServeProcess(long_tiny_dir, "--shutdown-timeout", "1")}
    try:
        for p in procs.values():
            p.wait_ready()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def events_of(lines: Iterator[str]) -> list[dict]:
    events = list(lines)
    assert events[-1] == "data: [DONE]"
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]]


def test_sigterm_lets_the_stream_finish_and_exits_0(servers):
    server = servers["patient"]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        resp, lines = open_stream(client, max_tokens=64)  # running when the signal comes
        server.proc.send_signal(signal.SIGTERM)
        refused = False
        while not refused and server.proc.poll() is None:
            refused = server.refuses_connections()
        assert refused and server.proc.poll() is None  # not listening, still serving
        try:
            events = events_of(lines)
        finally:
            resp.close()
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 64
    assert server.proc.wait(timeout=30) == 0, "".join(server.output)


def test_shutdown_timeout_aborts_with_an_error_and_exits_0(servers):
    """16000 tokens take far longer than the 1 s timeout: the stream ends with an error event
    (not a cut connection) and [DONE], and the process exits with 0."""
    server = servers["impatient"]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        resp, lines = open_stream(client, max_tokens=16000)
        server.proc.send_signal(signal.SIGTERM)
        try:
            events = events_of(lines)
        finally:
            resp.close()
    error = events[-1]["error"]
    assert error["code"] == "shutting_down" and error["type"] == "server_error"
    assert server.proc.wait(timeout=30) == 0, "".join(server.output)
