"""Helpers of the operations tests: serve one more app over real HTTP, and stall an engine.

``serve(app, lifespan="off")`` runs an app built on the session engine without letting its
lifespan shut that engine down at the end. ``stalled(engine)`` blocks the engine loop inside
``LLMEngine.step`` until released, so a test controls when requests get their first token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn
from fastapi import FastAPI


@contextmanager
def serve(app: FastAPI, lifespan: str = "on") -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of ``app`` served by uvicorn in a thread (port 0: any free)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            lifespan=lifespan, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-ops", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start; see the log above")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def stalled(engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Make the engine loop block at its next ``step()`` until the yielded event is set (set
    at the end in any case, so the shared engine never stays blocked)."""
    release = threading.Event()
    step = engine.engine.step

    def blocked_step():
        release.wait(timeout=60)
        return step()

    monkeypatch.setattr(engine.engine, "step", blocked_step)
    try:
        yield release
    finally:
        release.set()
        monkeypatch.setattr(engine.engine, "step", step)


def wait_for(predicate, what: str, deadline_s: float = 10.0) -> None:
    """Poll ``predicate()`` until true; fail naming ``what`` after the deadline."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > deadline_s:
            pytest.fail(f"{what} did not happen within {deadline_s} s")
        time.sleep(0.01)
