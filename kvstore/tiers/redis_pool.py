"""Idle connections per Redis node, for the part reader and the part writer.

Both fast paths (redis_parts.PartReader, redis_writes.PartWriter) keep their
own connections to each node, reused across calls.  A :class:`NodePool`
hands one out, runs one pipelined exchange on it, and takes it back; what
it guarantees is the same for both:

* a connection that fails or is cancelled midway is closed, never reused
  (replies may still be in flight on it);
* a pooled connection found dead on first use (a restarted server) is
  replaced once by a new one; a fresh connection that fails raises;
* at most ``max_idle`` connections per node wait between calls;
* after :meth:`NodePool.close` nothing is pooled and no new connection is made.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

__all__ = ["Node", "NodePool", "PooledConnection"]

#: (host, port)
Node = tuple[str, int]


class PooledConnection(Protocol):
    def usable(self) -> bool:
        """Whether an idle connection can still carry a request."""

    def close(self) -> None:
        """Close at once (nothing is waited for)."""


C = TypeVar("C", bound=PooledConnection)
T = TypeVar("T")


class NodePool(Generic[C]):
    """Connections per node, made by ``connect(node)``; see the module docstring."""

    def __init__(self, what: str, connect: Callable[[Node], Awaitable[C]], max_idle: int) -> None:
        self._what = what
        self._connect = connect
        self._max_idle = max_idle
        self._idle: dict[Node, list[C]] = {}
        self._closed = False

    async def run(self, node: Node, exchange: Callable[[C], Awaitable[T]]) -> T:
        """``exchange(conn)`` on a connection to ``node``; the connection goes back
        to the pool only if the exchange completed."""
        for attempt in range(2):
            conn, reused = await self._take(node)
            try:
                result = await exchange(conn)
            except ConnectionError:
                conn.close()
                if reused and attempt == 0:
                    continue  # a pooled connection that died with a restarted server
                raise
            except BaseException:
                conn.close()  # replies may still be in flight
                raise
            self._give(node, conn)
            return result
        raise AssertionError("unreachable")

    async def _take(self, node: Node) -> tuple[C, bool]:
        if self._closed:
            raise ConnectionError(f"the {self._what} is closed")
        idle = self._idle.get(node)
        while idle:
            pooled = idle.pop()
            if pooled.usable():
                return pooled, True
            pooled.close()
        return await self._connect(node), False

    def _give(self, node: Node, conn: C) -> None:
        # Not checked for usable() here: _take checks before reuse (for the writer that
        # is a syscall, worth paying once per call, not twice).
        idle = self._idle.setdefault(node, [])
        if self._closed or len(idle) >= self._max_idle:
            conn.close()
            return
        idle.append(conn)

    def idle(self, node: Node) -> int:
        """Connections to ``node`` waiting in the pool."""
        return len(self._idle.get(node, ()))

    def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
