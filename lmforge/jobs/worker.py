"""What the job workers share: the polling task that drives stored jobs (``PollingWorker``) and
the in-process HTTP client through which a job calls the serving app (``in_process_client``).

The batch worker (``jobs/batch_worker.py``) and the fine-tuning worker
(``jobs/fine_tuning_worker.py``) are ``PollingWorker``s started by the app's lifespan.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

logger = logging.getLogger(__name__)

# ASGI scope keys only in-process code can set (an HTTP client cannot): the engine priority of
# the request, and that it comes from inside the server (no API key needed).
PRIORITY_SCOPE_KEY = "lmforge.priority"
INTERNAL_SCOPE_KEY = "lmforge.internal"


def in_process_client(app: Any, priority: int = 0) -> httpx.AsyncClient:
    """An httpx client whose requests go straight to the ASGI ``app`` (no socket), marked
    internal and with ``priority``. App exceptions become 500 responses, never raise here."""
    async def scoped(scope: dict, receive: Any, send: Any) -> None:
        await app({**scope, PRIORITY_SCOPE_KEY: priority, INTERNAL_SCOPE_KEY: True},
                  receive, send)

    transport = httpx.ASGITransport(app=scoped, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://lmforge.internal",
                             timeout=None)


class PollingWorker:
    """A task in the server's event loop that drives stored jobs: ``drive_all()`` every
    ``poll_s`` seconds, or at once after ``wake()``. Subclasses implement ``drive_all``."""

    def __init__(self, poll_s: float):
        self.poll_s = poll_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def wake(self) -> None:
        """A job was created or cancelled: look now."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop at once; work in flight is aborted and resumed after a restart."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def drive_all(self) -> None:
        raise NotImplementedError

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.drive_all()
            except asyncio.CancelledError:
                raise
            except Exception:  # a store hiccup must not end the worker; try again later
                logger.exception("%s error; retrying in %g s", type(self).__name__, self.poll_s)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_s)
            except asyncio.TimeoutError:
                pass
