"""The sync client's HTTP/2 channel for gets and puts: one connection
(kvstore/client/h2get.py, kvstore/client/h2put.py) opened on first use, moved
to the daemon's own listener once the daemon names it, and watched between
calls.  Puts go only to that listener (the daemon's gRPC port keeps grpcio's
small windows and frames): a put before the listener is known asks for it
first with an empty Get."""

from __future__ import annotations

import dataclasses
import select
import threading
from collections.abc import Sequence

from kvstore.chunk import ChunkMeta
from kvstore.client.h2get import Destination
from kvstore.client.h2put import H2PutConnection
from kvstore.client.h2wire import FallBack, Target
from kvstore.errors import KVStoreError
from kvstore.http2 import ASK_HEADER
from kvstore.v1 import kvstore_pb2 as pb


class H2GetChannel:
    """The client's HTTP/2 connection for gets and puts: opened on first use, carrying
    one call at a time, and watched between calls by a thread that runs
    :meth:`H2GetConnection.serve_idle` once the connection has been quiet for
    :data:`IDLE_S` (so back-to-back calls never wake it)."""

    #: Quiet time after which the watcher looks at the connection.
    IDLE_S = 0.1
    #: Connect timeout towards the listener (at most; the target's towards the gRPC port):
    #: a port that cannot be reached (filtered) costs this once, then the calls stay on
    #: the gRPC port.
    LISTENER_CONNECT_S = 1.0

    def __init__(self, target: Target) -> None:
        #: The daemon's gRPC port, where the channel starts and comes back to.
        self._target = target
        self._conn: H2PutConnection | None = None
        self._cv = threading.Condition()
        self._busy = False
        self._closed = False
        self._calls = 0
        self._watcher: threading.Thread | None = None
        #: Gets and puts this channel completed (the others went back to the caller as None).
        self.served = 0
        self.puts = 0
        #: The port of the connection in use: the daemon's gRPC port or its HTTP/2 Get listener.
        self.port = target.port
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
        if not self._claim():
            return None
        try:
            conn = self._connection()
            if conn is None:
                return None
            got = self._get(conn, request, metadata, timeout_s, destination)
            if got is not None:
                self.served += 1
            return got
        finally:
            self._release()

    def put(
        self,
        items: Sequence[tuple[str, ChunkMeta, memoryview]],
        *,
        durable: bool,
        metadata: Sequence[tuple[str, str]],
        timeout_s: float,
    ) -> list[str] | None:
        """:meth:`H2PutConnection.put` to the daemon's listener, or None as :meth:`get`
        returns it, and when the daemon has no listener (or names none)."""
        if not self._claim():
            return None
        try:
            conn = self._connection()
            if conn is not None and self._fast is None and self._learn:
                try:  # an empty Get, to learn the listener's port
                    self._get(conn, pb.GetRequest(), metadata, timeout_s, lambda h: memoryview(b""))
                except KVStoreError:
                    return None
                conn = self._connection()
            if conn is None or self._fast is None or self.port != self._fast:
                return None
            try:
                tiers = conn.put(items, durable=durable, metadata=metadata, timeout_s=timeout_s)
            except FallBack:
                return None
            self.puts += 1
            return tiers
        finally:
            self._release()

    def _claim(self) -> bool:
        with self._cv:
            if self._busy or self._closed:
                return False
            self._busy = True
            self._calls += 1
            return True

    def _release(self) -> None:
        with self._cv:
            self._busy = False

    def _get(
        self, conn: H2PutConnection, request: pb.GetRequest, metadata: Sequence[tuple[str, str]], timeout_s: float,
        destination: Destination,
    ) -> list[tuple[pb.GetHeader, memoryview | None]] | None:
        """A get on ``conn``, learning the listener's port on the first call to the gRPC port."""
        ask = self._learn and self._fast is None
        try:
            got = conn.get(
                request, metadata=[*metadata, (ASK_HEADER, "1")] if ask else metadata, timeout_s=timeout_s,
                destination=destination,
            )
        except FallBack:
            return None
        if ask:
            port = conn.advertised_port
            self._learn = False
            if port is not None and port != self._target.port and port not in self._unreachable:
                self._fast = port  # the next call opens a connection there
                self._conn = None
                conn.close()
        return got

    def _connection(self) -> H2PutConnection | None:
        """The open connection, or a new one: to the listener if known, else (or if it
        cannot be reached) to the gRPC port; None if neither can be opened."""
        conn = self._conn
        if conn is not None and not conn.broken:
            return conn
        self._conn = None
        while True:
            port = self._fast or self._target.port
            target = dataclasses.replace(self._target, port=port)
            if self._fast is not None:
                target = dataclasses.replace(target, connect_timeout_s=min(target.connect_timeout_s, self.LISTENER_CONNECT_S))
            try:
                conn = H2PutConnection(target)
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

    @property
    def busy(self) -> bool:
        """Whether a call holds the connection now (a hint, read without the lock: a caller
        that finds it free may still be turned away, and then takes the other way)."""
        return self._busy

    def abort(self) -> None:
        """End the call in flight (from another thread): its connection is shut down, the
        call returns None soon after, and the next call opens a new connection."""
        conn = self._conn
        if conn is not None:
            conn.abort()

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
