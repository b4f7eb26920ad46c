"""A real ``lmforge serve`` subprocess with its own ``LMFORGE_HOME``, as a user starts it (the
seed tests' server, and the pretraining test's)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LmforgeServe:
    """``lmforge serve ARGS`` as a subprocess; ``wait()`` blocks until /health is 200.

    Its output is kept in ``output`` (and shown by pytest when a test fails)."""

    def __init__(self, args: list[str], home: Path):
        self.cmd = [sys.executable, "-m", "lmforge.cli", "serve", *args]
        self.env = {**os.environ, "LMFORGE_HOME": str(home)}
        self.output: list[str] = []
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=self.env)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.output.append(line)

    def wait(self, url: str, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("lmforge serve exited:\n" + "".join(self.output[-40:]))
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError("lmforge serve did not become healthy:\n" + "".join(self.output[-40:]))

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        print("".join(self.output[-60:]))  # shown with a failing test's captured output
