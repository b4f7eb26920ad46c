"""The OpenAI-compatible HTTP server: ``build_app(engine, server_config)`` and one module per
route group (``inference``, ``models``)."""

from lmforge.server.app import build_app

__all__ = ["build_app"]
