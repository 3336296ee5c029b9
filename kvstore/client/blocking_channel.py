"""The daemon's control channel (kvstore/server/shm_channel.py) over a
blocking socket: for the sync client's calling thread (ShmPut/ShmGet with no
hop to its event loop), and for both clients' reads from the daemon's shared
CPU arena (direct reads, kvstore/tiers/shared_arena.py) and writes into it
(direct writes, kvstore/client/arena_writes.py).  Reads are told to the
daemon afterwards, in batches, so that its eviction order sees them.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence

import torch

from kvstore.chunk import ChunkMeta
from kvstore.client.arena_writes import ArenaWrites, direct_items
from kvstore.client.payload import Value
from kvstore.client.shm import reply_body
from kvstore.errors import KVStoreError, NotFound, error_for_status
from kvstore.server.shm_channel import (
    HEADER,
    HELLO,
    KIND_ATTACH,
    KIND_ERROR,
    KIND_HELLO,
    KIND_OK,
    KIND_SUMS,
    KIND_TOUCHED,
    KIND_WRITE,
    MAX_BODY,
    TOUCH,
    encode,
)
from kvstore.tiers.shared_arena import SUPPORTED as SHARING_SUPPORTED
from kvstore.tiers.arena_reader import ArenaReader
from kvstore.tiers.shared_arena import DESCRIPTION
from kvstore.v1 import kvstore_pb2 as pb


#: Reads from the shared arena are told to the daemon in batches of this many, or ...
TELL_BATCH = 64
#: ... when the oldest untold one is this old (at the next read).
TELL_EVERY_S = 0.005


class BlockingControlChannel:
    """The control channel with a blocking socket, for the sync client's
    calling thread (no hop to its event loop), and for both clients' reads
    from the daemon's shared arena (:meth:`read_shared`).  Thread-safe: a
    caller that finds it busy uses the asynchronous path instead."""

    def __init__(self, path: str, segment_id: int, nonce: bytes, timeout_s: float, *, writes: bool = False) -> None:
        self.segment_id = segment_id
        #: Ask for the arena writable at attach (direct writes).
        self._want_writes = writes
        self._lock = threading.Lock()
        self.broken = False
        #: The daemon's shared arena, once :meth:`attach` mapped it.
        self.arena: ArenaReader | None = None
        self.attempted_attach = False
        #: Reads from the arena not yet told to the daemon: (key text, seconds).
        self._untold: list[tuple[str, float]] = []
        self._untold_since = 0.0
        self._untold_lock = threading.Lock()
        #: Direct writes, once the first one is made.
        self._writes: ArenaWrites | None = None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(path)
            self._call(KIND_HELLO, HELLO.pack(segment_id, nonce))
        except BaseException:
            self.close()
            raise
        self._poll = select.poll()
        self._poll.register(self._sock, select.POLLIN)

    def set_timeout(self, timeout_s: float) -> None:
        """How long a call waits for the daemon's reply from now on."""
        self._sock.settimeout(timeout_s)

    def try_call(self, kind: int, body: bytes) -> bytes | None:
        """The reply's body; None when another thread is using the channel.
        Raises the daemon's error as a typed KVStoreError, OSError when the
        connection is lost (the channel is then :attr:`broken`)."""
        if self.broken or not self._lock.acquire(blocking=False):
            return None
        try:
            return self._call(kind, body)
        finally:
            self._lock.release()

    def _call(self, kind: int, body: bytes, then: Callable[[], bytes] | None = None) -> bytes:
        """Send a request (then, with ``then``, the ``S`` message of what it returns) and read the reply."""
        try:
            self._sock.sendall(encode(kind, body))
            if then is not None:
                self._sock.sendall(encode(KIND_SUMS, then()))
            length, reply_kind = HEADER.unpack(self._recv(HEADER.size))
            if not 1 <= length <= MAX_BODY + 1:
                raise ConnectionError(f"daemon sent a control message of {length} bytes")
            reply = self._recv(length - 1)
        except BaseException:
            self.close()
            raise
        if reply_kind not in (KIND_OK, KIND_ERROR):
            self.close()
        return reply_body(reply_kind, reply)

    def attach(self) -> ArenaReader | None:
        """Map the daemon's shared arena (kvstore/tiers/shared_arena.py) into
        :attr:`arena`; None when it does not offer one (a token file, turned
        off, no tier that can) or this is not x86-64."""
        fds: list[int] = []
        with self._lock:
            if self.attempted_attach or not SHARING_SUPPORTED or self.broken:
                return self.arena
            self.attempted_attach = True
            try:
                self._sock.sendall(encode(KIND_ATTACH, b"\x01" if self._want_writes else b""))
                head, fds, _flags, _addr = socket.recv_fds(self._sock, HEADER.size + DESCRIPTION.size, 2)
                if len(head) < HEADER.size:
                    head += self._recv(HEADER.size - len(head))
                length, kind = HEADER.unpack_from(head)
                if not 1 <= length <= MAX_BODY + 1:
                    raise ConnectionError(f"daemon sent a control message of {length} bytes")
                body = head[HEADER.size :]
                if len(body) < length - 1:
                    body += self._recv(length - 1 - len(body))
            except BaseException:
                _close_all(fds)
                self.close()
                raise
        try:
            description = reply_body(kind, body)
            if len(fds) != 2:
                raise ConnectionError(f"daemon passed {len(fds)} descriptors with its shared arena, not 2")
            self.arena = ArenaReader(fds[0], fds[1], description)
        except KVStoreError:  # not offered (FAILED_PRECONDITION), or a format this client cannot read
            return None
        finally:
            _close_all(fds)
        return self.arena

    def try_put_many(self, texts: Sequence[str], values: Sequence[Value], durable: bool) -> list[str | None] | None:
        """Put each value under its key text by writing it into the daemon's arena
        (kvstore/client/arena_writes.py); for each, the tier it went to or None
        (no room reserved for it there: put it another way).  None when direct
        writes are not possible now (not offered, the channel busy or gone, values
        :func:`direct_items` turns away): use another path.  Raises the daemon's
        errors, and DEADLINE_EXCEEDED when it does not answer in time."""
        items = direct_items(texts, values)
        if items is None:
            return None
        arena = self.arena if self.attempted_attach else self.attach()
        if arena is None or not arena.writable or not self.alive():
            return None
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if self._writes is None:
                self._writes = ArenaWrites(arena)
            return self._writes.put_many(self._arena_call, items, durable)
        except TimeoutError:
            raise error_for_status("DEADLINE_EXCEEDED", f"no reply within {self._sock.gettimeout()} s") from None
        except (OSError, NotFound):
            return None  # the connection is gone (closed), or the daemon lost the segment
        finally:
            self._lock.release()

    def _arena_call(self, request: pb.ArenaPutRequest, then: Callable[[], bytes] | None = None, /) -> pb.ArenaPutReply:
        return pb.ArenaPutReply.FromString(self._call(KIND_WRITE, request.SerializeToString(), then))

    @property
    def direct_writes(self) -> int:
        """Puts written into the daemon's arena over this channel."""
        return 0 if self._writes is None else self._writes.count

    def alive(self) -> bool:
        """False once the daemon closed this connection (checked without waiting):
        then its shared arena, if any, is no longer kept up to date."""
        if self.broken:
            return False
        if not self._lock.acquire(blocking=False):
            return True  # a call is in flight: it finds out
        try:
            if self._poll.poll(0):  # the daemon never speaks unasked: this is its close
                self.close()
                return False
            return True
        finally:
            self._lock.release()

    def read_shared(self, key_text: str, out: torch.Tensor | None) -> tuple[ChunkMeta, torch.Tensor] | None:
        """The chunk's metadata and bytes (in ``out``, or a new tensor) read from the
        daemon's shared arena (attached on first use), and noted to be told; None
        when that is not possible now: ask the daemon."""
        arena = self.arena if self.attempted_attach else self.attach()
        if arena is None or not self.alive():
            return None
        started = time.perf_counter()
        read = arena.read(key_text, out)
        if read is not None:
            self._note(key_text, time.perf_counter() - started)
        return read

    def _note(self, key_text: str, seconds: float) -> None:
        now = time.monotonic()
        with self._untold_lock:
            if not self._untold:
                self._untold_since = now
            self._untold.append((key_text, seconds))
            if len(self._untold) < TELL_BATCH and now - self._untold_since < TELL_EVERY_S:
                return
            batch, self._untold = self._untold, []
        if not self.try_tell(batch) and not self.broken:  # busy: keep them for the next read
            with self._untold_lock:
                self._untold[:0] = batch[-4 * TELL_BATCH :]

    def try_tell(self, reads: list[tuple[str, float]]) -> bool:
        """Tell the daemon about ``reads`` (key text, seconds) made from the
        shared arena; False if the channel is busy (try later) or broken."""
        if self.broken or not self._lock.acquire(blocking=False):
            return False
        try:
            body = b"".join(
                TOUCH.pack(min(int(sec * 1e6), 0xFFFFFFFF), len(raw)) + raw
                for raw, sec in ((text.encode(), sec) for text, sec in reads)
            )
            self._sock.sendall(encode(KIND_TOUCHED, body))
            return True
        except OSError:
            self.close()
            return False
        finally:
            self._lock.release()

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self._sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionError("the daemon closed the control channel")
            got += k
        return bytes(buf)

    def close(self) -> None:
        """Tell the daemon the reads not yet told, then close (idempotent)."""
        if self._untold and not self.broken:
            untold, self._untold = self._untold, []
            self.try_tell(untold)
        if self._writes is not None and not self.broken and self._lock.acquire(blocking=False):
            try:
                # Best effort: the daemon takes back what a connection holds when it closes.
                with contextlib.suppress(OSError, KVStoreError):
                    self._writes.give_back(self._arena_call)
            finally:
                self._lock.release()
        self.broken = True
        self._sock.close()
        if self.arena is not None:
            self.arena.close()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
