"""Sending a chunk's parts to Redis without copying them.

A put of a chunk stored in parts is a :class:`PartsWrite`: the ``SET`` of
each part, then the manifest, written by :data:`PUT_MANIFEST_LUA` only if
the parts on its node are all there.  Both ways of sending it run exactly
these commands, in this order:

* the :class:`PartWriter`, the fast path: pipelined commands on its own
  connections, one per node, nodes in parallel.  It hands the caller's
  memory to the kernel with ``sendmsg`` (gather I/O), so a part is never
  copied in Python.  redis-py copies a large value twice before the kernel
  sees it (asyncio's ``writelines`` joins the command into one ``bytes`` in
  Python 3.11, and the transport copies what the socket did not take at
  once into its buffer), and its cluster pipeline of two small commands
  took 90 us of CPU here, against 18 us for the part writer.
* redis-py, when the part writer cannot serve: TLS, no slot map yet, an
  error reply (a cluster redirection, OOM, ACL), a connection that fails.
  redis-py follows redirections, retries, and reports a server that is
  really down to the breaker.  Sending the same commands again is harmless:
  the part keys are named by the write's nonce and the manifest script is
  idempotent.

Why the order makes a put all-or-nothing for readers
    On one node (a single server, or a cluster chunk kept together) the
    node runs one connection's commands in order, so the manifest script
    runs after every part's ``SET``, and it writes the manifest only if all
    parts exist: a part refused (OOM, ACL) or a connection cut midway
    (a writer killed: the server drops the incomplete command and never
    sees the script) leaves no manifest.  On a cluster with spread parts,
    the manifest is sent only after every node has acknowledged its parts.
    Parts left without a manifest are invisible; they expire with their TTL
    (``allkeys-lru`` evicts them first when there is none: nothing reads
    them).  A ``MULTI``/``EXEC`` would also drop the parts of a cut
    connection, but cost 0.4-1.7 ms more per 4 MiB put on Redis 7.0 here
    (median of 250), 15-40% of the put.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.tiers.redis_parts import ConnectionAuth, Fallback
from kvstore.tiers.redis_pool import Node, NodePool

__all__ = ["PUT_MANIFEST_LUA", "WRITER_CONNECTION_NAME", "Command", "PartWriter", "PartsWrite", "Reply", "pack"]

#: ``CLIENT SETNAME`` of the part writer's connections.
WRITER_CONNECTION_NAME = b"kvstore-writes"

#: KEYS[1]: the manifest; KEYS[2..]: the parts on the manifest's node (none when
#: spread over a cluster).  ARGV[1]: the manifest; ARGV[2]: its TTL in ms, 0 = none.
#: Returns the manifest it replaced (nil if none), so that its parts can be deleted.
PUT_MANIFEST_LUA = (
    "for i = 2, #KEYS do "
    "if redis.call('EXISTS', KEYS[i]) == 0 then "
    "return redis.error_reply('KVSTORE_PART_MISSING a part of this write is not stored: manifest not written') "
    "end end "
    "if ARGV[2] == '0' then return redis.call('SET', KEYS[1], ARGV[1], 'GET') end "
    "return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'GET')"
)

#: A reply the part writer reads: simple string, bulk string, integer or nil.
Reply = bytes | int | None
#: A command's words: its name and small arguments as text, values as bytes or views.
Command = Sequence[str | bytes | memoryview]

_SMALL = 16 << 10  # arguments up to this size are joined into the command's header bytes
_IOV_MAX = 512  # buffers per sendmsg (Linux allows 1024)
_RECV = 1 << 16


@dataclass(frozen=True, slots=True)
class PartsWrite:
    """The commands of one put of a chunk stored in parts (see the module docstring)."""

    manifest_key: str
    manifest: bytes
    #: (key, bytes) of each part, in payload order.
    parts: Sequence[tuple[str, memoryview]]
    #: TTL of the manifest in ms (0 = none); parts get ``part_ttl_ms``, a little more.
    ttl_ms: int
    part_ttl_ms: int
    #: Parts on the manifest's node (a single server, or hash-tagged with it):
    #: the manifest script checks them and one pipeline carries the whole write.
    one_node: bool

    def part_command(self, key: str, value: memoryview) -> list[str | bytes | memoryview]:
        ttl = ["PX", str(self.part_ttl_ms)] if self.part_ttl_ms else []
        return ["SET", key, value, *ttl]

    def manifest_command(self) -> list[str | bytes | memoryview]:
        checked = [k for k, _ in self.parts] if self.one_node else []
        keys = [self.manifest_key, *checked]
        return ["EVAL", PUT_MANIFEST_LUA, str(len(keys)), *keys, self.manifest, str(self.ttl_ms)]


def pack(command: Command) -> list[bytes | memoryview]:
    """One command in RESP, large arguments as their own buffers (never copied)."""
    out: list[bytes | memoryview] = []
    head: list[bytes | memoryview] = [b"*%d\r\n" % len(command)]
    for word in command:
        arg = word.encode() if isinstance(word, str) else word
        if len(arg) <= _SMALL:
            head += (b"$%d\r\n" % len(arg), arg, b"\r\n")
            continue
        head.append(b"$%d\r\n" % len(arg))
        out.append(b"".join(head))
        out.append(arg)
        head = [b"\r\n"]
    out.append(b"".join(head))
    return out


class _Connection:
    """One non-blocking socket: gather-writes commands, parses the (short) replies.

    It waits for the socket with its own ``add_reader`` / ``add_writer``
    callbacks, removed before an exception (a cancellation) leaves: by the
    time the socket is closed, the event loop holds nothing of it.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._pos = 0

    def close(self) -> None:
        self.sock.close()

    def usable(self) -> bool:
        """False if the server closed it (or sent something unasked) while it was idle."""
        try:
            self.sock.recv(1, socket.MSG_PEEK)  # b"": closed; data: out of step
        except (BlockingIOError, InterruptedError):
            return True  # nothing to read: still open
        except OSError:
            pass
        return False

    async def send(self, buffers: list[bytes | memoryview]) -> None:
        loop = asyncio.get_running_loop()
        views = [memoryview(b) for b in buffers]
        i = 0
        while i < len(views):
            try:
                sent = self.sock.sendmsg(views[i : i + _IOV_MAX])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                raise ConnectionError(f"redis connection failed while sending: {exc}") from None
            while sent:
                if sent >= len(views[i]):
                    sent -= len(views[i])
                    i += 1
                else:
                    views[i] = views[i][sent:]
                    sent = 0
            if i < len(views):
                await self._ready(loop, writing=True)

    async def _ready(self, loop: asyncio.AbstractEventLoop, *, writing: bool) -> None:
        fd = self.sock.fileno()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        if writing:
            loop.add_writer(fd, wake)
        else:
            loop.add_reader(fd, wake)
        try:
            await ready
        finally:
            if writing:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)

    async def _recv(self, loop: asyncio.AbstractEventLoop) -> bytes:
        while True:
            try:
                return self.sock.recv(_RECV)
            except (BlockingIOError, InterruptedError):
                await self._ready(loop, writing=False)

    async def replies(self, count: int) -> tuple[list[Reply], list[bytes]]:
        """The next ``count`` replies (errors as None) and the error lines among them."""
        loop = asyncio.get_running_loop()
        out: list[Reply] = []
        errors: list[bytes] = []
        while len(out) < count:
            parsed = self._parse()
            if parsed is None:
                try:
                    data = await self._recv(loop)
                except OSError as exc:
                    raise ConnectionError(f"redis connection failed while reading: {exc}") from None
                if not data:
                    raise ConnectionError("redis connection closed by the server")
                if self._pos:
                    del self._buf[: self._pos]
                    self._pos = 0
                self._buf += data
                continue
            reply, error = parsed
            out.append(reply)
            if error is not None:
                errors.append(error)
        if self._pos != len(self._buf):
            raise ConnectionError("redis sent more replies than commands")
        self._buf.clear()
        self._pos = 0
        return out, errors

    def _parse(self) -> tuple[Reply, bytes | None] | None:
        """One reply from the buffer, or None if it is not complete yet."""
        buf, pos = self._buf, self._pos
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        kind, text = buf[pos : pos + 1], bytes(buf[pos + 1 : end])
        if kind == b"+":
            self._pos = end + 2
            return text, None
        if kind == b"-":
            self._pos = end + 2
            return None, text
        if kind == b":":
            self._pos = end + 2
            return int(text), None
        if kind == b"$":
            size = int(text)
            if size < 0:
                self._pos = end + 2
                return None, None
            if len(buf) < end + 2 + size + 2:
                return None
            self._pos = end + 2 + size + 2
            return bytes(buf[end + 2 : end + 2 + size]), None
        raise ConnectionError(f"unexpected redis reply {bytes(buf[pos : pos + 32])!r} in the part writer")


