"""``KVStore/Get`` over the client's own HTTP/2 connection: the gRPC wire
protocol, without grpcio's copies.

grpcio's Python layer hands each received message to Python as a new
``bytes`` put together slice by slice: socket -> gRPC slices -> one ``bytes``
per slice -> a ``bytearray`` -> the message ``bytes``, four copies of every
payload byte and fresh memory (page faults) for each message, before the
caller copies the payload into its tensor.  On the 2-core machine that cost
the client 3.5-9 ms of CPU per 4 MiB Get, more than the daemon spent serving
it.  This module speaks the same protocol to the same ``Get`` method over a
blocking socket and reads each data frame's payload from the socket straight
into the caller's buffer: one copy.  The daemon is an ordinary gRPC server
and sees an ordinary gRPC client.

What it implements, no more (RFC 9113 and gRPC's "PROTOCOL-HTTP2"):

* the client preface and SETTINGS (no push, stream window 2^31-1, frames up
  to 16 MiB) and a connection window kept open with WINDOW_UPDATE;
* one call at a time: a HEADERS frame (HPACK literals without indexing, so
  encoding keeps no state) and one DATA frame with the length-prefixed
  ``GetRequest``;
* the reply: HEADERS, DATA frames carrying length-prefixed ``GetFrame``
  messages, trailers with ``grpc-status``; PING answered, SETTINGS
  acknowledged, GOAWAY and RST_STREAM ending the call.  Response headers are
  decoded with ``hpack`` (they may use HPACK's dynamic table and Huffman).

Errors: a status from the daemon raises its typed error
(:func:`~kvstore.errors.error_for_status`); a deadline raises
DEADLINE_EXCEEDED; anything else that goes wrong with the connection
(refused, reset, GOAWAY, an UNAVAILABLE status, a reply this module does
not expect) raises :class:`FallBack`, and the caller repeats the call
through grpcio, which owns retries and the UNAVAILABLE semantics.  After any
error the connection is closed; the next call opens a new one.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from urllib.parse import unquote

import hpack

from kvstore.errors import KVStoreError, error_for_status
from kvstore.http2 import (
    ACK, ASK_HEADER, CONTINUATION, DATA, END_HEADERS, END_STREAM, GET_PATH, GOAWAY, HEADERS, MAX_FRAME, MAX_WINDOW, PADDED, PING, PORT_HEADER,
    PREFACE, PRIORITY_FLAG, PUSH_PROMISE, RST_STREAM, SETTINGS, SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_FRAME_SIZE, STATUS_NAMES, WINDOW_UPDATE, frame, grpc_timeout, literal, parse_frame_header,
    stateless_fields,
)
from kvstore.v1 import kvstore_pb2 as pb

#: A request larger than this goes through grpcio (it would need the daemon's
#: window and frame size, which this module does not track for sending).
MAX_REQUEST = 16 << 10
#: Largest message read into memory whole (headers; data frames not in the
#: daemon's one-field form): the daemon's largest frame plus room.
MAX_MESSAGE = (64 << 20) + (64 << 10)
#: Window given back in one WINDOW_UPDATE once this much was received.
REFILL = 1 << 30
#: Receive buffer for frame headers and small messages; payloads bypass it.
BUFFER = 256 << 10
#: SO_RCVBUF of the connection (the kernel caps it at net.core.rmem_max).
SOCKET_BUFFER = 4 << 20
#: Bytes of a header message read before looking for its inline data (far more than its small fields).
HEADER_PEEK = 4 << 10

#: HTTP status -> gRPC status when a reply carries no grpc-status (gRPC's http-grpc-status-mapping).
_HTTP_STATUS = {400: "INTERNAL", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "UNIMPLEMENTED",
                429: "UNAVAILABLE", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "UNAVAILABLE"}

#: Where a found chunk's payload goes: a writable view of exactly ``meta.nbytes``.
Destination = Callable[[pb.GetHeader], memoryview]


class FallBack(Exception):
    """The connection failed in a way grpcio handles better (retries, UNAVAILABLE): repeat the call there."""


class _StreamEnded(Exception):
    """Trailers arrived: the reply has no more messages."""


class _Socket:
    """A socket with a small receive buffer, and reads that bypass it into a caller's buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray(BUFFER)
        self._view = memoryview(self._buf)
        self._pos = 0
        self._end = 0
        self.deadline = float("inf")

    def _recv(self, into: memoryview) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        n = self.sock.recv_into(into)
        if n == 0:
            raise ConnectionError("the daemon closed the connection")
        return n

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes (``n`` <= BUFFER)."""
        if self._end - self._pos < n:
            if self._pos + n > BUFFER:
                held = self._end - self._pos
                self._view[:held] = self._view[self._pos : self._end]
                self._pos, self._end = 0, held
            while self._end - self._pos < n:
                self._end += self._recv(self._view[self._end :])
        out = bytes(self._view[self._pos : self._pos + n])
        self._pos += n
        return out

    def read_into(self, dst: memoryview) -> None:
        """Fill ``dst``: what is buffered, then straight from the socket."""
        k = min(self._end - self._pos, len(dst))
        if k:
            dst[:k] = self._view[self._pos : self._pos + k]
            self._pos += k
        if self._pos == self._end:
            self._pos = self._end = 0
        while k < len(dst):
            k += self._recv(dst[k:])

    def skip(self, n: int) -> None:
        while n > 0:
            k = min(n, BUFFER)
            self.take(k)
            n -= k

    def buffered(self) -> int:
        return self._end - self._pos

    def peek(self, n: int) -> bytes:
        return bytes(self._view[self._pos : self._pos + n])

    def read_available(self) -> None:
        """Buffer what has arrived, without waiting; ConnectionError on EOF."""
        if self._pos:
            held = self._end - self._pos
            self._view[:held] = self._view[self._pos : self._end]
            self._pos, self._end = 0, held
        if self._end == BUFFER:
            return
        self.sock.settimeout(0.0)
        try:
            n = self.sock.recv_into(self._view[self._end :])
        except (BlockingIOError, ssl.SSLWantReadError):
            return
        if n == 0:
            raise ConnectionError("the daemon closed the connection")
        self._end += n


class H2GetConnection:
    """One HTTP/2 connection to the daemon carrying one Get at a time; see the module docstring."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        connect_timeout_s: float = 5.0,
    ) -> None:
        raw = _connect(host, port, connect_timeout_s)
        try:
            sock: socket.socket = raw
            if tls is not None:
                sock = tls.wrap_socket(raw, server_hostname=server_hostname or host)
                if sock.selected_alpn_protocol() != "h2":
                    raise ConnectionError("the daemon did not agree to HTTP/2 (ALPN)")
            settings = struct.pack(
                ">HIHIHI",
                SETTINGS_ENABLE_PUSH, 0,
                SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW,
                SETTINGS_MAX_FRAME_SIZE, MAX_FRAME,
            )
            sock.sendall(
                PREFACE
                + frame(SETTINGS, 0, 0, settings)
                + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - 65535))
            )
        except BaseException:
            raw.close()
            raise
        self._sock = _Socket(sock)
        self._decoder = hpack.Decoder()
        self._scheme = "https" if tls is not None else "http"
        self._authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        #: The request headers that never change on this connection.
        self._fixed_block = b"".join(
            (
                b"\x83",  # :method POST (static table index 3)
                b"\x87" if self._scheme == "https" else b"\x86",  # :scheme (7 / 6)
                literal(":path", GET_PATH),
                literal(":authority", self._authority),
                literal("content-type", "application/grpc"),
                literal("te", "trailers"),
            )
        )
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._metadata_block = b""
        self._next_stream = 1
        self._received = 0  # connection-window bytes not yet given back
        self.broken = False
        self._closing = False  # the daemon sent a graceful GOAWAY: close after the call
        # State of the call in progress.
        self._stream = 0
        self._stream_received = 0
        self._data_left = 0  # payload bytes left in the current DATA frame
        self._pad_left = 0
        self._data_ends = False  # the current DATA frame carries END_STREAM
        self._headers: list[tuple[str, str]] = []
        self._trailers: list[tuple[str, str]] | None = None

    @property
    def advertised_port(self) -> int | None:
        """The daemon's HTTP/2 Get listener port, if the last reply's headers named one."""
        value = dict(self._headers).get(PORT_HEADER, "")
        return int(value) if value.isdigit() and 0 < int(value) < 65536 else None

    def close(self) -> None:
        self.broken = True
        try:
            self._sock.sock.close()
        except OSError:
            pass

    def fileno(self) -> int:
        return self._sock.sock.fileno()

    def pending(self) -> bool:
        """Bytes already received (TLS records decrypted, or buffered here) that no one read."""
        sock = self._sock.sock
        return self._sock.buffered() > 0 or (isinstance(sock, ssl.SSLSocket) and sock.pending() > 0)

    def serve_idle(self) -> None:
        """Between calls: answer PING and SETTINGS, close on GOAWAY or EOF; never waits.

        Without this a daemon shutting down gracefully waits up to 20 s for the
        answer to the PING that follows its first GOAWAY."""
        try:
            self._sock.read_available()
            while self._sock.buffered() >= 9:
                length, kind, flags, _ = _frame_header(self._sock.peek(9))
                if self._sock.buffered() < 9 + length:
                    if 9 + length > BUFFER:
                        self.close()  # nothing that large comes between calls
                    return
                self._sock.take(9)
                payload = self._sock.take(length)
                if kind == SETTINGS and not flags & ACK:
                    self._sock.sock.sendall(frame(SETTINGS, ACK, 0))
                elif kind == PING and not flags & ACK:
                    self._sock.sock.sendall(frame(PING, ACK, 0, payload))
                elif kind in (DATA, HEADERS, CONTINUATION, PUSH_PROMISE, RST_STREAM, GOAWAY):
                    # GOAWAY: the daemon is going; the rest: no call is open, nothing else may come.
                    self.close()
                    return
        except (OSError, ConnectionError, FallBack):
            self.close()

    # -- a call ------------------------------------------------------------------------
    def get(
        self,
        request: pb.GetRequest,
        *,
        metadata: Sequence[tuple[str, str]],
        timeout_s: float,
        destination: Destination,
    ) -> list[tuple[pb.GetHeader, memoryview | None]]:
        """Run one Get; each chunk's header with its payload (in ``destination(header)``) or None.

        Raises the daemon's status as a typed error, DEADLINE_EXCEEDED, or
        :class:`FallBack`; the connection is unusable after any of them."""
        if self.broken:
            raise FallBack("connection closed")
        body = request.SerializeToString()
        if len(body) + 5 > MAX_REQUEST or self._next_stream > MAX_WINDOW:
            raise FallBack("request too large for the raw connection")
        self._sock.deadline = time.monotonic() + timeout_s
        try:
            self._sock.sock.settimeout(timeout_s)  # for sendall; serve_idle left it non-blocking
            self._start(body, metadata, timeout_s)
            got = self._read_reply(destination)
            if self._closing:
                self.close()
            return got
        except (TimeoutError, socket.timeout):
            self.close()
            raise error_for_status("DEADLINE_EXCEEDED", f"no complete reply within {timeout_s:g} s") from None
        except KVStoreError:
            self.close()
            raise
        except (OSError, ConnectionError, ssl.SSLError, hpack.HPACKError) as exc:
            self.close()
            raise FallBack(f"{type(exc).__name__}: {exc}") from None
        except BaseException:
            self.close()
            raise

    def _start(self, body: bytes, metadata: Sequence[tuple[str, str]], timeout_s: float) -> None:
        stream, self._next_stream = self._next_stream, self._next_stream + 2
        self._stream, self._stream_received = stream, 0
        self._data_left = self._pad_left = 0
        self._data_ends = False
        self._headers, self._trailers = [], None
        meta = tuple(metadata)
        if meta != self._metadata:
            self._metadata, self._metadata_block = meta, b"".join(literal(k, v) for k, v in meta)
        block = self._fixed_block + literal("grpc-timeout", grpc_timeout(timeout_s)) + self._metadata_block
        message = b"\x00" + struct.pack(">I", len(body)) + body
        self._sock.sock.sendall(
            frame(HEADERS, END_HEADERS, stream, block) + frame(DATA, END_STREAM, stream, message)
        )

    def _read_reply(self, destination: Destination) -> list[tuple[pb.GetHeader, memoryview | None]]:
        out: list[tuple[pb.GetHeader, memoryview | None]] = []
        while self._next_message():
            flag, size = struct.unpack(">BI", self._take(5))
            if flag != 0:
                raise FallBack("compressed message (compression was not asked for)")
            header, inline, rest = self._header(size)
            if not header.found:
                out.append((header, None))
                continue
            dst = destination(header)
            if len(dst) != header.meta.nbytes:
                raise ValueError(f"destination of {len(dst)} bytes for a chunk of {header.meta.nbytes}")
            first = len(inline) + rest
            if first > len(dst):
                raise FallBack(f"the daemon sent more bytes than chunk {header.key} has")
            dst[: len(inline)] = inline
            self._read_into(dst[len(inline) : first])
            self._fill(dst, header.key, first)
            out.append((header, dst))
        self._check_status()
        return out

    def _header(self, size: int) -> tuple[pb.GetHeader, bytes, int]:
        """A header message of ``size`` bytes: the header (without its inline data),
        the inline data bytes read with it, and how many more of them follow.

        The daemon writes ``GetHeader.data`` (GetRequest.inline_data) last: the
        small fields are parsed from the first bytes, and the data is left for
        the caller to read straight into place."""
        head = self._take(min(size, HEADER_PEEK))
        if len(head) < size:
            found = _inline_data_at(head, size)
            if found is not None:
                fields_at, data_at, data_len = found
                try:
                    header = pb.GetHeader.FromString(head[fields_at : data_at - 1 - _varint_len(data_len)])
                except Exception as exc:  # DecodeError
                    raise FallBack(f"undecodable GetHeader: {exc}") from None
                inline = head[data_at:]
                return header, inline, data_len - len(inline)
        frame = self._message(size - len(head), head)
        if frame.WhichOneof("part") != "header":
            raise FallBack("data frame before any header")
        header = frame.header
        inline = header.data
        header.ClearField("data")
        return header, inline, 0

    def _fill(self, dst: memoryview, key: str, filled: int = 0) -> None:
        """Read data messages until ``dst`` is full (``filled`` bytes are already)."""
        while filled < len(dst):
            if not self._next_message():
                self._check_status()
                raise FallBack(f"the reply ended inside chunk {key}")
            flag, size = struct.unpack(">BI", self._take(5))
            if flag != 0:
                raise FallBack("compressed message (compression was not asked for)")
            # The daemon's data frames are exactly tag 0x12, a varint length,
            # the payload: read the payload straight into place.
            head = self._take(min(size, 11))
            length, used = _data_prefix(head)
            if length is not None and used + length == size:
                if filled + length > len(dst):
                    raise FallBack(f"the daemon sent more bytes than chunk {key} has")
                rest = len(head) - used
                dst[filled : filled + rest] = head[used:]
                self._read_into(dst[filled + rest : filled + length])
                filled += length
                continue
            frame = self._message(size - len(head), head)
            if frame.WhichOneof("part") != "data":
                raise FallBack(f"a header inside chunk {key}")
            data = frame.data
            if filled + len(data) > len(dst):
                raise FallBack(f"the daemon sent more bytes than chunk {key} has")
            dst[filled : filled + len(data)] = data
            filled += len(data)

    def _message(self, size: int, head: bytes = b"") -> pb.GetFrame:
        if size + len(head) > MAX_MESSAGE:
            raise FallBack(f"message of {size + len(head)} bytes")
        raw = head + self._take(size) if size else head
        try:
            return pb.GetFrame.FromString(raw)
        except Exception as exc:  # DecodeError: a reply this module does not expect
            raise FallBack(f"undecodable GetFrame: {exc}") from None

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
            length, kind, flags, stream = _frame_header(self._sock.take(9))
            if kind == DATA:
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
            elif kind == HEADERS:
                fields = self._header_block(length, flags)
                if stream != self._stream:
                    continue
                if flags & END_STREAM:
                    self._trailers = fields
                    raise _StreamEnded
                self._headers = fields
            elif kind == SETTINGS:
                payload = self._sock.take(length)
                if not flags & ACK:
                    self._sock.sock.sendall(frame(SETTINGS, ACK, 0))
                del payload
            elif kind == PING:
                payload = self._sock.take(length)
                if not flags & ACK:
                    self._sock.sock.sendall(frame(PING, ACK, 0, payload))
            elif kind == RST_STREAM:
                payload = self._sock.take(length)
                if stream == self._stream:
                    (code,) = struct.unpack(">I", payload[:4])
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
            else:  # PRIORITY, WINDOW_UPDATE, unknown: nothing to do
                self._sock.skip(length)

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
            length, kind, flags, _ = _frame_header(self._sock.take(9))
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


