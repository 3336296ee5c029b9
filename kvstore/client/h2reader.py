"""The reading half of the client's HTTP/2 connection (kvstore/client/h2get.py,
h2put.py): the frames of one call at a time, read from a
:class:`~kvstore.client.h2wire.BufferedSocket`.

* the reply's byte stream: DATA payloads of the call's stream, taken a few
  bytes at a time (:meth:`H2Reader._take`) or straight into the caller's memory
  (:meth:`H2Reader._read_into`), message by message (:meth:`H2Reader._next_message`);
* the frames around them (:meth:`H2Reader._control`): response headers and
  trailers (decoded statelessly when they are HPACK literals, with ``hpack``
  otherwise), SETTINGS and PING answered, WINDOW_UPDATE, RST_STREAM, GOAWAY;
* flow control both ways: the connection's receive window given back in large
  steps, and what the daemon lets this end send (its windows and
  SETTINGS_MAX_FRAME_SIZE, kept for a Put's request);
* the call's status from its trailers (:meth:`H2Reader._check_status`).
"""

from __future__ import annotations

import struct
from urllib.parse import unquote

import hpack

from kvstore.client.h2wire import BUFFER, BufferedSocket, FallBack, frame_header
from kvstore.errors import error_for_status
from kvstore.http2 import (
    ACK, CONTINUATION, DATA, DEFAULT_WINDOW, END_HEADERS, END_STREAM, GOAWAY, HEADERS, MAX_FRAME, MAX_WINDOW,
    MIN_FRAME, NO_ERROR, PADDED, PING, PRIORITY_FLAG, PUSH_PROMISE, RST_STREAM, SETTINGS,
    SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, STATUS_NAMES, WINDOW_UPDATE, frame, stateless_fields,
)

#: Window given back in one WINDOW_UPDATE once this much was received.
REFILL = 1 << 30
#: HTTP status -> gRPC status when a reply carries no grpc-status (gRPC's http-grpc-status-mapping).
_HTTP_STATUS = {400: "INTERNAL", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "UNIMPLEMENTED",
                429: "UNAVAILABLE", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "UNAVAILABLE"}



class _StreamEnded(Exception):
    """Trailers arrived: the reply has no more messages."""


