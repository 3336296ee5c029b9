"""The server side of HTTP/2 (RFC 9113) for gRPC calls ("PROTOCOL-HTTP2"), one
connection per :class:`H2Connection`: what kvstore's own Get listener
(kvstore/server/h2get.py) speaks, without the call it serves.  This module is
the connection's life and the frames it reads; the DATA frames are its base
class :class:`~kvstore.server.h2data.H2DataReader` (kvstore/server/h2data.py:
receive windows, requests gathered whole, a streaming call's payload fed as it
arrives), and what it sends for a call is that one's base,
:class:`~kvstore.server.h2send.H2Sender` (kvstore/server/h2send.py).

* the client preface, then SETTINGS both ways; flow control on what it sends
  (connection and stream windows, the peer's SETTINGS_INITIAL_WINDOW_SIZE and
  SETTINGS_MAX_FRAME_SIZE, kept here from the frames read; H2Sender sends
  within them), WINDOW_UPDATE for what it receives;
* header blocks with CONTINUATION, decoded without ``hpack`` when they only use
  HPACK literals (kvstore's client) and with it otherwise;
* PING, RST_STREAM (cancels the call), GOAWAY both ways; a frame that breaks the
  protocol closes the connection with GOAWAY and the matching error code;
* closing without losing a reply: the write side is shut once flushed, and what
  the client still sends is drained until it closes too;
* a request whose headers and body are complete goes to :meth:`H2Connection._start`,
  which a subclass defines; it answers with :meth:`_send` and :meth:`_end`, or
  writes a whole reply at once with :meth:`_data_frames` and :meth:`_write_pieces`
  (H2Sender's);
* a streaming call (a Put) starts at its headers instead (:meth:`H2Connection._open`
  sets the stream's sink): its DATA payload is fed to the sink as it arrives,
  straight from the received bytes, without waiting for whole frames, and its
  stream window grows only as the call takes that payload (:meth:`_taken`).

Not implemented: server push, priorities (ignored), HTTP/1.1 (answered 505 and closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct

import hpack

from kvstore.http2 import (
    ACK, COMPRESSION_ERROR, CONTINUATION, DATA, DEFAULT_WINDOW, END_HEADERS, END_STREAM, FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR, GOAWAY, HEADERS, MAX_FRAME, MAX_WINDOW, MIN_FRAME, NO_ERROR, PADDED, PING, PREFACE,
    PRIORITY_FLAG, PROTOCOL_ERROR, PUSH_PROMISE, REFUSED_STREAM, RST_STREAM, SETTINGS, SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE, STREAM_CLOSED,
    WINDOW_UPDATE, frame, parse_frame_header, stateless_fields,
)
from kvstore.server.h2data import RECV_FRAME, RECV_WINDOW, H2DataReader, ProtocolError
from kvstore.server.h2send import Stream

log = logging.getLogger(__name__)

#: Largest header block accepted (with its CONTINUATION frames).
MAX_HEADER_LIST = 64 << 10
#: The transport's buffer above which a call waits before writing its next frame.
WRITE_HIGH = 1 << 20
#: Seconds a closing connection waits for the client to close its side.
LINGER_S = 5.0
#: SO_SNDBUF of each connection (the kernel caps it at net.core.wmem_max).
SOCKET_BUFFER = 4 << 20


class H2Connection(H2DataReader, asyncio.Protocol):
    """One client's HTTP/2 connection; see the module docstring."""

    def __init__(self, connections: set[H2Connection], max_streams: int, stream_window: int) -> None:
        super().__init__(stream_window)
        #: The listener's open connections: this one is in it while open.
        self._connections = connections
        self._max_streams = max_streams
        self._buf = bytearray()
        self._preface = False
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = MAX_HEADER_LIST
        self._streams: dict[int, Stream] = {}
        self._last_stream = 0
        self._initial = DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self._going = False  # our GOAWAY sent: no new streams
        self._peer_going = False
        self._continuing: tuple[int, int, list[bytes], int] | None = None  # stream, flags, fragments, size
        self.peer = "unknown"
        self._linger: asyncio.TimerHandle | None = None
        #: Done once the connection is closed (both ways).
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # A send buffer the size of a chunk: the kernel takes a 1 MiB reply in one
                # copy instead of pacing it to the reader.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            if transport.get_extra_info("sslcontext") is None:
                # Our own handle on the socket, for writes of several pieces in one
                # sendmsg while the transport has nothing buffered (see _write_pieces).
                self._sock = socket.socket(fileno=os.dup(sock.fileno()))
        name = transport.get_extra_info("peername")
        if isinstance(name, tuple) and len(name) >= 2:
            self.peer = f"ipv6:[{name[0]}]:{name[1]}" if ":" in str(name[0]) else f"ipv4:{name[0]}:{name[1]}"
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._linger is not None:
            self._linger.cancel()
        if not self.gone.done():
            self.gone.set_result(None)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._connections.discard(self)
        for st in self._streams.values():
            if st.task is not None:
                st.task.cancel()
        self._wake()

    def eof_received(self) -> bool:
        self._peer_going = True
        for st in list(self._streams.values()):
            if st.sink is not None and not st.sink.ended and st.task is not None:
                st.task.cancel()  # a request cut off: it can never end now
            elif st.sink is None and st.task is None:
                del self._streams[st.id]  # a Get's request, still gathered: it can never end either
        if self._transport is not None and (self._closed or not self._streams):
            self._transport.close()  # both sides done
        return True  # keep the write side open for the replies in flight (a half-close)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return  # closing: discarded
        if self._inside is not None and not self._buf:
            # A streaming call's payload, fed from the received bytes as they are (no copy).
            used = self._feed(memoryview(data))
            if used == len(data):
                return
            data = data[used:]
        self._buf += data
        try:
            self._parse()
        except ProtocolError as exc:
            self.refuse(exc)

    # -- control ---------------------------------------------------------------------
    def refuse(self, exc: ProtocolError) -> None:
        log.debug("HTTP/2 get listener: closing %s: %s", self.peer, exc)
        self._write(frame(GOAWAY, 0, 0, struct.pack(">II", self._last_stream, exc.code) + str(exc).encode()[:256]))
        self.close()

    def _others(self) -> list[H2DataReader]:
        return [conn for conn in self._connections if conn is not self]

    def tasks(self) -> list[asyncio.Task[None]]:
        return [st.task for st in self._streams.values() if st.task is not None]

    def go_away(self) -> None:
        """Refuse new streams; close once those open have ended."""
        if not self._going and not self._closed:
            self._going = True
            self._write(frame(GOAWAY, 0, 0, struct.pack(">II", self._last_stream, NO_ERROR)))
        self._close_if_idle()

    def close(self) -> None:
        """Close without losing what is queued: once it is sent, shut the write side
        and discard what the client still sends until it closes too (or
        :data:`LINGER_S` passed).  Closing with unread bytes from the client would
        make the kernel reset the connection and drop the end of a reply."""
        transport = self._transport
        if transport is None or self._closed:
            self._wake()
            return
        self._closed = True
        self._wake()
        for st in self._streams.values():
            if st.task is not None:
                st.task.cancel()
        if transport.can_write_eof():
            transport.write_eof()  # after the buffer drains
            self._linger = asyncio.get_running_loop().call_later(LINGER_S, self.abort)
        else:  # TLS: close_notify after the buffer drains
            transport.close()

    def abort(self) -> None:
        """Close at once (a client that does not close after our shutdown, or the end of a stop)."""
        if self._transport is not None:
            self._closed = True
            self._transport.abort()

    def _close_if_idle(self) -> None:
        if (self._going or self._peer_going) and not self._streams:
            self.close()

    # -- reading frames ----------------------------------------------------------------
    def _parse(self) -> None:
        buf = self._buf
        if not self._preface:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(bytes(buf)):
                    self._not_http2()
                return
            if bytes(buf[: len(PREFACE)]) != PREFACE:
                self._not_http2()
                return
            del buf[: len(PREFACE)]
            self._preface = True
            settings = struct.pack(
                ">HIHIHIHI",
                SETTINGS_MAX_CONCURRENT_STREAMS, self._max_streams,
                SETTINGS_INITIAL_WINDOW_SIZE, self.stream_window,
                SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST,
                SETTINGS_MAX_FRAME_SIZE, RECV_FRAME,
            )
            self._write(
                frame(SETTINGS, 0, 0, settings)
                + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", RECV_WINDOW - DEFAULT_WINDOW))
            )
        pos = 0
        view = memoryview(buf)
        try:
            while not self._closed:
                if self._inside is not None:
                    pos += self._feed(memoryview(bytes(view[pos : pos + self._inside[1]])))
                    if self._inside is not None:
                        break  # the frame goes on in bytes still to come
                if len(buf) - pos < 9:
                    break
                length, kind, flags, stream = parse_frame_header(view[pos : pos + 9])
                if length > RECV_FRAME:
                    raise ProtocolError(FRAME_SIZE_ERROR, f"frame of {length} bytes; at most {RECV_FRAME}")
                if kind == DATA and not flags & PADDED and self._streaming(stream):
                    pos += 9
                    self._data_begins(flags, stream, length)
                    continue
                if len(buf) - pos < 9 + length:
                    break
                payload = bytes(view[pos + 9 : pos + 9 + length])
                pos += 9 + length
                self._frame(kind, flags, stream, payload)
        finally:
            view.release()
            del buf[:pos]

    def _not_http2(self) -> None:
        """Not an HTTP/2 client: say so in HTTP/1.1 and close."""
        self._write(
            b"HTTP/1.1 505 HTTP Version Not Supported\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
            b"This port serves gRPC over HTTP/2 (prior knowledge) only.\n"
        )
        self.close()

    def _frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if self._continuing is not None and kind != CONTINUATION:
            raise ProtocolError(PROTOCOL_ERROR, "a header block was interrupted by another frame")
        if kind == DATA:
            self._on_data(flags, stream, payload)
        elif kind == HEADERS:
            self._on_headers(flags, stream, payload)
        elif kind == CONTINUATION:
            self._on_continuation(flags, stream, payload)
        elif kind == SETTINGS:
            self._on_settings(flags, stream, payload)
        elif kind == PING:
            if stream != 0 or len(payload) != 8:
                raise ProtocolError(PROTOCOL_ERROR if stream else FRAME_SIZE_ERROR, "malformed PING")
            if not flags & ACK:
                self._write(frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            self._on_window_update(stream, payload)
        elif kind == RST_STREAM:
            if stream == 0 or len(payload) != 4:
                raise ProtocolError(PROTOCOL_ERROR, "malformed RST_STREAM")
            st = self._streams.pop(stream, None)
            if st is not None and st.task is not None:
                st.task.cancel()
            self._close_if_idle()
        elif kind == GOAWAY:
            self._peer_going = True
            self._close_if_idle()
        elif kind == PUSH_PROMISE:
            raise ProtocolError(PROTOCOL_ERROR, "a client may not push")
        # PRIORITY and unknown types: nothing to do (RFC 9113 5.5).

    def _on_settings(self, flags: int, stream: int, payload: bytes) -> None:
        if stream != 0:
            raise ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS payload not a multiple of 6 bytes")
        for i in range(0, len(payload), 6):
            ident, value = struct.unpack(">HI", payload[i : i + 6])
            if ident == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value}")
                delta, self._initial = value - self._initial, value
                for st in self._streams.values():
                    st.window += delta
            elif ident == SETTINGS_MAX_FRAME_SIZE:
                if not MIN_FRAME <= value <= MAX_FRAME:
                    raise ProtocolError(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value}")
                self._max_frame = value
        self._write(frame(SETTINGS, ACK, 0))
        self._wake()

    def _on_window_update(self, stream: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError(FRAME_SIZE_ERROR, "WINDOW_UPDATE of other than 4 bytes")
        grow = int.from_bytes(payload, "big") & MAX_WINDOW
        if stream == 0:
            if grow == 0 or self._window + grow > MAX_WINDOW:
                raise ProtocolError(PROTOCOL_ERROR if grow == 0 else FLOW_CONTROL_ERROR, "bad connection WINDOW_UPDATE")
            self._window += grow
        else:
            st = self._streams.get(stream)
            if st is None:
                return
            if grow == 0 or st.window + grow > MAX_WINDOW:
                self._reset(st, PROTOCOL_ERROR if grow == 0 else FLOW_CONTROL_ERROR)
                return
            st.window += grow
        self._wake()

    def _on_headers(self, flags: int, stream: int, payload: bytes) -> None:
        if stream == 0 or stream % 2 == 0:
            raise ProtocolError(PROTOCOL_ERROR, f"HEADERS on stream {stream}")
        start, end = 0, len(payload)
        if flags & PADDED:
            if not payload:
                raise ProtocolError(PROTOCOL_ERROR, "padded HEADERS without its pad length")
            start, end = 1, end - payload[0]
        if flags & PRIORITY_FLAG:
            start += 5
        if start > end:
            raise ProtocolError(PROTOCOL_ERROR, "HEADERS padding longer than the frame")
        fragment = payload[start:end]
        if flags & END_HEADERS:
            self._on_block(stream, flags, fragment)
        else:
            self._continuing = (stream, flags, [fragment], len(fragment))

    def _on_continuation(self, flags: int, stream: int, payload: bytes) -> None:
        if self._continuing is None or self._continuing[0] != stream:
            raise ProtocolError(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        first, first_flags, parts, size = self._continuing
        size += len(payload)
        if size > MAX_HEADER_LIST:
            raise ProtocolError(PROTOCOL_ERROR, f"header block over {MAX_HEADER_LIST} bytes")
        parts.append(payload)
        self._continuing = (first, first_flags, parts, size)
        if flags & END_HEADERS:
            self._continuing = None
            self._on_block(stream, first_flags, b"".join(parts))

    def _on_block(self, stream: int, flags: int, block: bytes) -> None:
        fields = stateless_fields(block)
        if fields is None:  # a block that uses or changes HPACK's table (grpcio's, say)
            try:
                fields = [(str(k), str(v)) for k, v in self._decoder.decode(block)]
            except hpack.HPACKError as exc:
                raise ProtocolError(COMPRESSION_ERROR, f"undecodable header block: {exc}") from None
        st = self._streams.get(stream)
        if st is not None:  # trailers of the request: they end it
            if not flags & END_STREAM or (st.task is not None and st.sink is None):
                self._reset(st, PROTOCOL_ERROR)
                return
            self._request_ends(st)
            return
        if stream <= self._last_stream:
            raise ProtocolError(STREAM_CLOSED, f"HEADERS on closed stream {stream}")
        self._last_stream = stream
        if self._going or len(self._streams) >= self._max_streams:
            self._write(frame(RST_STREAM, 0, stream, struct.pack(">I", REFUSED_STREAM)))
            return
        st = self._streams[stream] = Stream(stream, fields, self._initial, self.stream_window)
        self._open(st)
        if flags & END_STREAM:
            self._request_ends(st)

    def _request_ends(self, st: Stream) -> None:
        """END_STREAM on a HEADERS frame: a streaming call's sink ends, any other request is served."""
        if st.sink is not None:
            st.sink.end()
        else:
            self._start(st)

    def _reset(self, st: Stream, code: int) -> None:
        self._write(frame(RST_STREAM, 0, st.id, struct.pack(">I", code)))
        self._streams.pop(st.id, None)
        if st.task is not None:
            st.task.cancel()
        self._close_if_idle()

    # -- a call -----------------------------------------------------------------------
    def _open(self, st: Stream) -> None:
        """A new stream's headers arrived (in ``st.fields``): a subclass may start a
        streaming call here, setting ``st.sink`` and ``st.task``; the stream's DATA
        then goes to the sink as it arrives, and :meth:`_start` is not called."""

    def _start(self, st: Stream) -> None:
        """``st``'s request is complete (headers in ``st.fields``, body in ``st.body``): serve it."""
        raise NotImplementedError