class H2GetChannel:
    """The client's HTTP/2 connection for gets: opened on first use, carrying one call
    at a time, and watched between calls by a thread that runs
    :meth:`H2GetConnection.serve_idle` once the connection has been quiet for
    :data:`IDLE_S` (so back-to-back calls never wake it)."""

    #: Quiet time after which the watcher looks at the connection.
    IDLE_S = 0.1

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self._target = (host, port)
        self._tls = tls
        self._server_hostname = server_hostname
        self._connect_timeout = connect_timeout_s
        self._conn: H2GetConnection | None = None
        self._cv = threading.Condition()
        self._busy = False
        self._closed = False
        self._calls = 0
        self._watcher: threading.Thread | None = None
        #: Calls this channel completed (the others went back to the caller as None).
        self.served = 0
        #: The port of the connection in use: the daemon's gRPC port or its HTTP/2 Get listener.
        self.port = port
        #: The listener's port, once the daemon named it (kvstore/server/h2get.py).
        self._fast: int | None = None
        self._learn = True  # ask the daemon for it on the next call to the gRPC port
        self._unreachable: set[int] = set()

    def get(
        self,
        request: pb.GetRequest,
        *,
        metadata: Sequence[tuple[str, str]],
        timeout_s: float,
        destination: Destination,
    ) -> list[tuple[pb.GetHeader, memoryview | None]] | None:
        """:meth:`H2GetConnection.get`, or None: the channel is busy with another
        thread's call, closed, or the connection failed (see :class:`FallBack`)."""
        with self._cv:
            if self._busy or self._closed:
                return None
            self._busy = True
            self._calls += 1
        try:
            conn = self._connection()
            if conn is None:
                return None
            ask = self._learn and self._fast is None
            try:
                got = conn.get(
                    request, metadata=[*metadata, (ASK_HEADER, "1")] if ask else metadata, timeout_s=timeout_s,
                    destination=destination,
                )
            except FallBack:
                return None
            self.served += 1
            if ask:
                port = conn.advertised_port
                self._learn = False
                if port is not None and port != self._target[1] and port not in self._unreachable:
                    self._fast = port  # the next call opens a connection there
                    self._conn = None
                    conn.close()
            return got
        finally:
            with self._cv:
                self._busy = False

    def _connection(self) -> H2GetConnection | None:
        """The open connection, or a new one: to the listener if known, else (or if it
        cannot be reached) to the gRPC port; None if neither can be opened."""
        conn = self._conn
        if conn is not None and not conn.broken:
            return conn
        self._conn = None
        while True:
            port = self._fast or self._target[1]
            try:
                conn = H2GetConnection(
                    self._target[0], port, tls=self._tls, server_hostname=self._server_hostname,
                    connect_timeout_s=self._connect_timeout,
                )
            except OSError:
                if self._fast is None:
                    return None
                # Gone (a restarted daemon listens elsewhere) or filtered: ask again, never for this port.
                self._unreachable.add(self._fast)
                self._fast, self._learn = None, True
                continue
            break
        self._conn = conn
        self.port = port
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="kvstore-h2get", daemon=True)
            self._watcher.start()
        return conn

    def close(self) -> None:
        with self._cv:
            self._closed = True
            conn, self._conn = self._conn, None
            self._cv.notify_all()
        if conn is not None:
            conn.close()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(2.0)

    def _watch(self) -> None:
        seen = -1
        while True:
            with self._cv:
                if self._closed:
                    return
                conn = self._conn
                if self._busy or conn is None or conn.broken or self._calls != seen:
                    seen = self._calls
                    self._cv.wait(self.IDLE_S)  # only close() notifies
                    continue
            try:
                ready = conn.pending() or bool(select.select([conn.fileno()], [], [], 0.5)[0])
            except (OSError, ValueError):  # closed meanwhile
                ready = True
            if not ready:
                continue
            with self._cv:
                if self._busy or self._closed or self._conn is not conn:
                    continue
                self._busy = True
            try:
                conn.serve_idle()
            finally:
                with self._cv:
                    self._busy = False


