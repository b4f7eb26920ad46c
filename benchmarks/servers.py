"""The servers a benchmark starts: ``lmforge serve`` and llama.cpp's ``llama-server`` as
subprocesses, each waited for until ``GET /health`` answers 200 (and timed), its resident memory
read, and stopped. ``serve.py`` and the other benchmarks share them."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


def lmforge_command(args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "lmforge.cli", "serve", "--model", args.model,
            "--host", "127.0.0.1", "--port", str(args.port), *shlex.split(args.serve_args)]


def llama_server_command(args: argparse.Namespace) -> list[str]:
    """``llama-server`` on the GGUF lmforge resolves ``--model`` to."""
    from lmforge.models.loader import resolve_model_path

    path, _ = resolve_model_path(args.model)
    peer_args = args.peer_args or (f"-t {args.threads or os.cpu_count()} --parallel 16 "
                                   "-c 32768")
    return [args.peer_llama_server, "-m", str(path), "--host", "127.0.0.1",
            "--port", str(args.port), *shlex.split(peer_args)]


def start_server(args: argparse.Namespace, log_path: Path) -> subprocess.Popen:
    """Start ``lmforge serve`` and wait until it is healthy (``start_process``)."""
    return start_process(args, lmforge_command(args), log_path)[0]


def start_process(args: argparse.Namespace, cmd: list[str], log_path: Path
                  ) -> tuple[subprocess.Popen, float]:
    """Start a server and wait until ``GET /health`` answers 200; (process, seconds it took).

    Raises:
        RuntimeError: the server exited, or was not healthy within ``--startup-timeout`` seconds.
    """
    import httpx

    print("starting:", " ".join(cmd), f"(log: {log_path})", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    while time.monotonic() < start + args.startup_timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{args.port}/health", timeout=2).status_code == 200:
                return proc, time.monotonic() - start
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.05)
    stop_server(proc)
    raise RuntimeError(f"{cmd[0]} not healthy after {args.startup_timeout} s; see {log_path}")


def resident_mb(proc: subprocess.Popen) -> float | None:
    """The process's resident set (``/proc/PID/status`` VmRSS) in MB; None off Linux."""
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def stop_server(proc: subprocess.Popen) -> None:
    """Terminate the server, then kill it if it has not exited within 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
