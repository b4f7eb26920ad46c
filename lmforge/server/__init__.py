"""The OpenAI-compatible HTTP server: ``build_app(engine, server_config)`` (or
``build_loading_app`` for an engine still loading) and one module per route group
(``inference``, ``models``, ``tokenize``, ``metrics``)."""

from lmforge.server.app import build_app, build_loading_app

__all__ = ["build_app", "build_loading_app"]