class H2Reader:
    """The frames of the call in progress on one connection; see the module docstring."""

    def __init__(self, sock: BufferedSocket) -> None:
        self._sock = sock
        self._decoder = hpack.Decoder()
        self._received = 0  # connection-window bytes not yet given back
        self._closing = False  # the daemon sent a graceful GOAWAY: close after the call
        # State of the call in progress.
        self._stream = 0
        self._stream_received = 0
        self._data_left = 0  # payload bytes left in the current DATA frame
        self._pad_left = 0
        self._data_ends = False  # the current DATA frame carries END_STREAM
        self._headers: list[tuple[str, str]] = []
        self._trailers: list[tuple[str, str]] | None = None
        # What the daemon lets this end send (a Put's request, kvstore/client/h2put.py).
        self.peer_frame = MIN_FRAME  # its SETTINGS_MAX_FRAME_SIZE
        self._peer_initial = DEFAULT_WINDOW  # its SETTINGS_INITIAL_WINDOW_SIZE
        self.send_window = DEFAULT_WINDOW  # the connection's send window
        self.stream_send = 0  # the current stream's send window
        self.settings_seen = False  # the daemon's first SETTINGS arrived

    def _check_status(self) -> None:
        """Raise the call's status unless it is OK; trailers must have arrived."""
        if self._trailers is None:
            raise FallBack("the reply ended without a status")
        fields = dict(self._headers + self._trailers)
        status = fields.get("grpc-status")
        if status is None:
            http = int(fields.get(":status", "0") or 0)
            name = _HTTP_STATUS.get(http, "UNKNOWN")
            message = f"HTTP {http} without a gRPC status"
        else:
            name = STATUS_NAMES.get(int(status), "UNKNOWN")
            message = unquote(fields.get("grpc-message", ""))
        if name == "OK":
            return
        if name == "UNAVAILABLE":
            raise FallBack(message)
        raise error_for_status(name, message or name)

    # -- the reply's byte stream (DATA payloads of our stream) ------------------------
    def _next_message(self) -> bool:
        """True when another message follows; False when the trailers came."""
        try:
            while self._data_left == 0:
                self._next_data()
        except _StreamEnded:
            return False
        return True

    def _more_data(self) -> None:
        """Advance to payload inside a message: trailers here end the reply early."""
        try:
            while self._data_left == 0:
                self._next_data()
        except _StreamEnded:
            self._check_status()
            raise FallBack("the reply ended inside a message") from None

    def _take(self, n: int) -> bytes:
        parts = []
        while n:
            self._more_data()
            k = min(n, self._data_left, BUFFER)
            parts.append(self._sock.take(k))
            self._consumed(k)
            n -= k
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_into(self, dst: memoryview) -> None:
        off = 0
        while off < len(dst):
            self._more_data()
            k = min(len(dst) - off, self._data_left)
            self._sock.read_into(dst[off : off + k])
            self._consumed(k)
            off += k

    def _consumed(self, k: int) -> None:
        self._data_left -= k
        if self._data_left == 0:
            if self._pad_left:
                self._sock.skip(self._pad_left)
                self._pad_left = 0
            if self._data_ends:
                raise FallBack("END_STREAM on a DATA frame: the reply has no status")

    # -- frames ------------------------------------------------------------------------
    def _next_data(self) -> None:
        """Handle frames until a DATA frame of our stream with payload; _StreamEnded on trailers."""
        while True:
            length, kind, flags, stream = frame_header(self._sock.take(9))
            if kind != DATA:
                self._control(kind, flags, stream, length)
                continue
            self._window(length, stream)
            pad = 0
            if flags & PADDED:
                pad = self._sock.take(1)[0]
                length -= 1
            if stream != self._stream:
                self._sock.skip(length)
                continue
            if pad > length:
                raise FallBack("DATA padding longer than the frame")
            self._data_left, self._pad_left = length - pad, pad
            self._data_ends = bool(flags & END_STREAM)
            if self._data_left:
                return
            if self._pad_left:
                self._sock.skip(self._pad_left)
                self._pad_left = 0
            if self._data_ends:
                raise FallBack("END_STREAM on a DATA frame: the reply has no status")

    def _control(self, kind: int, flags: int, stream: int, length: int) -> None:
        """A frame other than DATA whose 9-byte header was read: its payload read and
        acted on; _StreamEnded when it carries our stream's trailers."""
        if kind == HEADERS:
            fields = self._header_block(length, flags)
            if stream != self._stream:
                return
            if flags & END_STREAM:
                self._trailers = fields
                raise _StreamEnded
            self._headers = fields
        elif kind == SETTINGS:
            self._settings(flags, self._sock.take(length))
        elif kind == WINDOW_UPDATE:
            self._window_update(stream, self._sock.take(length))
        elif kind == PING:
            payload = self._sock.take(length)
            if not flags & ACK:
                self._sock.sock.sendall(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            payload = self._sock.take(length)
            if stream == self._stream:
                (code,) = struct.unpack(">I", payload[:4])
                if code == NO_ERROR and self._trailers is not None:
                    return  # answered: the rest of the request is not wanted
                raise FallBack(f"the daemon reset the stream (HTTP/2 error {code})")
        elif kind == GOAWAY:
            payload = b"".join(self._chunks(length))
            last, code = struct.unpack(">II", payload[:8]) if length >= 8 else (0, -1)
            if code != 0 or (last & MAX_WINDOW) < self._stream:
                raise FallBack("the daemon is closing the connection (GOAWAY)")
            self._closing = True  # a graceful stop that lets this call finish; no new calls here
        elif kind == CONTINUATION:
            raise FallBack("CONTINUATION without HEADERS")
        elif kind == PUSH_PROMISE:
            raise FallBack("PUSH_PROMISE although push is disabled")
        else:  # PRIORITY, unknown: nothing to do
            self._sock.skip(length)

    def _settings(self, flags: int, payload: bytes) -> None:
        """The daemon's SETTINGS: what limits our sending kept, acknowledged."""
        if flags & ACK:
            return
        for at in range(0, len(payload) - 5, 6):
            ident, value = struct.unpack_from(">HI", payload, at)
            if ident == SETTINGS_MAX_FRAME_SIZE and MIN_FRAME <= value <= MAX_FRAME:
                self.peer_frame = value
            elif ident == SETTINGS_INITIAL_WINDOW_SIZE and value <= MAX_WINDOW:
                self.stream_send += value - self._peer_initial
                self._peer_initial = value
        self.settings_seen = True
        self._sock.sock.sendall(frame(SETTINGS, ACK, 0))

    def _window_update(self, stream: int, payload: bytes) -> None:
        grow = int.from_bytes(payload[:4], "big") & MAX_WINDOW
        if stream == 0:
            self.send_window += grow
        elif stream == self._stream:
            self.stream_send += grow

    def _header_block(self, length: int, flags: int) -> list[tuple[str, str]]:
        payload = self._sock.take(length) if length <= BUFFER else b"".join(self._chunks(length))
        start, end = 0, len(payload)
        if flags & PADDED:
            end -= payload[0]
            start = 1
        if flags & PRIORITY_FLAG:
            start += 5
        if start > end:
            raise FallBack("malformed HEADERS frame")
        block = [payload[start:end]]
        while not flags & END_HEADERS:
            length, kind, flags, _ = frame_header(self._sock.take(9))
            if kind != CONTINUATION:
                raise FallBack("HEADERS not followed by CONTINUATION")
            block.append(b"".join(self._chunks(length)))
        # Every block that may use or change HPACK's table goes through the decoder, whatever
        # its stream: the table is per connection.  The daemon's own listener sends none.
        whole = b"".join(block)
        fields = stateless_fields(whole)
        return fields if fields is not None else [(str(k), str(v)) for k, v in self._decoder.decode(whole)]

    def _chunks(self, n: int) -> list[bytes]:
        out = []
        while n:
            k = min(n, BUFFER)
            out.append(self._sock.take(k))
            n -= k
        return out

    def _window(self, length: int, stream: int) -> None:
        """Give the window back, in large steps, so the daemon never waits for it."""
        self._received += length
        updates = b""
        if self._received >= REFILL:
            updates += frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._received))
            self._received = 0
        if stream == self._stream:
            self._stream_received += length
            if self._stream_received >= REFILL:
                updates += frame(WINDOW_UPDATE, 0, stream, struct.pack(">I", self._stream_received))
                self._stream_received = 0
        if updates:
            self._sock.sock.sendall(updates)
