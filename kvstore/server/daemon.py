"""The daemon: a TieredStore behind a grpc.aio server.

Lifecycle: :meth:`Daemon.start` opens the store (the disk tier rebuilds its
index), binds the port and marks the health service SERVING.
:meth:`Daemon.stop` is the graceful path taken on SIGTERM/SIGINT: health
goes NOT_SERVING, the server stops accepting RPCs and lets those in flight
finish for up to ``grace_s`` seconds, then the store flushes its
write-through queues (so every acknowledged put reaches disk) and closes.  A
second signal during that wait cancels what is left.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from kvstore.config import DaemonConfig, TLSConfig
from kvstore.errors import InvalidArgument
from kvstore.keys import Namespace
from kvstore.metrics import Metrics, MetricsServer
from kvstore.server import frames
from kvstore.server.admin import SERVICE_NAME as ADMIN_SERVICE_NAME
from kvstore.server.admin import AdminService, admin_handlers
from kvstore.server.auth import TokenTable
from kvstore.http2 import ASK_HEADER, PORT_HEADER
from kvstore.server.h2data import STREAM_RECV_WINDOW
from kvstore.server.h2get import GetListener
from kvstore.server.limits import server_options
from kvstore.server.messages import lenient
from kvstore.server.service import MAX_PUT_FRAME, MIN_FRAME, KVStoreService
from kvstore.store import TieredStore
from kvstore.tiers import make_tier
from kvstore.v1 import kvstore_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVStore"].full_name


def channel_options(frame_bytes: int) -> list[tuple[str, Any]]:
    """gRPC options shared by the daemon and its clients.

    Large HTTP/2 frames and a large flow-control window roughly double
    streaming throughput on loopback compared with the defaults.
    """
    max_msg = max(MAX_PUT_FRAME, frame_bytes * 2) + MIN_FRAME
    return [
        ("grpc.max_receive_message_length", max_msg),
        ("grpc.max_send_message_length", max_msg),
        ("grpc.http2.max_frame_size", 16 * 1024 * 1024 - 1),
        ("grpc.http2.lookahead_bytes", 64 << 20),
        ("grpc.so_reuseport", 0),
    ]


def _unary(fn: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, InvalidArgument):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request))
        return await fn(request, context)

    return handle


def _get(service: KVStoreService, get_port: Callable[[], int]) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        if isinstance(request, InvalidArgument):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request))
        port = get_port()
        if port and any(k == ASK_HEADER for k, _ in context.invocation_metadata() or ()):
            await context.send_initial_metadata(((PORT_HEADER, str(port)),))
        async for frame in service.Get(request, context):
            yield frame

    return handle


def kvstore_handlers(service: KVStoreService, get_port: Callable[[], int] = lambda: 0) -> grpc.GenericRpcHandler:
    """The KVStore service's handlers, with fast data-frame (de)serialisers for
    Put and Get (see :mod:`kvstore.server.frames`); the wire format is unchanged.
    Malformed requests are answered INVALID_ARGUMENT (see :func:`~kvstore.server.messages.lenient`).
    A Get that asks (:data:`~kvstore.server.h2get.ASK_HEADER`) is told ``get_port()``, the
    port of the daemon's HTTP/2 Get listener, when that is not 0."""
    unary: dict[str, tuple[type[Message], type[Message]]] = {
        "Lookup": (pb.LookupRequest, pb.LookupReply),
        "Exists": (pb.ExistsRequest, pb.ExistsReply),
        "Delete": (pb.DeleteRequest, pb.DeleteReply),
        "RegisterSegment": (pb.RegisterSegmentRequest, pb.RegisterSegmentReply),
        "ReleaseSegment": (pb.ReleaseSegmentRequest, pb.ReleaseSegmentReply),
        "ShmPut": (pb.ShmPutRequest, pb.PutReply),
        "ShmGet": (pb.ShmGetRequest, pb.ShmGetReply),
    }
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        name: grpc.unary_unary_rpc_method_handler(
            _unary(getattr(service, name)), request_deserializer=lenient(req), response_serializer=rep.SerializeToString
        )
        for name, (req, rep) in unary.items()
    }
    handlers["Put"] = grpc.stream_unary_rpc_method_handler(
        service.Put, request_deserializer=frames.decoder(pb.PutFrame), response_serializer=pb.PutReply.SerializeToString
    )
    handlers["Get"] = grpc.unary_stream_rpc_method_handler(
        _get(service, get_port), request_deserializer=lenient(pb.GetRequest), response_serializer=frames.encode
    )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def _tls_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """The HTTP/2 Get listener's TLS (the gRPC port's certificate, key and client CA), or None."""
    if not tls.enabled:
        return None
    assert tls.cert is not None and tls.key is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.set_alpn_protocols(["h2"])
    if tls.client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(tls.client_ca)
    return ctx


