"""One engine replica on Ray Serve: a whole ``lmforge serve`` (engine, routes, job workers) in
a Serve replica actor, answering the requests the ingress forwards as data.

The replica builds the same FastAPI app as ``lmforge serve`` (``server.build_app``) over its
own engine and runs that app's lifespan itself (there is no uvicorn in the actor), so each
replica serves every route: chat, completions, embeddings, models, and files, batches and
fine-tuning jobs on the shared store (``ServerConfig.database_url``; the job leases make one
replica drive each job). Fine-tuned models load on first use from the store, on any replica.

Ray Serve calls ``check_health`` every few seconds; it raises once the engine loop died, and
Serve then replaces the replica (as it does when the actor's process dies).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator

from lmforge.cluster.asgi_call import ProxiedRequest, ResponseHead, call_app, iterate_app
from lmforge.config import EngineConfig, ServerConfig

logger = logging.getLogger(__name__)

# the response header that names the replica which answered (tests and operators read it)
REPLICA_HEADER = b"x-lmforge-replica"


class EngineReplica:
    """A Serve deployment class (``serve_app.build_application`` wraps it with
    ``serve.deployment``). Its constructor loads the model; Serve routes nothing to the
    replica before it returns.

    Args:
        engine_config: the model, cache and scheduler (as ``lmforge serve`` builds them).
        server_config: the HTTP side; its ``database_url`` and ``$LMFORGE_HOME`` must name
            storage every node shares for files, batches and fine-tuned adapters.
        name: this replica's name (``engine-0``, ...), sent back in ``x-lmforge-replica``.
        chat_template: Jinja text overriding the tokenizer's template, or None.
        num_threads: torch threads (the replica's CPUs); 0 leaves torch's default.

    Raises:
        ModelLoadError / ValueError: the model cannot be loaded (Serve reports the replica as
            failed to start, with this message).
    """

    async def __init__(self, engine_config: EngineConfig, server_config: ServerConfig,
                       name: str, chat_template: str | None = None, num_threads: int = 0):
        import torch

        from lmforge.engine.async_engine import AsyncEngine
        from lmforge.server import build_app

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        self.name = name
        self.engine = AsyncEngine.from_config(engine_config)
        self.app = build_app(self.engine, server_config, chat_template=chat_template)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # starts the engine loop and the job workers
        logger.info("replica %s (pid %d) serving %s", name, os.getpid(),
                    self.engine.model_name)

    async def handle(self, request: ProxiedRequest) -> tuple[ResponseHead, bytes]:
        """The whole response to ``request`` (for non-streamed requests)."""
        head, body = await call_app(self.app, request)
        head.headers.append((REPLICA_HEADER, self.name.encode()))
        return head, body

    async def handle_stream(self, request: ProxiedRequest
                            ) -> AsyncIterator[ResponseHead | bytes]:
        """The response as it is made: its ``ResponseHead``, then each body chunk (a Serve
        streaming method: ``handle.options(stream=True).handle_stream.remote(...)``)."""
        async for item in iterate_app(self.app, request):
            if isinstance(item, ResponseHead):
                item.headers.append((REPLICA_HEADER, self.name.encode()))
            yield item

    async def ping(self) -> str:
        """This replica's name once it serves (the ingress probes replicas it saw die)."""
        return self.name

    def check_health(self) -> None:
        """Serve's health check. Raises RuntimeError when the engine loop died (Serve then
        replaces this replica)."""
        if self.engine.error is not None:
            raise RuntimeError(f"replica {self.name}: the engine loop died: {self.engine.error}")

    async def __del__(self) -> None:
        await self._lifespan.__aexit__(None, None, None)
