"""One keep-alive HTTP/1.1 connection, held open across requests, so a test can tell whether an
error answer cost the client its connection (httpx would silently open a new one)."""

from __future__ import annotations

import http.client
import json as jsonlib
from typing import Any
from urllib.parse import urlsplit


class KeepAlive:
    """``http.client`` over one socket; ``request()`` fails if the server closed it.

    ``http.client`` reconnects only when it knows the socket is gone (a ``Connection: close``
    answer); a socket the server dropped silently makes the next request raise instead. So
    ``same_socket`` stays true exactly while every answer kept the connection open.
    """

    def __init__(self, base_url: str, timeout: float = 60):
        parts = urlsplit(base_url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        self.socket = None

    def request(self, method: str, path: str, json: Any = None, content: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one request on the held connection."""
        body = content if content is not None else (
            None if json is None else jsonlib.dumps(json).encode())
        sent = {"content-type": "application/json", **(headers or {})}
        self.conn.request(method, path, body=body, headers=sent)
        response = self.conn.getresponse()
        data = response.read()
        if self.socket is None:
            self.socket = self.conn.sock
        assert not response.will_close, f"{method} {path} answered {response.status} and closed"
        return response.status, dict(response.getheaders()), data

    @property
    def same_socket(self) -> bool:
        return self.conn.sock is not None and self.conn.sock is self.socket

    def close(self) -> None:
        self.conn.close()
