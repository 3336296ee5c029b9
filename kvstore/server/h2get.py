"""The daemon's own listener for ``KVStore/Get`` and ``KVStore/Put``: the same
gRPC methods, served over HTTP/2 by kvstore instead of grpcio.

Why: grpcio's server costs about 1.4 ms for one 1 MiB reply message on the
2-core development VM (``benchmarks/bench_grpc_messages.py``: a bare
grpc.aio handler, no kvstore code), while Redis answers a 1 MiB GET in
0.4-0.7 ms; every call crosses grpc's poller thread, the asyncio loop and
the handler, and the payload is copied into a message.  Here the request is
parsed from the socket's bytes on the daemon's event loop and each chunk's
payload goes to the socket from the tier's memory as it lies.

The listener runs the daemon's own Get handler
(:meth:`~kvstore.server.service.KVStoreService.Get`): the same keys, tokens,
tenant checks, stream limits, metrics and messages.  The sync client learns
its port from the Get reply's initial metadata (it asks with the request
header :data:`ASK_HEADER`; the daemon answers :data:`PORT_HEADER`) and moves
its gets and puts there; any gRPC client may call Get and Put on this port
(grpcio is tested as one).  Every other method is answered UNIMPLEMENTED
with the main port.

A Put starts at its headers and runs the daemon's own Put handler
(:meth:`~kvstore.server.service.KVStoreService.Put`) on its request messages
as they arrive (kvstore/server/h2put.py); its reply and trailers go in one
write.  A Put answered before its request ended (refused) also gets
RST_STREAM(NO_ERROR), so the client stops sending.

The HTTP/2 side (flow control, frames, GOAWAY, graceful close) is
kvstore/server/h2conn.py, with what it sends (DATA frames as the windows
allow, replies, sendmsg) in kvstore/server/h2send.py; this module is the
call: the request checked (method, path, content type, ``grpc-timeout``,
one uncompressed message), then served at once from the socket callback
when every chunk is in the top tier's host memory and the reply fits the
windows (headers, data frames from the tier's memory and trailers in one
``sendmsg``; no task), else by the handler in a task, message by message
as the windows allow.  Graceful stop: GOAWAY, calls in flight finish (up to
the grace period), the connections close.
Not implemented: compressed messages (UNIMPLEMENTED).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from kvstore.errors import KVStoreError
from kvstore.http2 import (
    END_HEADERS, END_STREAM, GET_PATH, HEADERS, NO_ERROR, PUT_PATH, RST_STREAM, STATUS_NAMES, frame, parse_grpc_timeout,
)
from kvstore.metrics import Metrics
from kvstore.server import frames
from kvstore.server.h2conn import LINGER_S, H2Connection
from kvstore.server.h2data import STREAM_RECV_WINDOW
from kvstore.server.h2put import PutSink
from kvstore.server.h2send import (
    DEADLINE_EXCEEDED, INTERNAL, INVALID_ARGUMENT, OK, OK_TRAILERS, REPLY_HEADERS, UNIMPLEMENTED, Stream,
)
from kvstore.server.messages import lenient
from kvstore.server.service import KVStoreService
from kvstore.v1 import kvstore_pb2 as pb

log = logging.getLogger(__name__)

#: Largest reply served at once from data_received (see _GetConnection._serve_now).
NOW_MAX = 8 << 20


class _Abort(Exception):
    """The handler ended the call with a status (``context.abort``)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Context:
    """The part of ``grpc.aio.ServicerContext`` that the Get handler uses."""

    def __init__(self, peer: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self._peer = peer
        self._metadata = metadata

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise _Abort(code.value[0], details)


@dataclass(frozen=True, slots=True)
class _Head:
    """What a call's headers say: its metadata (no pseudo-headers) and deadline."""

    metadata: tuple[tuple[str, str], ...]
    timeout_s: float | None


@dataclass(frozen=True, slots=True)
class _Call:
    """A Get: its request and what its headers say."""

    request: pb.GetRequest
    head: _Head


#: A call to run (its status when done), or the status refusing it.
_Run = Callable[[], Awaitable[tuple[int, str]]] | tuple[int, str]


def _progress(reply: object, keys_left: int, chunk_left: int) -> tuple[int, int]:
    """Keys whose reply is not complete yet, and bytes the current chunk still
    needs, after ``reply`` (an item of the Get handler's stream)."""
    if isinstance(reply, frames.HeaderWithData):
        header, inline = reply.header, len(reply.data)
    elif isinstance(reply, pb.GetFrame):
        header, inline = reply.header, 0
    else:  # payload bytes of the current chunk
        chunk_left -= len(reply)  # type: ignore[arg-type]
        return (keys_left - 1, 0) if chunk_left <= 0 else (keys_left, chunk_left)
    assert isinstance(header, pb.GetHeader)
    rest = header.meta.nbytes - inline if header.found else 0
    return (keys_left - 1, 0) if rest <= 0 else (keys_left, rest)


class GetListener:
    """Serves ``KVStore/Get`` on its own port; see the module docstring."""

    def __init__(
        self,
        service: KVStoreService,
        metrics: Metrics,
        *,
        host: str,
        port: int,
        main_port: int,
        tls: ssl.SSLContext | None = None,
        max_streams: int = 256,
        stream_window: int = STREAM_RECV_WINDOW,
    ) -> None:
        self.service = service
        self.metrics = metrics
        self._host, self._port, self.main_port = host, port, main_port
        self._tls = tls
        self.max_streams = max_streams
        #: Each stream's receive window: what a Put holds received and not yet taken (h2data.py).
        self.stream_window = stream_window
        self._server: asyncio.Server | None = None
        self.connections: set[H2Connection] = set()
        self.port = 0

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _GetConnection(self), self._host, self._port, ssl=self._tls, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self, grace_s: float | None) -> None:
        """Accept nothing new, send GOAWAY, let the calls in flight finish for up to
        ``grace_s`` seconds (None: as long as they take), cancel the rest, close."""
        if self._server is None:
            return
        self._server.close()
        self._server = None
        for conn in list(self.connections):
            conn.go_away()
        tasks = [t for conn in self.connections for t in conn.tasks()]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=5.0)
        conns = list(self.connections)
        for conn in conns:
            conn.close()
        if conns:  # replies flushed, the clients' sides closed (each lingers LINGER_S at most)
            await asyncio.wait([c.gone for c in conns], timeout=LINGER_S + 1)
        for conn in conns:
            conn.abort()

    def cancel(self) -> None:
        """Cancel the calls in flight (a second SIGTERM during :meth:`stop`)."""
        for conn in list(self.connections):
            for task in conn.tasks():
                task.cancel()


