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

Around it: kvstore/client/h2reader.py (its base: the frames of a call, the
reply's byte stream, the status), kvstore/client/h2wire.py (the buffered
socket, the TCP connection, the framing and protobuf layout facts the reader
needs), kvstore/client/h2put.py (Put on the same connection) and
kvstore/client/h2channel.py (the client's one connection, opened on first
use, moved to the daemon's listener, watched between calls).
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import hpack

from kvstore.client.h2reader import H2Reader
from kvstore.client.h2wire import (
    BUFFER, BufferedSocket, FallBack, Target, connect, frame_header, inline_data_at, varint_len,
)
from kvstore.errors import KVStoreError, error_for_status
from kvstore.http2 import (
    ACK, CONTINUATION, DATA, END_HEADERS, END_STREAM, GET_PATH, GOAWAY, HEADERS, MAX_FRAME, MAX_WINDOW, PING, PORT_HEADER, PREFACE,
    PUSH_PROMISE, RST_STREAM, SETTINGS, SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE,
    WINDOW_UPDATE, frame, grpc_timeout, literal,
)
from kvstore.server.frames import data_prefix
from kvstore.v1 import kvstore_pb2 as pb

#: A Get request larger than this goes through grpcio (it would need to be sent
#: within the daemon's windows, as a Put's is: kvstore/client/h2put.py).
MAX_REQUEST = 16 << 10
#: Largest message read into memory whole (headers; data frames not in the
#: daemon's one-field form): the daemon's largest frame plus room.
MAX_MESSAGE = (64 << 20) + (64 << 10)
#: Bytes of a header message read before looking for its inline data (far more than its small fields).
HEADER_PEEK = 4 << 10

T = TypeVar("T")

#: Where a found chunk's payload goes: a writable view of exactly ``meta.nbytes``.
Destination = Callable[[pb.GetHeader], memoryview]


class H2GetConnection(H2Reader):
    """One HTTP/2 connection to the daemon carrying one Get at a time; see the module docstring."""

    def __init__(self, target: Target) -> None:
        host, port, tls = target.host, target.port, target.tls
        raw = connect(host, port, target.connect_timeout_s)
        try:
            sock: socket.socket = raw
            if tls is not None:
                sock = tls.wrap_socket(raw, server_hostname=target.server_hostname or host)
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
        super().__init__(BufferedSocket(sock))
        self._scheme = "https" if tls is not None else "http"
        self._authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        #: The request headers that never change on this connection, but for ``:path``.
        self._fixed_block = b"".join(
            (
                b"\x83",  # :method POST (static table index 3)
                b"\x87" if self._scheme == "https" else b"\x86",  # :scheme (7 / 6)
                literal(":authority", self._authority),
                literal("content-type", "application/grpc"),
                literal("te", "trailers"),
            )
        )
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._metadata_block = b""
        self._pending_headers = b""  # the current stream's HEADERS frame, until sent
        self._next_stream = 1
        self.broken = False

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

    def abort(self) -> None:
        """Shut the socket down from another thread: a call blocked on it fails at once
        (closing it would not wake that thread), and the connection is broken."""
        self.broken = True
        try:
            self._sock.sock.shutdown(socket.SHUT_RDWR)
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
                length, kind, flags, stream = frame_header(self._sock.peek(9))
                if self._sock.buffered() < 9 + length:
                    if 9 + length > BUFFER:
                        self.close()  # nothing that large comes between calls
                    return
                self._sock.take(9)
                payload = self._sock.take(length)
                if kind == SETTINGS:
                    self._settings(flags, payload)
                elif kind == WINDOW_UPDATE:
                    self._window_update(stream, payload)
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
        body = request.SerializeToString()
        if len(body) + 5 > MAX_REQUEST:
            raise FallBack("request too large for the raw connection")

        def call() -> list[tuple[pb.GetHeader, memoryview | None]]:
            self._start(GET_PATH, metadata, timeout_s)
            message = b"\x00" + struct.pack(">I", len(body)) + body
            self._sock.sock.sendall(self._pending_headers + frame(DATA, END_STREAM, self._stream, message))
            return self._read_reply(destination)

        return self._call(call, timeout_s)

    def _call(self, call: Callable[[], T], timeout_s: float) -> T:
        """Run ``call`` (one call on a new stream) within ``timeout_s``: what it returns, or
        the daemon's status as a typed error, DEADLINE_EXCEEDED, or :class:`FallBack`;
        after any error the connection is closed."""
        if self.broken:
            raise FallBack("connection closed")
        if self._next_stream > MAX_WINDOW:
            raise FallBack("stream ids used up: a new connection is due")
        self._sock.deadline = time.monotonic() + timeout_s
        try:
            self._sock.sock.settimeout(timeout_s)  # for sendall; serve_idle left it non-blocking
            got = call()
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

    def _start(self, path: str, metadata: Sequence[tuple[str, str]], timeout_s: float) -> None:
        """Open the next stream: its state reset, its HEADERS frame in ``_pending_headers``
        for the caller to send with what follows it."""
        stream, self._next_stream = self._next_stream, self._next_stream + 2
        self._stream, self._stream_received = stream, 0
        self.stream_send = self._peer_initial
        self._data_left = self._pad_left = 0
        self._data_ends = False
        self._headers, self._trailers = [], None
        meta = tuple(metadata)
        if meta != self._metadata:
            self._metadata, self._metadata_block = meta, b"".join(literal(k, v) for k, v in meta)
        block = literal(":path", path) + self._fixed_block + literal("grpc-timeout", grpc_timeout(timeout_s))
        self._pending_headers = frame(HEADERS, END_HEADERS, stream, block + self._metadata_block)

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
            found = inline_data_at(head, size)
            if found is not None:
                fields_at, data_at, data_len = found
                try:
                    header = pb.GetHeader.FromString(head[fields_at : data_at - 1 - varint_len(data_len)])
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
            length, used = data_prefix(head)
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
