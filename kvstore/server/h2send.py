"""What the daemon's HTTP/2 server connection (kvstore/server/h2conn.py) sends
for a call: :class:`H2Sender`, the half of
:class:`~kvstore.server.h2conn.H2Connection` that writes replies, and the
state of one stream (:class:`Stream`), which both halves use.

* the state sending waits on: the connection's window, the peer's
  SETTINGS_MAX_FRAME_SIZE (both kept up to date by the connection, from the
  frames it reads), the transport's pause, the connection's close;
  :meth:`H2Sender._wake` wakes the calls waiting for one of them to change;
* a reply's messages in DATA frames as the connection's and the stream's
  windows allow (:meth:`H2Sender._send`), the response headers in the same
  write as the first frame and the OK trailers, when asked, as the last;
* replies written as HPACK literals (no state); the trailers with the call's
  status, or a trailers-only reply for errors before any message
  (:meth:`H2Sender._end`);
* a whole reply's DATA frames built at once (:meth:`H2Sender._data_frames`)
  and written with :meth:`H2Sender._write_pieces`: in one sendmsg while the
  transport has nothing buffered.
"""

from __future__ import annotations

import asyncio
import socket
import struct

from kvstore.server.h2put import PutSink
from kvstore.http2 import (
    CANCEL, DATA, DEFAULT_WINDOW, END_HEADERS, END_STREAM, HEADERS, INTERNAL_ERROR, MIN_FRAME, RST_STREAM, frame,
    frame_header, grpc_message, literal, next_bytes,
)

#: Pieces smaller than this are joined with the frame headers around them.
JOIN_BELOW = 64 << 10

# gRPC status codes.
OK, INVALID_ARGUMENT, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL = 0, 3, 4, 8, 12, 13

#: ``:status 200`` (static table index 8) and the content type.
REPLY_HEADERS = b"\x88" + literal("content-type", "application/grpc")
OK_TRAILERS = literal("grpc-status", "0")


class Stream:
    """One stream's state: its request as it arrives, and what was sent on it."""

    __slots__ = (
        "id", "fields", "body", "window", "recv_left", "unacked", "task", "replying", "ended", "partial", "sink",
    )

    def __init__(self, stream_id: int, fields: list[tuple[str, str]], window: int, recv_window: int) -> None:
        self.id = stream_id
        self.fields = fields
        self.body = bytearray()
        self.window = window  # bytes we may still send on it
        self.recv_left = recv_window  # bytes the client may still send on it (a streaming call's)
        self.unacked = 0  # bytes received (a streaming call's: taken by its handler) and not yet given back
        self.task: asyncio.Task[None] | None = None
        self.replying = False  # response headers sent
        self.ended = False  # trailers sent
        self.partial = False  # a message begun and not finished
        #: A streaming call's request messages (a Put: kvstore/server/h2put.py); None: the
        #: request is gathered whole in ``body`` and served once complete.
        self.sink: PutSink | None = None