def _connect(host: str, port: int, timeout_s: float) -> socket.socket:
    """A TCP connection with TCP_NODELAY and a receive buffer set before connecting
    (so that the window it advertises is large from the start): a 1 MiB reply then
    arrives without the sender pacing it (loopback here: 0.24 against 0.35-0.40 ms)."""
    error: OSError | None = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            sock.settimeout(timeout_s)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error or OSError(f"{host}: no address to connect to")


def _frame_header(raw: bytes) -> tuple[int, int, int, int]:
    got = parse_frame_header(raw)
    if got[0] > MAX_FRAME:
        raise FallBack(f"frame of {got[0]} bytes, larger than the {MAX_FRAME} allowed")
    return got


def _data_prefix(head: bytes) -> tuple[int | None, int]:
    """(payload length, bytes of tag + varint) when ``head`` starts a ``data`` field, else (None, 0)."""
    if not head or head[0] != 0x12:
        return None, 0
    got = _varint(head, 1)
    return (None, 0) if got is None else got


def _varint(raw: bytes, at: int) -> tuple[int, int] | None:
    """(value, position after it) of the varint at ``at``, or None if ``raw`` ends first."""
    n = shift = 0
    for i in range(at, min(len(raw), at + 10)):
        b = raw[i]
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i + 1
        shift += 7
    return None