class PartWriter:
    """Pipelined commands over its own connections, large arguments never copied.

    ``write({(host, port): [command, ...]})`` sends each node's commands on
    one connection (nodes in parallel) and returns each node's replies once
    every node has answered all of them.  An error reply raises
    :class:`~kvstore.tiers.redis_parts.Fallback` (the connection stays in
    step and is kept); a failed connection raises :class:`ConnectionError`.
    A connection that fails or is cancelled midway is closed, never reused.
    """

    def __init__(self, auth: ConnectionAuth, connect_timeout_s: float, max_idle: int) -> None:
        self._auth = auth
        self._connect_timeout = connect_timeout_s
        self._pool: NodePool[_Connection] = NodePool("part writer", self._connect, max_idle)

    async def write(self, batches: dict[Node, list[Command]]) -> dict[Node, list[Reply]]:
        nodes = list(batches)
        if len(nodes) == 1:
            return {nodes[0]: await self._write_node(nodes[0], batches[nodes[0]])}
        # Wait for every node, even after one failed: when this returns or
        # raises, none of our writes is still in flight.
        results = await asyncio.gather(*(self._write_node(n, batches[n]) for n in nodes), return_exceptions=True)
        out: dict[Node, list[Reply]] = {}
        for node, r in zip(nodes, results, strict=True):
            if isinstance(r, BaseException):
                raise r
            out[node] = r
        return out

    async def _write_node(self, node: Node, commands: list[Command]) -> list[Reply]:
        buffers = [b for c in commands for b in pack(c)]

        # Sending again on a new connection after a pooled one died is safe: see the module docstring.
        async def exchange(conn: _Connection) -> tuple[list[Reply], list[bytes]]:
            await conn.send(buffers)
            return await conn.replies(len(commands))

        replies, errors = await self._pool.run(node, exchange)
        if errors:
            raise Fallback(f"redis {node[0]}:{node[1]} answered {errors[0][:80]!r}")
        return replies

    async def _connect(self, node: Node) -> _Connection:
        loop = asyncio.get_running_loop()
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                infos = await loop.getaddrinfo(node[0], node[1], type=socket.SOCK_STREAM)
                family, kind, proto, _, address = infos[0]
                sock = socket.socket(family, kind, proto)
                conn = _Connection(sock)
                sock.setblocking(False)
                await loop.sock_connect(sock, address)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                setup = self._setup()
                await conn.send([b for c in setup for b in pack(c)])
                _, errors = await conn.replies(len(setup))
        except OSError as exc:  # refused, unreachable (ConnectionError is one too)
            if conn is not None:
                conn.close()
            raise ConnectionError(f"redis {node[0]}:{node[1]}: {exc}") from None
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        if errors:
            conn.close()
            raise Fallback(f"redis {node[0]}:{node[1]} refused the setup: {errors[0][:80]!r}")
        return conn

    def _setup(self) -> list[Command]:
        auth = self._auth
        setup: list[Command] = []
        if auth.password is not None:
            user = [auth.username.encode()] if auth.username else []
            setup.append(["AUTH", *user, auth.password.encode()])
        # Named, so that CLIENT LIST tells these connections from redis-py's.
        setup.append(["CLIENT", "SETNAME", WRITER_CONNECTION_NAME])
        if auth.db:
            setup.append(["SELECT", str(auth.db)])
        return setup

    def close(self) -> None:
        self._pool.close()