class H2Sender:
    """The sending half of :class:`~kvstore.server.h2conn.H2Connection`; see the
    module docstring.  The connection sets the transport and the socket once it
    is made, and keeps the open streams."""

    #: The connection's open streams (kept by H2Connection): one no longer there was reset.
    _streams: dict[int, Stream]

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._window = DEFAULT_WINDOW  # connection: bytes we may still send
        self._max_frame = MIN_FRAME  # the peer's SETTINGS_MAX_FRAME_SIZE
        self._changed = asyncio.Event()  # a window grew, writing resumed, or the connection went
        self._paused = False
        self._closed = False
        self._sock: socket.socket | None = None

    # -- the send state (pause_writing, resume_writing: asyncio.Protocol's) ----------------
    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _write(self, data: bytes | memoryview) -> None:
        if not self._closed and self._transport is not None:
            self._transport.write(data)

    # -- a call -----------------------------------------------------------------------
    def _data_frames(
        self, stream: int, parts: tuple[bytes | memoryview, ...], out: list[bytes | memoryview],
        small: list[bytes | memoryview],
    ) -> None:
        """Append to ``out`` the DATA frames carrying ``parts`` (frames of at most the
        peer's size).  Pieces under :data:`JOIN_BELOW` gather in ``small`` (bytes due
        before them may be there already) and go out joined before the next large
        one; what is left in ``small`` is the caller's to send."""
        views = [memoryview(p) for p in parts]
        left = sum(len(v) for v in views)
        at = off = 0
        while left:
            n = min(left, self._max_frame)
            small.append(frame_header(DATA, 0, stream, n))
            slices, at, off = next_bytes(views, at, off, n)
            for piece in slices:
                if len(piece) < JOIN_BELOW:
                    small.append(piece)
                else:
                    out.append(b"".join(small))
                    out.append(piece)
                    small.clear()
            left -= n

    async def _send(self, st: Stream, pieces: tuple[bytes | memoryview, ...], *, trailers: bool = False) -> None:
        """One gRPC message of ``pieces`` in DATA frames, as the windows allow; with
        ``trailers``, the OK trailers in the same write as its last frame."""
        first = b""
        if not st.replying:
            st.replying = True
            first = frame(HEADERS, END_HEADERS, st.id, REPLY_HEADERS)
        total = sum(len(p) for p in pieces)
        views = [memoryview(struct.pack(">BI", 0, total)), *(memoryview(p) for p in pieces)]
        left, at, off = total + 5, 0, 0
        while left:
            n = await self._allowance(st, left)
            self._window -= n
            st.window -= n
            slices, at, off = next_bytes(views, at, off, n)
            out: list[bytes | memoryview] = [first + frame_header(DATA, 0, st.id, n), *slices]
            first = b""
            left -= n
            if trailers and not left:
                out.append(frame(HEADERS, END_HEADERS | END_STREAM, st.id, OK_TRAILERS))
                st.ended = True
            self._write_pieces(out)
            st.partial = left > 0  # part of the message is on the wire

    def _write_pieces(self, pieces: list[bytes | memoryview]) -> None:
        """Write ``pieces`` in order: in one sendmsg when the transport has nothing
        buffered (no copy, one system call, one segment for the small ones), what
        the socket did not take through the transport."""
        if self._closed or self._transport is None:
            return
        sent = 0
        if self._sock is not None and not self._transport.get_write_buffer_size():
            try:
                sent = self._sock.sendmsg(pieces)
            except OSError:
                # Full (EAGAIN), interrupted, or the connection broke: everything goes to the
                # transport, which buffers it or reports the failure (connection_lost).
                sent = 0
        for piece in pieces:
            if sent >= len(piece):
                sent -= len(piece)
                continue
            self._transport.write(piece[sent:] if sent else piece)
            sent = 0

    async def _allowance(self, st: Stream, want: int) -> int:
        """Bytes of the next DATA frame, once the windows and the transport allow any."""
        while True:
            if self._closed:
                raise ConnectionError("the connection closed")
            n = min(want, self._max_frame, self._window, st.window)
            if n > 0 and not self._paused:
                return n
            await self._changed.wait()

    def _end(self, st: Stream, code: int, message: str) -> None:
        """Trailers with the call's status (a trailers-only reply if nothing was sent)."""
        if self._streams.get(st.id) is not st or st.ended:
            return  # reset meanwhile, or the trailers went with the last message
        if st.partial:  # a message cut off (its deadline passed while it waited for the window)
            self._write(frame(RST_STREAM, 0, st.id, struct.pack(">I", CANCEL if code == DEADLINE_EXCEEDED else INTERNAL_ERROR)))
            return
        block = b"" if st.replying else REPLY_HEADERS
        if code == OK:
            block += OK_TRAILERS
        else:
            block += literal("grpc-status", str(code)) + literal("grpc-message", grpc_message(message)[:4096])
        self._write(frame(HEADERS, END_HEADERS | END_STREAM, st.id, block))
