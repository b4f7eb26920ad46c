"""Where start-up time goes: named phases of ``lmforge serve`` and ``lmforge batches run``, from
the moment the process started (the interpreter and the imports included), printed once the
model is ready::

    lmforge ready in 4.6 s: imports 2.1 s, jobs store 0.1 s, checkpoint 1.0 s, tokenizer 0.1 s, ...

The engine thread and the main thread both record phases (a list append, atomic in CPython).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: ``/proc/self/stat`` field 22, in clock ticks
    since boot, against ``CLOCK_BOOTTIME``; 10 ms resolution); None where that is unknown."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the name may hold spaces
        ticks = int(fields[19])  # field 22 of the whole line; 3 is the first after the name
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class StartupProfile:
    """Wall-clock seconds of each start-up phase, in the order they ended.

    ``phases`` holds (name, seconds); ``total_s()`` is the time since the process started (or
    since the profile was made, where the process start is unknown), so it also covers what no
    phase names.
    """

    def __init__(self) -> None:
        age = process_age_s()
        self._origin = time.perf_counter() - (age if age is not None else 0.0)
        self.phases: list[tuple[str, float]] = []

    def since_start(self, name: str) -> None:
        """Record ``name`` as everything from the process start to now not yet recorded
        (``imports``: the interpreter and the modules loaded before the command ran)."""
        self.phases.append((name, max(0.0, self.total_s() - sum(s for _, s in self.phases))))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases.append((name, time.perf_counter() - start))

    def total_s(self) -> float:
        return time.perf_counter() - self._origin

    def summary(self) -> str:
        """``ready in T s: phase s, phase s, ...``."""
        parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.phases)
        return f"ready in {self.total_s():.1f} s: {parts}"


@contextmanager
def phase(profile: StartupProfile | None, name: str) -> Iterator[None]:
    """``profile.phase(name)``, or nothing when there is no profile."""
    if profile is None:
        yield
    else:
        with profile.phase(name):
            yield
