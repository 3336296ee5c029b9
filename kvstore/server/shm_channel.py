"""The shared-memory control channel: ShmPut / ShmGet over a Unix socket.

Over gRPC, one ShmPut or ShmGet costs 0.4-0.7 ms of Python on both sides
(measured on the 2-core benchmark machine), more than copying a 1-4 MiB
chunk; the same request over a Unix socket costs about 0.05 ms.  So a client
that has registered a segment (over gRPC, where it authenticated) may send
its ShmPut and ShmGet requests here instead.  The gRPC methods stay the API
and the fallback: the channel carries exactly their request and reply
messages, served by the same code (``SharedMemory.put`` / ``get`` in
shm_service.py), so validation, tenant checks, bounds checks, checksums and
limits are those of the gRPC path.

Wire format, both directions: ``u32 length (little-endian) | u8 kind | body``
where ``length`` counts kind + body.

* ``H`` hello, first message of a connection: ``u64 segment_id | 16-byte
  nonce``.  The connection then acts for the principal (tenant, role) that
  registered that segment; anyone else gets an error and the connection
  closes.  Replies ``O`` (empty body) or ``E``.
* ``P`` body ``ShmPutRequest`` -> ``O`` body ``PutReply``.
* ``G`` body ``ShmGetRequest`` -> ``O`` body ``ShmGetReply``.
* ``A`` attach, body empty or ``u8 wanted`` -> ``O`` body ``u64 arena bytes | u64 index
  bytes | u64 flags`` with two file descriptors (arena, index) passed along
  (SCM_RIGHTS), or ``E`` FAILED_PRECONDITION when the daemon does not share
  its CPU tier's memory (a token file is configured, ``server.shm_direct_reads``
  is off, no tier can): the client then reads chunks straight from the
  tier's memory (kvstore/tiers/shared_arena.py).  ``wanted`` bit 0 asks for
  the arena writable (direct writes); flag bit 0 says it is (asked for and
  offered), and the connection may send ``W``; otherwise both descriptors
  are read-only.
* ``W`` body ``ArenaPutRequest`` -> ``O`` body ``ArenaPutReply``: direct
  writes (kvstore/server/direct_writes.py).  Blocks the connection reserved
  go back to the tier when it ends.  With ``checksums_follow`` (offered with
  attach flag bit 1), the client sends ``W`` before it writes the blocks, then
  ``S``, and the reply comes after the ``S``:
* ``S`` sums, only right after such a ``W``: for each of its items, in order,
  ``u64 checksum | u32 microseconds the copy took`` (little-endian,
  ``direct_writes.SUMS``).  The daemon checks the
  ``W`` and reserves the next blocks while the client copies, and stores
  nothing before the ``S``.  It reads the ``S`` also when it refuses the ``W``,
  so the two stay in step; any other message in its place gets an ``E`` reply
  and the connection is closed, as does an end of stream (nothing stored).
* ``T`` touched, no reply: the keys a client read from the shared arena,
  each ``u32 microseconds | u16 length | key (utf-8)``, so that eviction
  order and read metrics count them.  A malformed one closes the connection.
* ``E`` error reply: ``STATUS_NAME\\n`` + message (utf-8), the gRPC status
  the same request would have got.

One request at a time per connection.  A malformed message (bad kind, body
over :data:`MAX_BODY`, undecodable protobuf) gets an ``E`` reply and the
connection is closed; the daemon serves on.  The socket lives in a private
directory (mode 0700) created by the daemon and removed when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from google.protobuf.message import DecodeError

from kvstore.errors import Closed, InvalidArgument, KVStoreError
from kvstore.server.auth import Principal
from kvstore.server.direct_writes import DirectWrites, Held, Sums
from kvstore.tiers.shared_arena import DESCRIPTION, WRITABLE
from kvstore.server.shm import NONCE_BYTES, FailedPrecondition, Segment
from kvstore.v1 import kvstore_pb2 as pb

log = logging.getLogger(__name__)

HEADER = struct.Struct("<IB")
HELLO = struct.Struct("<Q16s")
TOUCH = struct.Struct("<IH")  # microseconds the read took, key length
#: Largest request body: max_batch items with long keys fit well inside.
MAX_BODY = 16 << 20

KIND_HELLO = ord("H")
KIND_PUT = ord("P")
KIND_GET = ord("G")
KIND_ATTACH = ord("A")
KIND_WRITE = ord("W")
KIND_TOUCHED = ord("T")
KIND_SUMS = ord("S")
KIND_OK = ord("O")
KIND_ERROR = ord("E")

PutHandler = Callable[[pb.ShmPutRequest, Principal], Awaitable[pb.PutReply]]
GetHandler = Callable[[pb.ShmGetRequest, Principal], Awaitable[pb.ShmGetReply]]
Authenticate = Callable[[int, bytes], Segment]
#: (method, seconds, status code name): the daemon's RPC metrics, so that a request
#: served here counts as the ShmPut/ShmGet it is.
Observe = Callable[[str, float, str], None]
#: The shared arena's description and descriptors (arena, index), for a principal that
#: wants the arena writable or not: read-only unless that is granted.
Attach = Callable[[Principal, bool], tuple[bytes, tuple[int, int]]]
#: (key text, seconds) of reads a client made from the shared arena.
Touched = Callable[[list[tuple[str, float]], Principal], None]


def encode(kind: int, body: bytes) -> bytes:
    return HEADER.pack(len(body) + 1, kind) + body


def encode_error(exc: KVStoreError) -> bytes:
    return encode(KIND_ERROR, f"{exc.status}\n{exc}".encode())


#: The gRPC method each request kind stands for, in the RPC metrics.
_METHODS = {KIND_PUT: "KVStore/ShmPut", KIND_GET: "KVStore/ShmGet", KIND_WRITE: "KVStore/ArenaPut"}


class ShmChannel:
    """The daemon's side: a Unix-socket server started on first use."""

    def __init__(
        self,
        authenticate: Authenticate,
        put: PutHandler,
        get: GetHandler,
        observe: Observe | None = None,
        *,
        attach: Attach | None = None,
        touched: Touched | None = None,
        writes: DirectWrites | None = None,
    ) -> None:
        self._authenticate = authenticate
        self._put = put
        self._get = get
        self._observe = observe
        self._attach = attach
        self._touched = touched
        self._writes = writes
        self._dir: Path | None = None
        self._server: asyncio.AbstractServer | None = None
        self._lock = asyncio.Lock()
        self._conns: set[asyncio.StreamWriter] = set()
        # Requests being served, so that a stopping daemon can let them finish
        # (and flush what they stored) before it closes the store: see drain().
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False

    @property
    def path(self) -> Path | None:
        return None if self._dir is None else self._dir / "shm.sock"

    async def ensure_started(self) -> str:
        """The socket's path; starts listening the first time."""
        async with self._lock:
            if self._server is None or self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix="kvstore-shm-"))  # mode 0700
                self._server = await asyncio.start_unix_server(
                    self._serve, self._dir / "shm.sock", limit=MAX_BODY + HEADER.size
                )
            return str(self._dir / "shm.sock")

    async def drain(self, timeout_s: float | None) -> None:
        """Stop taking requests and wait (up to ``timeout_s``) for those being served.

        The daemon calls this while it stops, before it closes the store: a put served
        here is acknowledged only once stored, and the store's close flushes what was
        stored to its write-through tiers, so no acknowledged put may come after it.
        A request arriving meanwhile gets UNAVAILABLE (the client then tries gRPC,
        which is stopping too) and is not stored.
        """
        self._draining = True
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)

    def close(self) -> None:
        """Stop listening, drop connections, remove the socket (idempotent)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._conns):
            w.close()
        self._conns.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        held: Held = {}  # blocks this connection reserved for direct writes
        writable = False  # whether its attach got the arena writable (W needs that)
        follow = functools.partial(_sums, reader)  # a W's checksums, read where they are due
        try:
            principal: Principal | None = None
            while True:
                try:
                    msg = await _read(reader)
                except KVStoreError as exc:
                    writer.write(encode_error(exc))  # framing is lost: close
                    return
                if msg is None:
                    return  # the client went away
                kind, body = msg
                if self._draining:
                    writer.write(encode_error(Closed("the daemon is shutting down; nothing was stored")))
                    await writer.drain()
                    return
                if principal is not None and kind == KIND_TOUCHED:
                    if not self._touch(body, principal):
                        return  # malformed: there is no reply to carry an error
                    continue
                if principal is not None and kind == KIND_ATTACH:
                    writable = await self._send_arena(writer, principal, writable=body[:1] == b"\x01")
                    continue
                self._busy += 1
                self._idle.clear()
                try:
                    if principal is None:
                        principal = self._hello(kind, body)
                        reply = b""
                    else:
                        reply = await self._request(kind, body, principal, held if writable else None, follow)
                    writer.write(encode(KIND_OK, reply))
                except KVStoreError as exc:
                    writer.write(encode_error(exc))
                    if principal is None or kind not in _METHODS or isinstance(exc, OutOfStep):
                        return
                finally:
                    self._busy -= 1
                    if self._busy == 0:
                        self._idle.set()
                await writer.drain()
        except ConnectionError:
            return
        except asyncio.CancelledError:
            # The daemon is stopping: end this connection's task quietly (a
            # cancelled handler task makes asyncio's stream callback log a
            # traceback); the client falls back to gRPC, which says UNAVAILABLE.
            return
        finally:
            if held and self._writes is not None:
                self._writes.release_all(held)
            self._conns.discard(writer)
            with contextlib.suppress(ConnectionError, RuntimeError):
                writer.close()

    def _touch(self, body: bytes, principal: Principal) -> bool:
        reads: list[tuple[str, float]] = []
        at = 0
        try:
            while at < len(body):
                micros, n = TOUCH.unpack_from(body, at)
                at += TOUCH.size
                if at + n > len(body):
                    return False
                reads.append((body[at : at + n].decode(), micros / 1e6))
                at += n
        except (struct.error, UnicodeDecodeError):
            return False
        if self._touched is not None:
            self._touched(reads, principal)
        return True

    async def _send_arena(self, writer: asyncio.StreamWriter, principal: Principal, *, writable: bool) -> bool:
        """Reply to an attach: the description, with the descriptors passed alongside;
        whether the arena was passed writable."""
        if self._attach is None:
            writer.write(encode_error(FailedPrecondition("this daemon does not share its memory")))
            return False
        try:
            description, fds = self._attach(principal, writable)
        except KVStoreError as exc:
            writer.write(encode_error(exc))
            return False
        try:
            await writer.drain()  # nothing of ours may be queued ahead of the reply
            raw = writer.get_extra_info("socket")
            with socket.socket(fileno=os.dup(raw.fileno())) as sock:
                socket.send_fds(sock, [encode(KIND_OK, description)], list(fds))
        finally:
            for fd in fds:
                os.close(fd)
        return bool(DESCRIPTION.unpack(description)[2] & WRITABLE)

    def _hello(self, kind: int, body: bytes) -> Principal:
        if kind != KIND_HELLO:
            raise InvalidArgument("send a hello (segment id and nonce) first")
        if len(body) != HELLO.size:
            raise InvalidArgument(f"hello must be {HELLO.size} bytes: segment id, {NONCE_BYTES}-byte nonce")
        seg_id, nonce = HELLO.unpack(body)
        return self._authenticate(seg_id, nonce).principal

    async def _request(
        self, kind: int, body: bytes, principal: Principal, held: Held | None, follow: Sums
    ) -> bytes:
        method = _METHODS.get(kind)
        if self._observe is None or method is None:
            return await self._serve_request(kind, body, principal, held, follow)
        t0 = time.perf_counter()
        code = "UNKNOWN"
        try:
            reply = await self._serve_request(kind, body, principal, held, follow)
            code = "OK"
            return reply
        except KVStoreError as exc:
            code = exc.status
            raise
        finally:
            self._observe(method, time.perf_counter() - t0, code)

    async def _write(
        self, request: pb.ArenaPutRequest, principal: Principal, held: Held | None, sums: Sums | None
    ) -> pb.ArenaPutReply:
        if self._writes is None:
            raise FailedPrecondition("this daemon takes no direct writes")
        if held is None:
            self._writes.refuse()  # says why, when they are not offered at all
            raise FailedPrecondition("attach asking for the arena writable first (A with body 0x01)")
        return await self._writes.put(request, principal, held, sums)

    async def _serve_request(
        self, kind: int, body: bytes, principal: Principal, held: Held | None, follow: Sums
    ) -> bytes:
        """``held``: the connection's reserved blocks; None until an attach got the arena
        writable.  ``follow``: the next message's body, an ``S`` (a W's checksums)."""
        if kind == KIND_WRITE:
            request = _parse(pb.ArenaPutRequest, body)
            if not request.checksums_follow:
                return (await self._write(request, principal, held, None)).SerializeToString()
            taken = False

            async def sums() -> bytes:
                nonlocal taken
                taken = True
                return await follow()

            try:
                return (await self._write(request, principal, held, sums)).SerializeToString()
            except KVStoreError:
                if not taken:
                    await follow()  # refused before it read them: the client sends them anyway, stay in step
                raise
        if kind == KIND_PUT:
            put = await self._put(_parse(pb.ShmPutRequest, body), principal)
            return put.SerializeToString()
        if kind == KIND_GET:
            got = await self._get(_parse(pb.ShmGetRequest, body), principal)
            return got.SerializeToString()
        raise InvalidArgument(f"unknown message kind {kind}; expected P, G or W after the hello")


async def _read(reader: asyncio.StreamReader) -> tuple[int, bytes] | None:
    """One message, or None at a clean end of stream."""
    try:
        head = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise InvalidArgument("connection closed inside a message header") from None
        return None
    length, kind = HEADER.unpack(head)
    if not 1 <= length <= MAX_BODY + 1:
        raise InvalidArgument(f"message of {length} bytes; at most {MAX_BODY + 1}")
    try:
        return kind, await reader.readexactly(length - 1)
    except asyncio.IncompleteReadError:
        return None


class OutOfStep(InvalidArgument):
    """The client sent something else where the daemon waited for an ``S``: the
    connection is closed after the error reply."""


async def _sums(reader: asyncio.StreamReader) -> bytes:
    try:
        msg = await _read(reader)
    except InvalidArgument as exc:
        raise OutOfStep(str(exc)) from None
    if msg is None:
        raise ConnectionError("the client went away before sending its checksums")
    kind, body = msg
    if kind != KIND_SUMS:
        raise OutOfStep(f"message kind {kind} where the checksums (S) of the write before it were due")
    return body


M = TypeVar("M", pb.ShmPutRequest, pb.ShmGetRequest, pb.ArenaPutRequest)


def _parse(cls: type[M], body: bytes) -> M:
    try:
        return cls.FromString(body)
    except DecodeError as exc:
        raise InvalidArgument(f"malformed {cls.__name__}: {exc}") from None