def build_store(cfg: DaemonConfig) -> TieredStore:
    tiers = [(make_tier(t), t.settings) for t in cfg.tiers]
    store = TieredStore(tiers)
    for ns, limit in cfg.quotas:
        store.set_quota(Namespace.parse(ns), limit)
    return store


class Daemon:
    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        self.store = build_store(cfg)
        self._tokens = tokens = TokenTable.load(cfg.server.token_file) if cfg.server.token_file else None
        self.metrics = Metrics(self.store)
        self.admin = AdminService(self.store, tokens=tokens, metrics=self.metrics)
        self.metrics_server: MetricsServer | None = None
        self.service = KVStoreService(
            self.store,
            tokens=tokens,
            frame_bytes=cfg.server.frame_bytes,
            max_chunk_bytes=cfg.server.max_chunk_bytes,
            max_batch=cfg.server.max_batch,
            shm=cfg.server.shm,
            shm_direct_reads=cfg.server.shm_direct_reads,
            shm_direct_writes=cfg.server.shm_direct_writes,
            shm_reserved_share=cfg.server.shm_reserved_share,
            max_concurrent_streams=cfg.server.max_concurrent_streams,
            metrics=self.metrics,
            limits=cfg.server.limits,
        )
        self.health = HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.port = 0
        #: The HTTP/2 Get listener (server.http2_get), once started.
        self.get_listener: GetListener | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Open the store and serve; returns the bound port."""
        await self.store.open()
        frame = self.cfg.server.frame_bytes
        options = server_options(channel_options(frame), self.cfg.server.limits, frame)
        server = grpc.aio.server(options=options, interceptors=[self.metrics.interceptor])
        get_port = lambda: 0 if self.get_listener is None else self.get_listener.port  # noqa: E731
        server.add_generic_rpc_handlers((kvstore_handlers(self.service, get_port), admin_handlers(self.admin)))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                ADMIN_SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        addr = f"{self.cfg.server.host}:{self.cfg.server.port}"
        tls = self.cfg.server.tls
        if tls.enabled:
            assert tls.cert is not None and tls.key is not None
            creds = grpc.ssl_server_credentials(
                [(tls.key.read_bytes(), tls.cert.read_bytes())],
                root_certificates=tls.client_ca.read_bytes() if tls.client_ca else None,
                require_client_auth=tls.client_ca is not None,
            )
            self.port = server.add_secure_port(addr, creds)
        else:
            self.port = server.add_insecure_port(addr)
        if self.cfg.server.metrics_port:
            host = self.cfg.server.metrics_host
            self.metrics_server = await self.metrics.serve(host, self.cfg.server.metrics_port, self._tokens)
            log.info("metrics on http://%s:%d/metrics", host, self.metrics_server.port)
        await server.start()
        self._server = server
        if self.cfg.server.http2_get:
            listener = GetListener(
                self.service, self.metrics, host=self.cfg.server.host, port=self.cfg.server.http2_get_port,
                main_port=self.port, tls=_tls_context(tls), max_streams=self.cfg.server.max_concurrent_streams,
                stream_window=self.service.limits.stream_window(STREAM_RECV_WINDOW),
            )
            try:
                await listener.start()
            except OSError as exc:
                await server.stop(0)
                self._server = None
                raise OSError(
                    exc.errno, f"server.http2_get_port {self.cfg.server.http2_get_port}: cannot listen there ({exc.strerror}); "
                    "pick another port, 0 for any free one, or turn the listener off (server.http2_get: false)",
                ) from None
            self.get_listener = listener
            log.info("HTTP/2 Get listener on %s:%d", self.cfg.server.host, listener.port)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: refuse new RPCs, finish those in flight, flush, close."""
        if self._server is None:
            return
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        grace_s = self.cfg.server.grace_s if grace is None else grace
        # Both doors close together; what either acknowledged is in the store before it closes (and flushes).
        listener = self.get_listener
        await asyncio.gather(
            self._server.stop(grace_s), self.service.drain(grace_s), *([listener.stop(grace_s)] if listener else [])
        )
        self.get_listener = None
        self._server = None
        if self.metrics_server is not None:
            await self.metrics_server.close()
            self.metrics_server = None
        await self.store.close()
        self.service.close()
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()

    async def run_until_signal(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        hits = 0

        def on_signal(signum: int) -> None:
            nonlocal hits
            hits += 1
            log.info("received %s: shutting down (again to cancel streams in flight)", signal.Signals(signum).name)
            stop.set()
            if hits > 1 and self._server is not None:
                asyncio.ensure_future(self._server.stop(0))
                if self.get_listener is not None:
                    self.get_listener.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        await stop.wait()
        await self.stop()
