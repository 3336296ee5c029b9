"""The DATA half of reading for kvstore's HTTP/2 server connection
(kvstore/server/h2conn.py): :class:`H2DataReader`, the base of
:class:`~kvstore.server.h2conn.H2Connection` between it and what it sends
(:class:`~kvstore.server.h2send.H2Sender`).

* receive windows: the connection's (:data:`RECV_WINDOW`) given back as DATA
  arrives, in steps of half of it; a stream's too when its request is gathered
  whole (what bounds the memory that holds is the call's own limit,
  :data:`MAX_REQUEST`);
* a streaming call's (a Put's) stream window is given back only as its handler
  takes the data (:meth:`H2DataReader._taken`), so what the call holds received
  and not yet taken is at most that window (the listener's ``stream_window``,
  :data:`STREAM_RECV_WINDOW` at most), and a call that does not take its data
  (one waiting for a stream slot) holds back only its own stream: the others on
  the connection go on.  A client that sends past it gets RST_STREAM
  (FLOW_CONTROL_ERROR) on that stream;
* a request gathered whole in its stream's ``body`` until END_STREAM, then
  handed to the connection's ``_start``;
* a streaming call's payload fed to the sink as it arrives, straight from the
  received bytes, without waiting for whole frames (:meth:`H2DataReader._data_begins`,
  :meth:`H2DataReader._feed`);
* DATA on a stream already answered or reset is ignored;
* what the streams of one connection hold gathered is bounded
  (:data:`MAX_BUFFERED`: the connection that goes past it is closed), and what
  those of all the listener's connections do (:data:`MAX_GATHERED`: past it, the
  connections holding the most are closed, :meth:`H2DataReader._bound_gathered`).
"""

from __future__ import annotations

import struct

from kvstore.http2 import (
    END_STREAM, ENHANCE_YOUR_CALM, FLOW_CONTROL_ERROR, MIN_FRAME, NO_ERROR, PADDED, PROTOCOL_ERROR, RST_STREAM,
    STREAM_CLOSED, WINDOW_UPDATE, frame,
)
from kvstore.server.h2send import RESOURCE_EXHAUSTED, H2Sender, Stream

#: The connection's receive window, given back as DATA is received.
RECV_WINDOW = 16 << 20
#: The largest receive window of each stream (SETTINGS_INITIAL_WINDOW_SIZE): what a
#: Put holds received and not yet taken by its handler.  The listener may announce
#: less (a daemon with a memory bound: what it charges each Put stream).
STREAM_RECV_WINDOW = 8 << 20
#: SETTINGS_MAX_FRAME_SIZE we announce: a Put's data comes in few frames.
RECV_FRAME = 1 << 20
#: Largest request message accepted; larger: RESOURCE_EXHAUSTED.
MAX_REQUEST = 16 << 20
#: Request bytes all the streams of one connection may hold gathered before their requests
#: end (a Get's is tens of bytes a key); more closes the connection (GOAWAY ENHANCE_YOUR_CALM).
MAX_BUFFERED = 2 * MAX_REQUEST
#: The same over all the connections of one listener: many connections, each under
#: MAX_BUFFERED, would otherwise hold any amount before a request is checked.
MAX_GATHERED = 4 * MAX_BUFFERED


