"""The HTTP endpoint Prometheus scrapes, served on the daemon's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST

from kvstore.errors import Unauthenticated

if TYPE_CHECKING:
    from kvstore.metrics.core import Metrics
    from kvstore.server.auth import TokenTable


class MetricsServer:
    """A minimal HTTP/1.1 server for ``GET /metrics`` on the daemon's event loop.

    One request per connection; anything but ``GET``/``HEAD`` of ``/metrics``
    (or ``/``) gets 404 or 405.  Headers are bounded (8 KiB, 10 s).  With a
    token file (``tokens``) a scrape needs ``Authorization: Bearer <token>``
    of a ``metrics`` or ``admin`` token (401 without a valid one, 403 for
    another role): the figures name every tenant's namespaces.
    """

    def __init__(self, metrics: Metrics, tokens: TokenTable | None = None) -> None:
        self._metrics = metrics
        self._tokens = tokens
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, limit=8192)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            lines = head.decode("latin-1").split("\r\n")
            method, _, rest = lines[0].partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            extra = ""
            denied = self._denied(lines[1:])
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"only GET\n"
            elif path not in ("/metrics", "/"):
                status, ctype, body = "404 Not Found", "text/plain", b"see /metrics\n"
            elif denied is not None:
                status, ctype, body = denied[0], "text/plain", denied[1].encode() + b"\n"
                extra = 'WWW-Authenticate: Bearer realm="kvstore"\r\n' if status.startswith("401") else ""
            else:
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, self._metrics.render()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"{extra}Connection: close\r\n\r\n".encode()
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError, ValueError):
            pass  # a client that sent garbage or went away: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _denied(self, header_lines: list[str]) -> tuple[str, str] | None:
        """(status, reason) when a token file is configured and these request
        headers carry no token allowed to scrape; None when allowed."""
        if self._tokens is None:
            return None
        auth = None
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep and name.strip().lower() == "authorization":
                auth = value.strip()
        try:
            principal = self._tokens.authenticate(auth)
        except Unauthenticated as exc:
            return "401 Unauthorized", f"{exc} (a metrics or admin token of server.token_file)"
        if not principal.may_scrape_metrics():
            return "403 Forbidden", f"role {principal.role!r} may not scrape metrics; use a metrics or admin token"
        return None
