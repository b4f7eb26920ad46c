"""``lmforge serve --ray``: the options that deploy the server as engine replicas on a Ray
cluster (``lmforge.cluster.serve_app``) instead of one engine in this process::

    lmforge serve --ray --replicas 2 --replica-cpus 1
    lmforge serve --ray --ray-address 10.0.0.1:6379 --replicas 4 --replica-gpus 1

Ray is the optional extra ``lmforge[ray]``; without it ``--ray`` fails with one line saying so.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from lmforge.config import EngineConfig, ServerConfig

_OPTIONS = [
    click.option("--ray", "ray", is_flag=True,
                 help="Serve as engine replicas on a Ray cluster (Ray Serve), one endpoint; "
                      "needs lmforge[ray]."),
    click.option("--ray-address", default=None, metavar="ADDR",
                 help="The Ray cluster to join (host:6379 or ray://host:10001; default: "
                      "RAY_ADDRESS, else a local cluster started here)."),
    click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Engine replicas (with --ray)."),
    click.option("--replica-cpus", type=click.FloatRange(min=0), default=1.0,
                 show_default=True, help="Ray CPUs per replica (with --ray)."),
    click.option("--replica-gpus", type=click.FloatRange(min=0), default=0.0,
                 show_default=True, help="Ray GPUs per replica (with --ray)."),
]
_KEYS = ("ray", "ray_address", "replicas", "replica_cpus", "replica_gpus")


def ray_options(command: Callable) -> Callable:
    """The ``--ray`` options, as one decorator for ``serve``."""
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def pop_ray_options(options: dict[str, Any]) -> dict[str, Any] | None:
    """Take the ``--ray`` options out of ``serve``'s ``options``; None without ``--ray``.

    Raises:
        click.UsageError: a replica option without ``--ray`` (it would do nothing)."""
    values = {key: options.pop(key) for key in _KEYS}
    if values.pop("ray"):
        return values
    source = click.get_current_context().get_parameter_source
    given = [f"--{key.replace('_', '-')}" for key in values
             if source(key) is not ParameterSource.DEFAULT]
    if given:
        raise click.UsageError(f"{', '.join(given)} only apply with --ray (replicas on a Ray "
                               "cluster); add --ray or drop them")
    return None


def serve_ray(values: dict[str, Any], config: EngineConfig, server_config: ServerConfig,
              model_name: str, chat_template: str | None) -> None:
    """Deploy and serve until SIGTERM/Ctrl-C. ``--port 0`` takes a free port here first
    (Serve's proxy needs a fixed one).

    Raises:
        click.ClickException: Ray is missing or the cluster cannot be joined.
    """
    from lmforge.cluster.ray_env import RayUnavailableError
    from lmforge.cluster.serve_app import ReplicaPlan, serve_on_ray

    if server_config.port == 0:
        with socket.socket() as s:
            s.bind((server_config.host, 0))
            server_config.port = s.getsockname()[1]
    plan = ReplicaPlan(values["replicas"], values["replica_cpus"], values["replica_gpus"])
    url = f"http://{server_config.host}:{server_config.port}/v1"

    def ready() -> None:
        click.echo(f"lmforge serving {model_name} on {url} ({plan.replicas} replicas on Ray)",
                   err=True)

    try:
        serve_on_ray(config, server_config, plan, values["ray_address"], chat_template,
                     on_ready=ready)
    except (RayUnavailableError, ValueError) as e:
        raise click.ClickException(str(e)) from e