class ProtocolError(Exception):
    """The peer broke the protocol: GOAWAY with ``code`` and close."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class H2DataReader(H2Sender):
    """The DATA frames a connection reads; see the module docstring.  The connection
    keeps the streams and the transport, and serves a complete request (``_start``)."""

    _last_stream: int

    def __init__(self, stream_window: int = STREAM_RECV_WINDOW) -> None:
        super().__init__()
        if not 1 << 16 <= stream_window <= STREAM_RECV_WINDOW:
            raise ValueError(f"stream_window {stream_window}: expected 64 KiB to {STREAM_RECV_WINDOW} bytes")
        #: Each stream's receive window (announced as SETTINGS_INITIAL_WINDOW_SIZE).
        self.stream_window = stream_window
        self._received = 0  # connection: bytes received and not yet given back
        #: Inside a DATA frame of a streaming call, read as it arrives: (stream, payload bytes
        #: still to come, whether the frame ends the stream).
        self._inside: tuple[Stream, int, bool] | None = None

    def _start(self, st: Stream) -> None:
        raise NotImplementedError

    def _reset(self, st: Stream, code: int) -> None:
        raise NotImplementedError

    def _others(self) -> list[H2DataReader]:
        """The listener's other connections."""
        raise NotImplementedError

    def refuse(self, exc: ProtocolError) -> None:
        """Send GOAWAY with ``exc``'s code and message, and close."""
        raise NotImplementedError

    def gathered(self) -> int:
        """Request bytes this connection's streams hold gathered (before their requests end);
        none once it is closing (what it still receives is discarded)."""
        return 0 if self._closed else sum(len(st.body) for st in self._streams.values())

    def _bound_gathered(self) -> None:
        """Past MAX_BUFFERED, close this connection (GOAWAY ENHANCE_YOUR_CALM).  Past
        MAX_GATHERED over all the listener's connections, close those holding the most
        until under it: maybe this one, but not one that merely crossed the bound with
        less than another holds."""
        mine = self.gathered()
        if mine > MAX_BUFFERED:
            raise ProtocolError(
                ENHANCE_YOUR_CALM, f"over {MAX_BUFFERED} bytes of unfinished requests on one connection; finish them first"
            )
        others = sorted(((conn.gathered(), conn) for conn in self._others()), key=lambda held: -held[0])
        total = mine + sum(n for n, _ in others)
        message = (
            f"over {MAX_GATHERED} bytes of unfinished requests on all the connections to this port, "
            "this one holding the most; finish them first"
        )
        for n, conn in others:
            if total <= MAX_GATHERED or n <= mine:
                break
            conn.refuse(ProtocolError(ENHANCE_YOUR_CALM, message))
            total -= n
        if total > MAX_GATHERED:
            raise ProtocolError(ENHANCE_YOUR_CALM, message)

    def _streaming(self, stream: int) -> bool:
        st = self._streams.get(stream)
        return st is not None and st.sink is not None

    def _data_received(self, stream: int, length: int) -> Stream | None:
        """Count a DATA frame of ``length`` bytes against the windows (given back at
        once, in steps of half a window); its open stream, or None when the stream
        is over (its call answered or reset: the frame is ignored)."""
        self._received += length
        if self._received >= RECV_WINDOW // 2:
            self._write(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._received)))
            self._received = 0
        if stream == 0 or stream > self._last_stream:
            raise ProtocolError(PROTOCOL_ERROR, f"DATA on idle stream {stream}")
        return self._streams.get(stream)

    def _stream_window(self, st: Stream, length: int) -> None:
        """``length`` bytes of ``st`` are done with: give its window back in steps of half of it."""
        st.unacked += length
        if st.unacked >= self.stream_window // 2:
            st.recv_left += st.unacked
            self._write(frame(WINDOW_UPDATE, 0, st.id, struct.pack(">I", st.unacked)))
            st.unacked = 0

    def _taken(self, st: Stream, length: int) -> None:
        """A streaming call's handler took (or never needed) ``length`` bytes of its
        request: its stream window grows by them, while the request goes on."""
        if self._streams.get(st.id) is st and st.sink is not None and not st.sink.ended and not self._closed:
            self._stream_window(st, length)

    def _within_window(self, st: Stream, length: int) -> bool:
        """Count ``length`` bytes against a streaming call's window; past it (the client
        ignored the window) the stream is reset with FLOW_CONTROL_ERROR and False."""
        if length > st.recv_left:
            self._reset(st, FLOW_CONTROL_ERROR)
            return False
        st.recv_left -= length
        return True

    def _data_begins(self, flags: int, stream: int, length: int) -> None:
        """A DATA frame of a streaming call begins: its payload is fed to the call's
        sink as it arrives (:meth:`_feed`)."""
        st = self._data_received(stream, length)
        assert st is not None and st.sink is not None  # _streaming(stream)
        self._within_window(st, length)  # if not, _feed skips the frame: the stream is gone
        self._inside = (st, length, bool(flags & END_STREAM))
        if length == 0:
            self._feed(memoryview(b""))

    def _feed(self, piece: memoryview) -> int:
        """Feed the current streamed DATA frame's payload from ``piece`` (bytes that
        never change); how many bytes of ``piece`` it took."""
        assert self._inside is not None
        st, left, ends = self._inside
        k = min(left, len(piece))
        if k and st.sink is not None and self._streams.get(st.id) is st:
            st.sink.feed(piece[:k])
        left -= k
        self._inside = (st, left, ends) if left else None
        if not left and ends and st.sink is not None and self._streams.get(st.id) is st:
            st.sink.end()
        return k

    def _on_data(self, flags: int, stream: int, payload: bytes) -> None:
        st = self._data_received(stream, len(payload))
        if st is None:
            return  # a call already answered (a Put that failed early) or reset: ignored
        if st.task is not None and st.sink is None:
            self._write(frame(RST_STREAM, 0, stream, struct.pack(">I", STREAM_CLOSED)))
            return
        start, end = 0, len(payload)
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise ProtocolError(PROTOCOL_ERROR, "DATA padding longer than the frame")
            start, end = 1, end - payload[0]
        if st.sink is not None:  # a padded frame of a streaming call, read whole
            if not self._within_window(st, len(payload)):
                return
            self._taken(st, len(payload) - (end - start))  # the padding
            st.sink.feed(memoryview(payload)[start:end])
            if flags & END_STREAM:
                st.sink.end()
            return
        st.body += payload[start:end]
        if len(st.body) > MAX_REQUEST + 5:
            self._end(st, RESOURCE_EXHAUSTED, f"request message over {MAX_REQUEST} bytes")
            self._reset(st, NO_ERROR)
            return
        if len(st.body) > MIN_FRAME:  # (a Get's request is tens of bytes a key)
            self._bound_gathered()
        if flags & END_STREAM:
            self._start(st)
            return
        self._stream_window(st, len(payload))
