"""``lmforge serve --ray``: N engine replicas as one Ray Serve application, one OpenAI endpoint.

::

    lmforge serve --ray --replicas 2 --replica-cpus 1            # a local Ray cluster
    lmforge serve --ray --ray-address 10.0.0.1:6379 --replicas 8 --replica-gpus 1

The application (named ``lmforge``, at route ``/``) is the ingress (``ingress.IngressCore``
behind a FastAPI app, Serve's HTTP proxy in front) bound to ``engine-0`` .. ``engine-{N-1}``:
one Serve deployment of one ``replica.EngineReplica`` each, so that the ingress, not Serve's
power-of-two-choices router, decides which replica serves a request (prefix affinity). Serve
replaces a replica whose actor dies or whose health check fails, as it would any deployment's.
Each replica holds ``replica_cpus`` CPUs and ``replica_gpus`` GPUs of the cluster.

Serve's HTTP proxy listens on every node at ``host:port``. A Serve instance already running on
the cluster keeps its own HTTP options (Serve starts once per cluster).
"""

# no ``from __future__ import annotations``: Serve's class-based routes re-create the route
# functions elsewhere, where FastAPI could not resolve string annotations
import signal
import threading
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request

from lmforge.cluster.ray_env import connect
from lmforge.cluster.replica import EngineReplica
from lmforge.cluster.router import RouterConfig
from lmforge.config import EngineConfig, ServerConfig

APP_NAME = "lmforge"
# requests one replica accepts at once; Serve's default (5) would starve continuous batching
_REPLICA_MAX_ONGOING = 1024
_INGRESS_MAX_ONGOING = 4096


@dataclass
class ReplicaPlan:
    """How many engine replicas, and what each holds of the cluster."""

    replicas: int = 1
    cpus: float = 1.0  # Ray CPUs per replica (also its torch threads, rounded down)
    gpus: float = 0.0  # Ray GPUs per replica

    def validate(self) -> None:
        """Raises ValueError naming the option and the fix."""
        if self.replicas < 1:
            raise ValueError(f"--replicas ({self.replicas}) must be at least 1")
        if self.cpus < 0 or self.gpus < 0:
            raise ValueError("--replica-cpus and --replica-gpus must be 0 or more")


def build_application(engine_config: EngineConfig, server_config: ServerConfig,
                      plan: ReplicaPlan, chat_template: str | None = None,
                      router_config: RouterConfig | None = None) -> Any:
    """The bound Serve application: the ingress over ``plan.replicas`` engine deployments."""
    from ray import serve

    engine = serve.deployment(EngineReplica, max_ongoing_requests=_REPLICA_MAX_ONGOING,
                              health_check_period_s=5, health_check_timeout_s=30)
    replicas = [
        engine.options(name=f"engine-{i}", num_replicas=1,
                       ray_actor_options={"num_cpus": plan.cpus, "num_gpus": plan.gpus})
        .bind(engine_config, server_config, f"engine-{i}", chat_template, int(plan.cpus))
        for i in range(plan.replicas)]
    ingress = serve.deployment(_ingress_class(serve), name="ingress",
                               max_ongoing_requests=_INGRESS_MAX_ONGOING,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(replicas, router_config)


def _ingress_class(serve: Any) -> type:
    """``IngressCore`` as a Serve ingress: FastAPI routes for /health, /metrics and every
    other path (forwarded)."""
    from lmforge.cluster.ingress import IngressCore

    app = FastAPI(title="lmforge (Ray Serve)", docs_url=None, redoc_url=None,
                  openapi_url=None)

    @serve.ingress(app)
    class LMForgeIngress(IngressCore):
        @app.get("/health")
        async def health_route(self, request: Request) -> Any:
            return await self.health(request)

        @app.get("/metrics")
        async def metrics_route(self, request: Request) -> Any:
            return await self.metrics(request)

        @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE", "PUT", "PATCH"])
        async def proxy_route(self, request: Request, path: str) -> Any:
            return await self.proxy(request)

    return LMForgeIngress


def serve_on_ray(engine_config: EngineConfig, server_config: ServerConfig, plan: ReplicaPlan,
                 ray_address: str | None = None, chat_template: str | None = None,
                 on_ready: Any = None) -> None:
    """Deploy the application on the cluster at ``ray_address`` (None: a local one), serve
    until SIGTERM or Ctrl-C, then delete it (its replicas shut their engines down).

    Raises:
        RayUnavailableError: no Ray, or no cluster at ``ray_address``.
    """
    plan.validate()
    connect(ray_address)
    from ray import serve

    serve.start(http_options={"host": server_config.host, "port": server_config.port})
    serve.run(build_application(engine_config, server_config, plan, chat_template),
              name=APP_NAME, route_prefix="/", blocking=False)
    if on_ready is not None:
        on_ready()
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        serve.delete(APP_NAME)
