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



def test_a_kv_cache_is_resident_only_where_written():
    """``model_runner.zeroed``: 256 MiB of zero pages; one write every 4 MiB makes ~64 pages
    resident, not 64 transparent huge pages (128 MiB) as numpy's huge-page-advised zeros did."""
    import torch

    from lmforge.engine.model_runner import zeroed

    before = rss_mb()
    cache = zeroed((64, 1024, 1024), torch.float32, torch.device("cpu"))  # 256 MiB
    assert rss_mb() - before < 16
    cache[:, 0, 0] = 1.0  # one float per 4 MiB
    assert rss_mb() - before < 16
    # (reading untouched pages would make them resident too; the engine reads written blocks only)
    assert float(cache[:, 0, 0].sum()) == 64.0 and float(cache[1, 0, 1]) == 0.0
