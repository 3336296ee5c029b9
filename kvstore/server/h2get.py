"""The daemon's own listener for ``KVStore/Get``: the same gRPC method, served
over HTTP/2 by kvstore instead of grpcio.

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
its gets there; any gRPC client may call Get on this port (grpcio is tested
as one).  Every other method is answered UNIMPLEMENTED with the main port.

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
import logging
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from kvstore.errors import KVStoreError
from kvstore.http2 import END_HEADERS, END_STREAM, GET_PATH, HEADERS, STATUS_NAMES, frame, parse_grpc_timeout
from kvstore.metrics import Metrics
from kvstore.server import frames
from kvstore.server.h2conn import LINGER_S, H2Connection
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
class _Call:
    request: pb.GetRequest
    metadata: tuple[tuple[str, str], ...]
    timeout_s: float | None


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
    ) -> None:
        self.service = service
        self.metrics = metrics
        self._host, self._port, self.main_port = host, port, main_port
        self._tls = tls
        self.max_streams = max_streams
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
        super().__init__(listener.connections, listener.max_streams)
        self._listener = listener

    def _start(self, st: Stream) -> None:
        call = self._request(st)
        if isinstance(call, _Call) and self._serve_now(st, call):
            return
        st.task = asyncio.get_running_loop().create_task(self._serve(st, call))

    def _serve_now(self, st: Stream, call: _Call) -> bool:
        """Serve the call here and now when every chunk is in the top tier's host memory
        and the whole reply fits the windows (one sendmsg, no task, no trip through the
        event loop); False: serve it with :meth:`_serve` (which reports any error)."""
        if self._paused or self._transport is None or self._transport.get_write_buffer_size():
            return False
        started = time.perf_counter()
        service = self._listener.service
        try:
            got = service.get_resident(call.request, service.principal(call.metadata))
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

    async def _serve(self, st: Stream, call: _Call | tuple[int, str]) -> None:
        started, name = time.perf_counter(), "UNKNOWN"
        try:
            code, message = call if isinstance(call, tuple) else await self._call(st, call)
            name = STATUS_NAMES.get(code, "UNKNOWN")
            self._end(st, code, message)
        except (asyncio.CancelledError, ConnectionError):
            name = "CANCELLED"  # the client reset the stream or went away
        except Exception:
            log.exception("HTTP/2 get listener: a call failed")
            name = "INTERNAL"
            self._end(st, INTERNAL, "internal error in the daemon (see its log)")
        finally:
            self._listener.metrics.observe_rpc("KVStore/Get", time.perf_counter() - started, name)
            if self._streams.get(st.id) is st:
                del self._streams[st.id]
            self._close_if_idle()

    def _request(self, st: Stream) -> _Call | tuple[int, str]:
        """The call a stream's headers and body make, or the status refusing it."""
        fields = st.fields
        head = {k: v for k, v in fields if k.startswith(":") or k in ("content-type", "grpc-timeout", "grpc-encoding")}
        ctype = head.get("content-type", "")
        if head.get(":method") != "POST":
            return UNIMPLEMENTED, f"HTTP method {head.get(':method')!r}: gRPC calls are POST"
        if not (ctype == "application/grpc" or ctype.startswith(("application/grpc+proto", "application/grpc;"))):
            return UNIMPLEMENTED, f"content-type {ctype!r}: this port serves gRPC (application/grpc) only"
        path = head.get(":path", "")
        if path != GET_PATH:
            return UNIMPLEMENTED, (
                f"{path}: this port serves {GET_PATH} only; the daemon's other methods are on its gRPC port "
                f"{self._listener.main_port}"
            )
        timeout_s: float | None = None
        if "grpc-timeout" in head:
            try:
                timeout_s = parse_grpc_timeout(head["grpc-timeout"])
            except ValueError as exc:
                return INVALID_ARGUMENT, str(exc)
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
        return _Call(request, tuple((k, v) for k, v in fields if not k.startswith(":")), timeout_s)

    async def _call(self, st: Stream, call: _Call) -> tuple[int, str]:
        """Run the call; its status."""
        request, timeout_s = call.request, call.timeout_s
        context: Any = _Context(self.peer, call.metadata)
        keys_left, chunk_left = len(request.keys), 0
        try:
            async with asyncio.timeout(timeout_s) as deadline, contextlib.aclosing(
                self._listener.service.Get(request, context)
            ) as replies:
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
        except _Abort as exc:
            return exc.code, exc.message
        except TimeoutError:
            if not deadline.expired():
                raise
            return DEADLINE_EXCEEDED, f"the call's deadline ({timeout_s:g} s) passed before its reply was sent"
        return OK, ""

