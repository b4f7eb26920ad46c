"""The process's memory: giving back what the engine thread freed (glibc ``malloc_trim``), and
``MemoryReport``, where it goes (weights, KV cache, runtime) for the start-up log and /metrics.

glibc serves each thread from its own arena and returns freed memory to the OS only from the top
of an arena, so pages freed below a live block stay resident. The engine thread loads the model
(GGUF dequantization, dtype casts, fusing and packing leave large freed temporaries behind) and
then allocates and frees every step's activations, of a different size at every step. Measured
with gdb's ``malloc_stats()`` on ``lmforge serve`` (SmolLM2, float32, 2-core AVX2 VM): right
after loading, the engine thread's arena held 1.47 GB of which 0.50 GB was in use, and
``malloc_trim(0)`` (glibc >= 2.8 also releases the free pages inside an arena, with
``MADV_DONTNEED``) took the RSS from 2920 MB to 1981 MB. ``AsyncEngine`` therefore calls
``release_free_memory`` once the model is loaded, whenever the loop goes idle after work, and
every ``RELEASE_INTERVAL_S`` under steady load, so that what the steps free cannot pile up in a
server that is never idle. A call walks the arenas' free lists and unmaps their free pages:
191 ms right after loading (920 MB released), 25-60 ms after a burst of 8 requests (~65 MB,
the steps' working set, faulted in again by the next steps), on the same VM while others ran.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import time
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

RELEASE_INTERVAL_S = 30.0  # under steady load, the most time between two releases


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return the free pages of every malloc arena to the OS: ``malloc_trim(0)`` (glibc,
    ``man 3 malloc_trim``). Live memory is untouched; a later allocation maps pages again.

    Returns:
        whether glibc released any memory; False where there is no ``malloc_trim``.
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


class MemoryReleaser:
    """When the engine loop calls ``release_free_memory``: on going idle after work, and every
    ``RELEASE_INTERVAL_S`` while the steps go on. ``releases`` counts the calls so far."""

    def __init__(self) -> None:
        self.releases = 0
        self._last = time.monotonic()
        self._stepped = False  # a step ran since the last release

    def after_iteration(self, idle: bool) -> None:
        """Called once per loop iteration, ``idle`` when it ran no step."""
        now = time.monotonic()
        if self._stepped and (idle or now - self._last >= RELEASE_INTERVAL_S):
            release_free_memory()
            self.releases += 1
            self._last = now
        self._stepped = not idle


@dataclass
class MemoryReport:
    """Where the process's memory goes, in bytes.

    ``weights``: the model's parameters and buffers (packed and 4-bit copies included, each
    storage once); ``kv_cache``: the KV cache's whole reservation, for ``kv_cache_tokens``
    tokens; ``kv_cache_used``: the part written so far (blocks handed out at least once; the
    rest is untouched zero pages, see ``model_runner.zeroed``); ``rss``: the resident set
    (``/proc/self/statm``; None off Linux); ``runtime``: RSS less weights and used KV cache (the
    interpreter, PyTorch, the tokenizer, activations), 0 while memory-mapped weights are not yet
    read in.
    """

    weights: int
    kv_cache: int
    kv_cache_tokens: int
    kv_cache_used: int
    rss: int | None

    @property
    def runtime(self) -> int | None:
        if self.rss is None:
            return None
        return max(0, self.rss - self.weights - self.kv_cache_used)

    def summary(self) -> str:
        """One line for the start-up log."""
        mib = 2**20
        line = (f"weights {self.weights / mib:.0f} MiB, KV cache {self.kv_cache / mib:.0f} MiB "
                f"for {self.kv_cache_tokens:,} tokens ({self.kv_cache_used / mib:.0f} MiB "
                "written)")
        if self.rss is not None:
            line += f", resident {self.rss / mib:.0f} MiB (runtime {self.runtime / mib:.0f} MiB)"
        return line


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each underlying storage counted once (a tied
    head is its embedding; views share their base's storage). Opaque tensors (oneDNN-packed
    weights) count their elements."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        try:
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # opaque layouts have no storage
            key, size = id(t), t.numel() * t.element_size()
        if key not in seen:
            seen.add(key)
            total += size
    return total


def resident_bytes() -> int | None:
    """This process's resident set size (Linux ``/proc/self/statm``), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
