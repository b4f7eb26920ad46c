"""``release_free_memory`` gives memory freed below a live block back to the OS (glibc).

That the engine loop calls it when it goes idle: tests/server/test_request_state.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.engine.memory import _malloc_trim, release_free_memory

glibc_only = pytest.mark.skipif(_malloc_trim() is None, reason="no glibc malloc_trim here")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status")


@glibc_only
def test_memory_freed_under_a_live_block_goes_back_to_the_os():
    # 256 MB in 64 KB blocks (under glibc's mmap threshold: they come from the heap), then one
    # block that stays alive on top of them, so free() alone cannot shrink the heap
    blocks = [b"\x01" * (64 * 1024) for _ in range(4096)]  # written, so resident
    top = b"\x02" * (64 * 1024)
    del blocks
    before = rss_mb()
    assert release_free_memory()
    assert rss_mb() < before - 128
    del top

