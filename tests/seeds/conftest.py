"""Fixtures of the seed tests (``lmforge_process.py`` holds the server process itself)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from lmforge_process import SERVE_ARGS, LmforgeServe, free_port


@pytest.fixture(scope="module")
def lmforge_url(tmp_path_factory) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of ``lmforge serve`` on the default model (fine-tuning on)."""
    port = free_port()
    server = LmforgeServe(["--port", str(port), *SERVE_ARGS],
                          tmp_path_factory.mktemp("lmforge_home"))
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait(url)
        yield url
    finally:
        server.terminate()