def _varint_len(n: int) -> int:
    return max(1, -(-n.bit_length() // 7))


def _inline_data_at(head: bytes, size: int) -> tuple[int, int, int] | None:
    """Where ``head`` (the first bytes of a message of ``size`` bytes) has a
    ``GetFrame{header}`` whose last field is ``GetHeader.data`` running to the
    end of the message: (start of the header's fields, start of the data, data
    length); None when it is not laid out so (the caller then parses it whole)."""
    if not head or head[0] != 0x0A:
        return None
    got = _varint(head, 1)
    if got is None or got[1] + got[0] != size:
        return None
    fields_at = pos = got[1]
    while pos < len(head):
        tag_at = _varint(head, pos)
        if tag_at is None:
            return None
        tag, pos = tag_at
        wire = tag & 7
        if wire == 0:
            skip = _varint(head, pos)
            if skip is None:
                return None
            pos = skip[1]
        elif wire == 2:
            length = _varint(head, pos)
            if length is None:
                return None
            if tag == 0x2A:  # GetHeader.data
                data_at = length[1]
                return (fields_at, data_at, length[0]) if data_at + length[0] == size else None
            pos = length[1] + length[0]
        else:
            return None  # GetHeader has no fixed-width fields
    return None


def parse_address(address: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` -> (host, port); None for other gRPC targets (dns:///, unix:, ...)."""
    if "/" in address or address.startswith(("unix:", "dns:", "ipv4:", "ipv6:", "unix-abstract:", "vsock:")):
        return None
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
    else:
        host, sep, port = address.rpartition(":")
        if ":" in host:
            return None
    if not sep or not host or not port.isdigit():
        return None
    return host, int(port)
