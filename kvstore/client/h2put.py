"""``KVStore/Put`` over the client's own HTTP/2 connection, to the daemon's own
listener (kvstore/server/h2get.py, kvstore/server/h2put.py).

Through grpcio, a sync client's 1 MiB put cost 2-3 ms on the 2-core
development VM: grpcio consumes the request iterator in a thread of its own,
serialises every message into fresh memory, and the daemon's grpcio copies
it again on the way in.  Here the request goes from the calling thread in
one ``sendmsg`` per batch of frames: HEADERS, then the gRPC messages (each
chunk's ``PutFrame`` header, then its payload as one data message, or
several past :data:`MAX_DATA_MESSAGE`) in DATA frames of the daemon's frame
size, written from the caller's memory as it lies.

Flow control is the daemon's: the connection and stream windows it grants
(SETTINGS, WINDOW_UPDATE) and its SETTINGS_MAX_FRAME_SIZE; when a window is
spent the call reads frames until it grows.  Frames that arrive while the
request is still being sent are handled between batches, so a daemon that
answers early (a refused put: RESOURCE_EXHAUSTED, PERMISSION_DENIED, ...)
stops the sending and its status is raised.

Errors are :class:`~kvstore.client.h2get.H2GetConnection`'s: the daemon's
status as a typed error, DEADLINE_EXCEEDED, else :class:`FallBack` (the
caller repeats the put through grpcio; a put is idempotent).
"""

from __future__ import annotations

import ssl
import struct
import time
from collections.abc import Sequence

from kvstore.chunk import ChunkMeta
from kvstore.client.h2get import H2GetConnection
from kvstore.client.h2reader import _StreamEnded
from kvstore.client.h2wire import FallBack, frame_header
from kvstore.http2 import DATA, END_STREAM, PUT_PATH, next_bytes
from kvstore.http2 import frame_header as encode_frame_header
from kvstore.server import frames
from kvstore.server.messages import meta_to_pb
from kvstore.v1 import kvstore_pb2 as pb

#: Largest data message sent (the daemon takes up to 64 MiB: service.MAX_PUT_FRAME).
MAX_DATA_MESSAGE = 64 << 20
#: DATA frames written by one sendmsg at most (two pieces each, under IOV_MAX).
FRAMES_PER_SEND = 256
#: Bytes written by one sendmsg at most, so frames that arrive meanwhile are seen.
BYTES_PER_SEND = 16 << 20


def request_pieces(items: Sequence[tuple[str, ChunkMeta, memoryview]], durable: bool) -> list[bytes | memoryview]:
    """The Put request's gRPC messages (length prefixes included), payloads as views."""
    pieces: list[bytes | memoryview] = []
    for key, meta, data in items:
        header = pb.PutFrame(header=pb.PutHeader(key=key, meta=meta_to_pb(meta), durable=durable)).SerializeToString()
        small = struct.pack(">BI", 0, len(header)) + header
        for at in range(0, len(data), MAX_DATA_MESSAGE):
            part = data[at : at + MAX_DATA_MESSAGE]
            tag, _ = frames.parts(part)
            assert isinstance(tag, bytes)
            pieces.append(small + struct.pack(">BI", 0, len(tag) + len(part)) + tag)
            pieces.append(part)
            small = b""
        if small:  # an empty payload: the header alone
            pieces.append(small)
    return pieces


class H2PutConnection(H2GetConnection):
    """The client's HTTP/2 connection, carrying Puts as well as Gets (one call at a time)."""

    def put(
        self,
        items: Sequence[tuple[str, ChunkMeta, memoryview]],
        *,
        durable: bool,
        metadata: Sequence[tuple[str, str]],
        timeout_s: float,
    ) -> list[str]:
        """Store (key text, metadata with checksum, payload) each in one Put call; the
        tier of each, in order.  Raises as :meth:`H2GetConnection.get` does."""

        def call() -> list[str]:
            while not self.settings_seen:  # the daemon's frame size and windows
                self._wait_frame()
            self._start(PUT_PATH, metadata, timeout_s)
            self._sock.sock.sendall(self._pending_headers)
            self._send_request(request_pieces(items, durable))
            reply = self._read_put_reply()
            if len(reply.results) != len(items):
                raise FallBack(f"the daemon stored {len(reply.results)} chunks of {len(items)}")
            return [r.tier for r in reply.results]

        return self._call(call, timeout_s)

    def _send_request(self, pieces: list[bytes | memoryview]) -> None:
        """``pieces`` in DATA frames within the daemon's windows and frame size, the last
        with END_STREAM; stops early when the daemon answers first."""
        views = [memoryview(p).cast("B") for p in pieces]
        left = sum(len(v) for v in views)
        at = off = 0
        while left:
            self._absorb()
            if self._trailers is not None:
                return  # answered already (refused): the rest is not wanted
            allowed = min(left, self.send_window, self.stream_send)
            if allowed <= 0:
                self._wait_frame()
                continue
            batch: list[bytes | memoryview] = []
            frames_out = batch_bytes = 0
            while allowed and frames_out < FRAMES_PER_SEND and batch_bytes < BYTES_PER_SEND:
                n = min(allowed, self.peer_frame)
                slices, at, off = next_bytes(views, at, off, n)
                left -= n
                allowed -= n
                self.send_window -= n
                self.stream_send -= n
                batch.append(encode_frame_header(DATA, 0 if left else END_STREAM, self._stream, n))
                batch.extend(slices)
                frames_out += 1
                batch_bytes += n
            self._write(batch)

    def _write(self, pieces: list[bytes | memoryview]) -> None:
        sock = self._sock.sock
        sock.settimeout(max(1e-3, self._sock.deadline - time.monotonic()))  # _absorb left it non-blocking
        if isinstance(sock, ssl.SSLSocket):  # no sendmsg: one record per batch
            sock.sendall(b"".join(pieces))
            return
        views = [memoryview(p) for p in pieces]
        while views:
            sent = sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views.pop(0))
            if sent:
                views[0] = views[0][sent:]

    def _absorb(self) -> None:
        """Handle the control frames that already arrived whole (window updates, SETTINGS,
        PING, an early answer's headers and trailers), without waiting."""
        self._sock.read_available()
        while self._sock.buffered() >= 9:
            length, kind, _, _ = frame_header(self._sock.peek(9))
            if kind == DATA or self._sock.buffered() < 9 + length:
                return  # left for the reply's reader (or the next look)
            self._wait_frame()
            if self._trailers is not None:
                return

    def _wait_frame(self) -> None:
        """Read and handle one frame (waiting for it, within the call's deadline)."""
        length, kind, flags, stream = frame_header(self._sock.take(9))
        if kind == DATA:
            if stream == self._stream:
                raise FallBack("reply data before the request was sent")
            self._window(length, stream)
            self._sock.skip(length)
            return
        try:
            self._control(kind, flags, stream, length)
        except _StreamEnded:
            pass  # the trailers are kept in _trailers

    def _read_put_reply(self) -> pb.PutReply:
        """The one PutReply message and an OK status, or the status raised."""
        if self._trailers is None and self._next_message():
            flag, size = struct.unpack(">BI", self._take(5))
            if flag != 0:
                raise FallBack("compressed message (compression was not asked for)")
            try:
                reply = pb.PutReply.FromString(self._take(size) if size else b"")
            except Exception as exc:  # DecodeError
                raise FallBack(f"undecodable PutReply: {exc}") from None
            if self._next_message():
                raise FallBack("more than one PutReply")
            self._check_status()
            return reply
        self._check_status()
        raise FallBack("an OK status without a PutReply")
