"""Receiving a chunk's parts from Redis straight into one buffer.

redis-py (with hiredis) copies every reply byte four times before the
caller sees it: socket -> ``bytes`` -> the stream reader's buffer -> the
hiredis buffer -> the reply ``bytes``; joining the parts of a chunk copies
them once more.  For 16 MiB that is most of the client's time.  The
:class:`PartReader` sends pipelined ``GET``\\ s on its own connections and
lets the kernel write each part's bytes (``recv_into``) directly at their
place in the chunk's receive buffer: one copy in all.

It is a fast path, not a second client: it reads only bulk-string replies to
``GET`` on plain TCP (``AUTH`` and ``SELECT`` at connect), one pipelined
connection per node, fetched in parallel across cluster nodes.  Anything
else (TLS, a cluster redirection, an unknown slot map) raises
:class:`Fallback` and the tier reads the parts through redis-py instead.

:class:`BufferPool` keeps receive buffers for reuse: joining parts into
fresh memory pays a page fault per 4 KiB (32 MiB took 16 ms here, against
about 3 ms into memory that is already mapped).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.tiers.redis_pool import Node, NodePool

__all__ = ["BufferPool", "CONNECTION_NAME", "Fallback", "PartReader", "ConnectionAuth"]

#: ``CLIENT SETNAME`` of the part reader's connections.
CONNECTION_NAME = b"kvstore-parts"
_SCRATCH = 1024  # header / error lines; a longer line is a protocol error
_DISCARD = 1 << 16


class Fallback(Exception):
    """The fast path cannot serve this read; use redis-py (not a server failure)."""


class BufferPool:
    """Receive buffers for multi-part gets, reused once their chunk is released.

    Buffers are sized in whole MiB so that chunks of one model (all about the
    same size) share them; at most ``max_bytes`` are kept.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._free: dict[int, list[bytearray]] = {}
        self._kept = 0

    def take(self, nbytes: int) -> bytearray:
        size = -(-nbytes // (1 << 20)) << 20
        free = self._free.get(size)
        if free:
            self._kept -= size
            return free.pop()
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        # May run from Chunk.__del__ (any thread): list and dict operations are atomic.
        if self._kept + len(buf) > self._max:
            return
        self._kept += len(buf)
        self._free.setdefault(len(buf), []).append(buf)


@dataclass(frozen=True, slots=True)
class ConnectionAuth:
    """What a fresh connection of the part reader or writer sends first (AUTH, SELECT)."""

    username: str | None = None
    password: str | None = None
    db: int = 0


def _command(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class _Replies(asyncio.BufferedProtocol):
    """Parses the replies of one pipelined batch, bodies straight into their slots.

    ``get_buffer`` hands the kernel the unfilled rest of the current reply's
    slot, so a body never passes through a Python buffer; headers, the CRLF
    after a body and error lines go through a small scratch buffer.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._scratch = bytearray(_SCRATCH)
        self._have = 0  # bytes in scratch
        self._sink = bytearray(_DISCARD)
        self._slots: Sequence[memoryview | None] = ()
        self.found: list[bool] = []
        self.errors: list[bytes] = []
        self._i = 0
        self._body: memoryview | None = None  # where the current body goes
        self._left = 0  # body bytes still to come
        self._skip = 0  # CRLF after a body
        self._done: asyncio.Future[None] | None = None

    # -- a batch ------------------------------------------------------------------
    def expect(self, slots: Sequence[memoryview | None]) -> asyncio.Future[None]:
        """Wait for ``len(slots)`` replies; a bulk reply of slot i must fill slots[i] exactly."""
        self._slots = slots
        self.found = [False] * len(slots)
        self.errors = []
        self._i = 0
        self._done = asyncio.get_running_loop().create_future()
        if self.lost:
            self._done.set_exception(ConnectionError("redis connection closed"))
        elif not slots:
            self._done.set_result(None)
        return self._done

    def usable(self) -> bool:
        return not self.lost

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: BaseException) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.BufferedProtocol ---------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionError(f"redis connection lost: {exc or 'closed by the server'}"))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._left and self._body is not None and not self._have:
            return self._body[len(self._body) - self._left :]
        if self._left and not self._have:
            return memoryview(self._sink)[: min(self._left, _DISCARD)]
        return memoryview(self._scratch)[self._have :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._left and not self._have:
            self._left -= nbytes  # straight into the body (or the sink)
            if not self._left:
                self._end_body()
            return
        self._have += nbytes
        try:
            self._parse()
        except Exception as exc:  # a reply we cannot read: this connection is unusable
            self._fail(exc)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost reports it

    # -- parsing ---------------------------------------------------------------------------
    def _parse(self) -> None:
        buf = self._scratch
        pos = 0
        while pos < self._have and self._done is not None and not self._done.done():
            if self._skip:
                n = min(self._skip, self._have - pos)
                self._skip -= n
                pos += n
                continue
            if self._left:  # a body's first bytes arrived with its header
                n = min(self._left, self._have - pos)
                if self._body is not None:
                    start = len(self._body) - self._left
                    self._body[start : start + n] = buf[pos : pos + n]
                self._left -= n
                pos += n
                if not self._left:
                    self._end_body()
                continue
            end = buf.find(b"\r\n", pos, self._have)
            if end < 0:
                if pos == 0 and self._have == len(buf):
                    raise ConnectionError("redis reply line too long for the part reader")
                break
            self._line(bytes(buf[pos:end]))
            pos = end + 2
        # Keep an incomplete line at the front.
        rest = self._have - pos
        if rest and pos:
            buf[:rest] = buf[pos : self._have]
        self._have = rest

    def _line(self, line: bytes) -> None:
        kind, text = line[:1], line[1:]
        if kind == b"$":
            size = int(text)
            if size < 0:
                self._next()  # nil: the key is missing
                return
            slot = self._slots[self._i]
            if slot is None or len(slot) != size:
                self.errors.append(b"WRONGSIZE")
                slot = None  # read it into the sink and drop it
            else:
                self.found[self._i] = True
            self._body, self._left = slot, size
            if not size:
                self._end_body()
        elif kind == b"+":
            self._next()
        elif kind == b"-":
            self.errors.append(text)
            self._next()
        else:
            raise ConnectionError(f"unexpected redis reply {line[:32]!r} in the part reader")

    def _end_body(self) -> None:
        self._body = None
        self._skip = 2
        self._next()

    def _next(self) -> None:
        self._i += 1
        if self._i == len(self._slots) and self._done is not None and not self._done.done():
            self._done.set_result(None)


class PartReader:
    """Pipelined ``GET``\\ s into caller-given buffers, over its own connections.

    ``read({(host, port): [(key, slot), ...]})`` sends each node's ``GET``\\ s
    on one connection (nodes in parallel) and returns, per node, which keys
    were found; a found key's value is in its slot.  Connections are kept for
    reuse (at most ``max_idle`` per node); one that fails or is cancelled
    midway is closed, never reused.
    """

    def __init__(self, auth: ConnectionAuth, connect_timeout_s: float, max_idle: int) -> None:
        self._auth = auth
        self._connect_timeout = connect_timeout_s
        self._pool: NodePool[_Replies] = NodePool("part reader", self._connect, max_idle)

    async def read(
        self, batches: dict[tuple[str, int], list[tuple[str, memoryview]]]
    ) -> dict[tuple[str, int], list[bool]]:
        nodes = list(batches)
        if len(nodes) == 1:
            return {nodes[0]: await self._read_node(nodes[0], batches[nodes[0]])}
        results = await asyncio.gather(*(self._read_node(n, batches[n]) for n in nodes))
        return dict(zip(nodes, results, strict=True))

    async def _read_node(self, node: Node, items: list[tuple[str, memoryview]]) -> list[bool]:
        payload = b"".join(_command(b"GET", k.encode()) for k, _ in items)
        slots = [s for _, s in items]

        async def exchange(conn: _Replies) -> tuple[list[bytes], list[bool]]:
            done = conn.expect(slots)
            assert conn.transport is not None
            conn.transport.write(payload)
            await done
            return conn.errors, conn.found

        errors, found = await self._pool.run(node, exchange)
        if errors:
            raise Fallback(f"redis {node[0]}:{node[1]} answered {errors[0][:80]!r}")
        return found

    async def _connect(self, node: Node) -> _Replies:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            _, conn = await loop.create_connection(_Replies, node[0], node[1])
        try:
            auth = self._auth
            setup: list[bytes] = []
            if auth.password is not None:
                user = [auth.username.encode()] if auth.username else []
                setup.append(_command(b"AUTH", *user, auth.password.encode()))
            # Named, so that CLIENT LIST tells these connections from redis-py's.
            setup.append(_command(b"CLIENT", b"SETNAME", CONNECTION_NAME))
            if auth.db:
                setup.append(_command(b"SELECT", str(auth.db).encode()))
            done = conn.expect([None] * len(setup))
            assert conn.transport is not None
            conn.transport.write(b"".join(setup))
            async with asyncio.timeout(self._connect_timeout):
                await done
            if conn.errors:
                raise Fallback(f"redis {node[0]}:{node[1]} refused the setup: {conn.errors[0][:80]!r}")
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        self._pool.close()
