"""A kvstore daemon inside the engine process, for single-host use.

Engines such as vLLM run their scheduler and workers in different processes,
so an in-process ``TieredStore`` object could not be shared between them; an
embedded daemon can: it serves the normal gRPC API (and shared memory) on a
loopback address from a thread of the process that starts it, and every
worker connects to it like to ``kvstore serve``.  It lives as long as that
process (no persistence: a CPU tier only).
"""

from __future__ import annotations

import asyncio
import logging
import threading

from kvstore.config import build
from kvstore.errors import ConfigError
from kvstore.server.daemon import Daemon

log = logging.getLogger(__name__)


class EmbeddedDaemon:
    """Runs a CPU-tier daemon on ``host:port`` in a background thread."""

    def __init__(self, host: str, port: int, capacity: int) -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigError(f"an embedded daemon listens on loopback only, got host {host!r}")
        cfg = build(
            {
                "server": {"host": host, "port": port},
                "tiers": [{"name": "cpu", "kind": "cpu", "capacity": capacity, "on_evict": "drop"}],
            }
        )
        self._loop = asyncio.new_event_loop()
        self._daemon = Daemon(cfg)
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvstore-embedded", daemon=True)
        self._thread.start()
        try:
            self.port = asyncio.run_coroutine_threadsafe(self._daemon.start(), self._loop).result(60)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        if self.port == 0:
            self.close()
            raise ConfigError(f"the embedded daemon cannot listen on {host}:{port} (port in use?)")
        log.info("kvstore: embedded daemon on %s:%d (cpu tier, %d bytes)", host, self.port, capacity)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._daemon.stop(1.0), self._loop).result(30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