class _GetConnection(H2Connection):
    """A connection of the Get listener: each complete request is a Get call."""

    def __init__(self, listener: GetListener) -> None:
        super().__init__(listener.connections, listener.max_streams, listener.stream_window)
        self._listener = listener

    def _open(self, st: Stream) -> None:
        """A Put starts at its headers: its messages are read as they arrive (h2put.py)."""
        if dict(st.fields).get(":path") != PUT_PATH:
            return
        sink = st.sink = PutSink(functools.partial(self._taken, st), self.stream_window)
        head = self._head(st, PUT_PATH)
        run: _Run = head if isinstance(head, tuple) else functools.partial(self._put, st, sink, head)
        st.task = asyncio.get_running_loop().create_task(self._serve(st, "KVStore/Put", run))

    def _start(self, st: Stream) -> None:
        call = self._request(st)
        if isinstance(call, _Call) and self._serve_now(st, call):
            return
        run: _Run = call if isinstance(call, tuple) else functools.partial(self._call, st, call)
        st.task = asyncio.get_running_loop().create_task(self._serve(st, "KVStore/Get", run))

    def _serve_now(self, st: Stream, call: _Call) -> bool:
        """Serve the call here and now when every chunk is in the top tier's host memory
        and the whole reply fits the windows (one sendmsg, no task, no trip through the
        event loop); False: serve it with :meth:`_serve` (which reports any error)."""
        if self._paused or self._transport is None or self._transport.get_write_buffer_size():
            return False
        started = time.perf_counter()
        service = self._listener.service
        try:
            got = service.get_resident(call.request, service.principal(call.head.metadata))
        except KVStoreError:
            return False
        if got is None:
            return False
        try:
            messages = []
            for _, _, items in got:
                for item in items:
                    parts = frames.parts(item)
                    messages.append((struct.pack(">BI", 0, sum(len(p) for p in parts)), *parts))
            total = sum(len(p) for m in messages for p in m)
            if total > min(self._window, st.window) or total > NOW_MAX:
                return False
            pieces: list[bytes | memoryview] = []
            small: list[bytes | memoryview] = [frame(HEADERS, END_HEADERS, st.id, REPLY_HEADERS)]
            for message in messages:
                self._data_frames(st.id, message, pieces, small)
            small.append(frame(HEADERS, END_HEADERS | END_STREAM, st.id, OK_TRAILERS))
            pieces.append(b"".join(small))
            self._window -= total
            st.window -= total
            self._write_pieces(pieces)  # what the socket does not take is copied: the chunks may go
        finally:
            for _, chunk, _ in got:
                chunk.release()
        seconds = time.perf_counter() - started
        service.resident_served(got, seconds)
        self._listener.metrics.observe_rpc("KVStore/Get", seconds, "OK")
        del self._streams[st.id]
        self._close_if_idle()
        return True

    async def _serve(self, st: Stream, method: str, run: _Run) -> None:
        """Run a call (or refuse it with ``run``'s status) and end its stream."""
        started, name = time.perf_counter(), "UNKNOWN"
        try:
            code, message = run if isinstance(run, tuple) else await run()
            name = STATUS_NAMES.get(code, "UNKNOWN")
            self._end(st, code, message)
            if st.sink is not None and not st.sink.ended and self._streams.get(st.id) is st:
                # Answered before the request ended (a Put refused early): the client may stop sending.
                self._write(frame(RST_STREAM, 0, st.id, struct.pack(">I", NO_ERROR)))
        except (asyncio.CancelledError, ConnectionError):
            name = "CANCELLED"  # the client reset the stream or went away
        except Exception:
            log.exception("HTTP/2 get listener: a call failed")
            name = "INTERNAL"
            self._end(st, INTERNAL, "internal error in the daemon (see its log)")
        finally:
            if st.sink is not None:
                st.sink.close()
            self._listener.metrics.observe_rpc(method, time.perf_counter() - started, name)
            if self._streams.get(st.id) is st:
                del self._streams[st.id]
            self._close_if_idle()

    def _head(self, st: Stream, path: str) -> _Head | tuple[int, str]:
        """A call's headers checked (method, content type, path, deadline), or the status refusing it."""
        head = {k: v for k, v in st.fields if k.startswith(":") or k in ("content-type", "grpc-timeout")}
        ctype = head.get("content-type", "")
        if head.get(":method") != "POST":
            return UNIMPLEMENTED, f"HTTP method {head.get(':method')!r}: gRPC calls are POST"
        if not (ctype == "application/grpc" or ctype.startswith(("application/grpc+proto", "application/grpc;"))):
            return UNIMPLEMENTED, f"content-type {ctype!r}: this port serves gRPC (application/grpc) only"
        if head.get(":path", "") != path:
            return UNIMPLEMENTED, (
                f"{head.get(':path', '')}: this port serves {GET_PATH} and {PUT_PATH} only; the daemon's other "
                f"methods are on its gRPC port {self._listener.main_port}"
            )
        timeout_s: float | None = None
        if "grpc-timeout" in head:
            try:
                timeout_s = parse_grpc_timeout(head["grpc-timeout"])
            except ValueError as exc:
                return INVALID_ARGUMENT, str(exc)
        return _Head(tuple((k, v) for k, v in st.fields if not k.startswith(":")), timeout_s)

    def _request(self, st: Stream) -> _Call | tuple[int, str]:
        """The Get call a stream's headers and body make, or the status refusing it."""
        head = self._head(st, GET_PATH)
        if isinstance(head, tuple):
            return head
        body = st.body
        if len(body) < 5:
            return INVALID_ARGUMENT, "the call carries no request message: send one GetRequest"
        flag, size = struct.unpack(">BI", body[:5])
        if flag:
            return UNIMPLEMENTED, "compressed request: this port takes uncompressed messages (grpc-encoding identity)"
        if size != len(body) - 5:
            return INVALID_ARGUMENT, f"the request holds {len(body) - 5} bytes after its prefix, which says {size}: send one GetRequest"
        request = lenient(pb.GetRequest)(bytes(body[5:]))
        st.body = bytearray()
        if not isinstance(request, pb.GetRequest):
            return INVALID_ARGUMENT, str(request)
        return _Call(request, head)

    async def _call(self, st: Stream, call: _Call) -> tuple[int, str]:
        """Run a Get; its status."""
        request = call.request
        context: Any = _Context(self.peer, call.head.metadata)

        async def run() -> None:
            keys_left, chunk_left = len(request.keys), 0
            async with contextlib.aclosing(self._listener.service.Get(request, context)) as replies:
                async for reply in replies:
                    keys_left, chunk_left = _progress(reply, keys_left, chunk_left)
                    if keys_left:
                        await self._send(st, frames.parts(reply))
                        continue
                    # The reply's last message: the OK trailers ride in its last write
                    # (one system call and one wake-up of the client less).  What the
                    # handler does after it (metrics) cannot fail the call.
                    await self._send(st, frames.parts(reply), trailers=True)
                    async for extra in replies:
                        raise AssertionError(f"the Get handler went on after the last chunk: {type(extra).__name__}")

        return await _status(run, call.head.timeout_s)

    async def _put(self, st: Stream, sink: PutSink, head: _Head) -> tuple[int, str]:
        """Run a Put on the request messages as they arrive; its status."""
        context: Any = _Context(self.peer, head.metadata)

        async def run() -> None:
            reply = await self._listener.service.Put(sink.messages(), context)
            await self._send(st, (reply.SerializeToString(),), trailers=True)

        return await _status(run, head.timeout_s)


async def _status(run: Callable[[], Awaitable[None]], timeout_s: float | None) -> tuple[int, str]:
    """Run a call's handler (which sends the reply) within the call's deadline; the call's status."""
    try:
        async with asyncio.timeout(timeout_s) as deadline:
            await run()
    except _Abort as exc:
        return exc.code, exc.message
    except TimeoutError:
        if not deadline.expired():
            raise
        return DEADLINE_EXCEEDED, f"the call's deadline ({timeout_s:g} s) passed before its reply was sent"
    return OK, ""
