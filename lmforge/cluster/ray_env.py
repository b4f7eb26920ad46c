"""Ray itself: importing it with a clear error when the extra is missing, and joining a cluster.

``connect(None)`` starts a local single-machine cluster (what ``ray.init()`` does), and
``connect("ray://host:10001")`` or ``connect("host:6379")`` joins an existing one, as every
Ray program does (https://docs.ray.io/en/latest/ray-core/api/doc/ray.init.html).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

INSTALL_HINT = "pip install 'lmforge[ray]'"


class RayUnavailableError(RuntimeError):
    """Ray is not installed (the ``lmforge[ray]`` extra), or the cluster cannot be reached."""


def import_ray() -> ModuleType:
    """``import ray``, or RayUnavailableError naming the extra to install."""
    try:
        import ray
    except ImportError as e:
        raise RayUnavailableError(f"this needs Ray, which is not installed: {INSTALL_HINT}"
                                  ) from e
    return ray


def connect(address: str | None = None, **init_kwargs: Any) -> ModuleType:
    """Join the Ray cluster at ``address`` (None: a local one, started here unless this process
    already joined one) and return the ``ray`` module.

    Raises:
        RayUnavailableError: Ray is missing, or no cluster answers at ``address``.
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **init_kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or "a local cluster"
        raise RayUnavailableError(f"cannot join the Ray cluster at {where}: {e}") from e
    return ray
