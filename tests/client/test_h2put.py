"""The sync client's puts over its own HTTP/2 connection (kvstore/client/h2put.py),
to the daemon's own listener (kvstore/server/h2put.py), against real daemons:
byte-exact round trips of tensors and bytes past the daemon's flow-control
windows, ``put_many`` in one call, turning it off, typed errors from the
daemon (an early answer that stops the sending), tokens and tenants, TLS, a
daemon without the listener, threads sharing one client, and durable puts
that outlive the daemon."""

from __future__ import annotations

import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hpack
import pytest
import torch
import yaml

import kvstore
from kvstore.client import ClientTLS
from kvstore.client.h2put import H2PutConnection
from kvstore.client.h2wire import Target
from kvstore.client.payload import to_payload
from kvstore.errors import CapacityError, InvalidArgument, PermissionDenied, Unauthenticated
from kvstore.http2 import (
    ACK, DATA, DEFAULT_WINDOW, END_HEADERS, END_STREAM, HEADERS, MIN_FRAME, PING, PREFACE, PUT_PATH, SETTINGS,
    SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, WINDOW_UPDATE, frame, literal, parse_frame_header,
)
from kvstore.v1 import kvstore_pb2 as pb
from tests.server import MiB, blob, key
from tests.server import test_auth_tls as auth_tls
from tests.support.daemon import DaemonProcess, cpu_and_disk, cpu_only
from tests.support.threads import run_workers

# Test certificates (module scope), from tests/server/test_auth_tls.py.
pki = auth_tls.pki

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.uint8]
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.insert(3, torch.float8_e4m3fn)
#: Payload sizes in bytes (rounded to an odd number of elements): a few bytes, past
#: 1 MiB, and past the daemon's 16 MiB connection and stream windows (once and twice).
TENSOR_BYTES = [5, MiB + 3, 20 * MiB, 40 * MiB]
BYTES_SIZES = [0, 1, 4095, MiB + 7, 17 * MiB + 1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with DaemonProcess(tmp_path_factory.mktemp("h2put"), cpu_only("256MiB")) as d:
        yield d


def reader(address: str, **kw: object) -> kvstore.Client:
    """A client that reads (and writes) only through grpcio, to check what another path stored."""
    return kvstore.Client(address, shm=False, http2_get=False, http2_put=False, **kw)  # type: ignore[arg-type]


def tensor(dtype: torch.dtype, nbytes: int, seed: int) -> torch.Tensor:
    """A reproducible tensor of ``dtype`` with an odd number of elements, about ``nbytes`` bytes."""
    size = torch.empty((), dtype=dtype).element_size()
    n = max(1, nbytes // size) | 1
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    return (torch.randn(n, generator=g) * 4).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# -- round trips -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_puts_take_the_listener_and_round_trip(server: DaemonProcess, dtype: torch.dtype) -> None:
    """Every put (the first included, which learns the listener's port with an empty Get)
    goes over HTTP/2 to the listener, and another client reading through grpcio gets
    the same bits, dtype and shape back, also for payloads larger than the daemon's
    windows (the client waits for WINDOW_UPDATEs)."""
    model = f"h2put-{DTYPES.index(dtype)}"
    with kvstore.Client(server.address, shm=False) as c, reader(server.address) as r:
        assert c.http2_puts == 0
        for i, nbytes in enumerate(TENSOR_BYTES):
            t = tensor(dtype, nbytes, seed=i).reshape(1, -1) if i % 2 else tensor(dtype, nbytes, seed=i)
            assert c.put(key(i, model=model), t) == "cpu"
            assert c.http2_puts == i + 1
            assert c.http2_get_port not in (None, server.port)  # the listener's
            back = r.get_tensor(key(i, model=model))
            assert back is not None and same_bits(back, t), f"{dtype} of {t.nbytes} bytes"
        assert r.http2_puts == r.http2_gets == 0


def test_bytes_puts_round_trip(server: DaemonProcess) -> None:
    """bytes, bytearray and memoryview values of several sizes (empty and past the windows
    included) are stored over HTTP/2 byte-exact."""
    kinds = (bytes, bytearray, memoryview)
    with kvstore.Client(server.address, shm=False) as c, reader(server.address) as r:
        for i, n in enumerate(BYTES_SIZES):
            value = kinds[i % len(kinds)](blob(i, n))
            assert c.put(key(i, model="h2put-bytes"), value) == "cpu"
            assert r.get_bytes(key(i, model="h2put-bytes")) == blob(i, n)
        assert c.http2_puts == len(BYTES_SIZES)
        # ... and the client's own HTTP/2 gets read them back too.
        for i, n in enumerate(BYTES_SIZES):
            assert c.get_bytes(key(i, model="h2put-bytes")) == blob(i, n)
        assert c.http2_gets == len(BYTES_SIZES)


def test_put_many_is_one_http2_call(server: DaemonProcess) -> None:
    """put_many of several values (tensors and bytes, one past the windows) is one call
    over HTTP/2, each value byte-exact and the tiers in order."""
    t = tensor(torch.bfloat16, 3 * MiB, seed=7)
    values: list[bytes | torch.Tensor] = [blob(0, 10), t, b"", blob(3, 18 * MiB + 5), blob(4, MiB + 1)]
    items = [(key(i, model="h2put-many"), v) for i, v in enumerate(values)]
    with kvstore.Client(server.address, shm=False) as c, reader(server.address) as r:
        assert c.put(key(99, model="h2put-many"), b"first") == "cpu"  # learns the listener's port
        assert c.http2_puts == 1
        assert c.put_many(items) == ["cpu"] * len(items)
        assert c.http2_puts == 2
        got = r.get_many([k for k, _ in items])
        for (k, v), g in zip(items, got, strict=True):
            assert g is not None, k
            if isinstance(v, torch.Tensor):
                assert same_bits(g.tensor("cpu"), v)
            else:
                assert bytes(g.data) == v
        assert c.put_many([]) == []
        assert c.http2_puts == 2


def test_turned_off(server: DaemonProcess) -> None:
    """http2_put=False: no put over HTTP/2, values still stored; http2_put must be a bool;
    puts over HTTP/2 do not need http2_get."""
    with kvstore.Client(server.address, shm=False, http2_put=False) as c:
        for i in range(3):
            c.put(key(i, model="h2put-off"), blob(i, MiB + i))
        c.put_many([(key(3, model="h2put-off"), blob(3, 5))])
        assert c.http2_puts == 0
        for i in range(3):
            assert c.get_bytes(key(i, model="h2put-off")) == blob(i, MiB + i)
        assert c.get_bytes(key(3, model="h2put-off")) == blob(3, 5)
        assert c.http2_gets == 4  # gets still take it
    with pytest.raises(InvalidArgument, match="http2_put"):
        kvstore.Client(server.address, http2_put="yes")  # type: ignore[arg-type]
    with kvstore.Client(server.address, shm=False, http2_get=False) as c, reader(server.address) as r:
        c.put(key(10, model="h2put-off"), blob(10, 2 * MiB))
        assert c.http2_puts == 1
        assert c.get_bytes(key(10, model="h2put-off")) == blob(10, 2 * MiB)
        assert c.http2_gets == 0
        assert r.get_bytes(key(10, model="h2put-off")) == blob(10, 2 * MiB)


# -- errors ------------------------------------------------------------------------------------------
def test_a_chunk_over_max_chunk_bytes_is_refused_early(tmp_path: Path) -> None:
    """The daemon refuses a chunk over server.max_chunk_bytes as soon as its header
    arrives; the client stops sending and raises RESOURCE_EXHAUSTED's error class well
    within the deadline, even for a value 48 times the limit (it would otherwise wait
    for windows the daemon never opens), and the next put works over HTTP/2."""
    big = blob(1, 48 * MiB)
    with DaemonProcess(tmp_path / "d", cpu_only("64MiB", max_chunk_bytes="1MiB")) as d:
        with kvstore.Client(d.address, shm=False, timeout_s=20) as c, reader(d.address) as r:
            # The very first put is the refused one (after the empty Get that learns the port).
            t0 = time.monotonic()
            with pytest.raises(CapacityError, match="max_chunk_bytes"):
                c.put(key(1, model="h2put-max"), big)
            assert time.monotonic() - t0 < 5
            assert c.http2_puts == 0
            assert c.put(key(2, model="h2put-max"), blob(2, MiB)) == "cpu"  # exactly the limit
            assert c.http2_puts == 1
            # Refused by the HTTP/2 path itself (a fall-back to grpcio would return None here).
            t0 = time.monotonic()
            with pytest.raises(CapacityError, match="max_chunk_bytes"):
                c._h2_put([(key(1, model="h2put-max"), big)], False)  # noqa: SLF001
            assert time.monotonic() - t0 < 5
            with pytest.raises(CapacityError, match="max_chunk_bytes"):
                c._h2_put([(key(3, model="h2put-max"), b"ok"), (key(1, model="h2put-max"), big)], False)  # noqa: SLF001
            assert c.put(key(4, model="h2put-max"), blob(4, 1000)) == "cpu"
            assert c.http2_puts == 2
            assert r.get_bytes(key(1, model="h2put-max")) is None
            assert r.get_bytes(key(2, model="h2put-max")) == blob(2, MiB)
            assert r.get_bytes(key(4, model="h2put-max")) == blob(4, 1000)


def test_tokens_and_tenants(tmp_path: Path) -> None:
    """With a token file: the right token puts over HTTP/2; another tenant's key is
    PERMISSION_DENIED (raised by the HTTP/2 path, nothing stored, the next put works);
    no token is UNAUTHENTICATED, from the gRPC port and from the listener alike."""
    a_token, b_token = "a-writer-token-0123456789", "b-writer-token-0123456789"
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": [
        {"token": a_token, "tenant": "a", "role": "readwrite"},
        {"token": b_token, "tenant": "b", "role": "readwrite"},
    ]}))
    with DaemonProcess(tmp_path / "d", cpu_only("64MiB", token_file=str(tokens))) as d:
        a_key, b_key = key(1, tenant="a"), key(1, tenant="b")
        with kvstore.Client(d.address, shm=False, token=a_token) as a:
            assert a.put(a_key, blob(1, 3 * MiB)) == "cpu"
            assert a.http2_puts == 1
            listener = a.http2_get_port
            assert listener is not None and listener != d.port
            with pytest.raises(PermissionDenied, match="tenant 'b'"):
                a.put(b_key, blob(2, 3 * MiB))
            with pytest.raises(PermissionDenied, match="tenant 'b'"):
                a._h2_put([(b_key, blob(2, 10))], False)  # noqa: SLF001
            a.put(key(2, tenant="a"), blob(3, 100))
            assert a.http2_puts == 2
            assert a.get_bytes(a_key) == blob(1, 3 * MiB)
            assert a.get_bytes(key(2, tenant="a")) == blob(3, 100)
        with reader(d.address, token=b_token) as b:
            assert b.get(b_key) is None
        with kvstore.Client(d.address, shm=False) as anon:
            with pytest.raises(Unauthenticated):
                anon.put(key(3, tenant="a"), b"x")
            assert anon.http2_puts == 0
        meta, data = to_payload(b"no token")
        conn = H2PutConnection(Target("127.0.0.1", listener))
        try:
            with pytest.raises(Unauthenticated):
                conn.put([(key(3, tenant="a"), meta, data)], durable=False, metadata=(), timeout_s=10)
        finally:
            conn.close()
        with reader(d.address, token=a_token) as r:
            assert r.get(key(3, tenant="a")) is None


def test_tls(tmp_path: Path, pki: auth_tls.Pki) -> None:
    """Puts go over HTTP/2 on the TLS listener and round-trip."""
    sizes = [3, MiB + 1, 5 * MiB + 3]
    tls = ClientTLS(ca=pki.ca)
    with auth_tls._tls_daemon(tmp_path / "d", pki) as d:  # noqa: SLF001 - the shared TLS daemon
        with kvstore.Client(d.address, shm=False, tls=tls) as c, reader(d.address, tls=tls) as r:
            for i, n in enumerate(sizes):
                assert c.put(key(i, model="h2put-tls"), blob(i, n)) == "cpu"
            assert c.http2_puts == len(sizes)
            assert c.http2_get_port not in (None, d.port)
            for i, n in enumerate(sizes):
                assert r.get_bytes(key(i, model="h2put-tls")) == blob(i, n)


def test_a_daemon_without_the_listener(tmp_path: Path) -> None:
    """With the daemon's listener turned off (server.http2_get: false), puts go through
    grpcio and are stored."""
    with DaemonProcess(tmp_path / "d", cpu_only("64MiB", http2_get=False)) as d:
        with kvstore.Client(d.address, shm=False) as c, reader(d.address) as r:
            for i in range(3):
                assert c.put(key(i, model="h2put-nolistener"), blob(i, 2 * MiB + i)) == "cpu"
            c.put_many([(key(3, model="h2put-nolistener"), blob(3, 7))])
            assert c.http2_puts == 0
            assert c.http2_get_port == d.port
            for i in range(3):
                assert r.get_bytes(key(i, model="h2put-nolistener")) == blob(i, 2 * MiB + i)
            assert r.get_bytes(key(3, model="h2put-nolistener")) == blob(3, 7)


# -- threads -----------------------------------------------------------------------------------------
def test_threads_share_one_client(server: DaemonProcess) -> None:
    """Threads putting and getting distinct keys through one client all succeed
    byte-exact (one call at a time on the HTTP/2 connection, the others on grpcio)."""
    sizes = [17, MiB + 5, 3 * MiB + 1]

    def value(w: int, j: int) -> bytes:
        return blob(1000 * w + j, sizes[(w + j) % len(sizes)])

    with kvstore.Client(server.address, shm=False) as c:

        def work(w: int) -> None:
            for j in range(10):
                k = key(1000 * w + j, model="h2put-threads")
                c.put(k, value(w, j))
                assert c.get_bytes(k) == value(w, j)

        run_workers(work, 4)
        assert c.http2_puts > 0
    with reader(server.address) as r:
        for w in range(4):
            for j in range(10):
                assert r.get_bytes(key(1000 * w + j, model="h2put-threads")) == value(w, j)


# -- durability --------------------------------------------------------------------------------------
def test_durable_puts_outlive_the_daemon(tmp_path: Path) -> None:
    """A durable put over HTTP/2 returns the tier grpcio's would, and once it returned
    the chunk survives the daemon being killed: a new daemon on the same disk
    directory serves it."""
    config = cpu_and_disk(tmp_path / "disk", cpu="32MiB", disk="256MiB")
    values = {key(i, model="h2put-durable"): blob(i, n) for i, n in enumerate([11, 3 * MiB + 1])}
    first = DaemonProcess(tmp_path / "a", config).start()
    try:
        with kvstore.Client(first.address, shm=False) as c, reader(first.address) as r:
            expected = r.put(key(9, model="h2put-durable"), b"via grpcio", durable=True)
            for k, v in values.items():
                assert c.put(k, v, durable=True) == expected
            assert c.http2_puts == len(values)
    finally:
        first.stop(signal.SIGKILL)
    with DaemonProcess(tmp_path / "b", config) as second, reader(second.address) as r:
        for k, v in values.items():
            assert r.get_bytes(k) == v


# -- flow control against a strict peer --------------------------------------------------------------
def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        if not got:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += got
    return bytes(buf)


@dataclass
class StrictPeer:
    """A bare HTTP/2 server for one Put call that grants small windows (a stream window
    of :attr:`stream_window`, the default 65535 for the connection), the smallest
    frame size, and window credit only once a window is spent; it records every
    DATA frame and what went past a window.  (The daemon gives credit back as data
    arrives and does not refuse data past its windows, so it cannot show this.)"""

    listener: socket.socket
    stream_window: int = 40_000
    frames: list[int] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    grants: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[tuple[pb.PutHeader, bytes]] = field(default_factory=list)
    error: BaseException | None = None

    def run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(20)
                self._serve(conn)
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
            self.error = exc

    def _serve(self, conn: socket.socket) -> None:
        if recv_exact(conn, len(PREFACE)) != PREFACE:
            raise AssertionError("no client preface")
        conn.sendall(frame(SETTINGS, 0, 0, struct.pack(
            ">HIHI", SETTINGS_INITIAL_WINDOW_SIZE, self.stream_window, SETTINGS_MAX_FRAME_SIZE, MIN_FRAME)))
        conn_window, stream_windows = DEFAULT_WINDOW, dict[int, int]()
        body = bytearray()
        decoder = hpack.Decoder()
        while True:
            length, kind, flags, stream = parse_frame_header(recv_exact(conn, 9))
            payload = recv_exact(conn, length)
            if kind == SETTINGS and not flags & ACK:
                conn.sendall(frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                conn.sendall(frame(PING, ACK, 0, payload))
            elif kind == HEADERS:
                self.headers = {str(k): str(v) for k, v in decoder.decode(payload)}
                stream_windows[stream] = self.stream_window
            elif kind == DATA:
                self.frames.append(length)
                conn_window -= length
                stream_windows[stream] -= length
                if conn_window < 0 or stream_windows[stream] < 0:
                    self.violations.append(f"DATA of {length}: windows {conn_window}, {stream_windows[stream]}")
                body += payload
                if flags & END_STREAM:
                    self._answer(conn, stream, bytes(body))
                    return
                updates = b""
                if stream_windows[stream] <= 0:
                    updates += frame(WINDOW_UPDATE, 0, stream, struct.pack(">I", self.stream_window))
                    stream_windows[stream] += self.stream_window
                if conn_window <= 0:
                    updates += frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", DEFAULT_WINDOW))
                    conn_window += DEFAULT_WINDOW
                if updates:
                    self.grants += 1
                    conn.sendall(updates)

    def _answer(self, conn: socket.socket, stream: int, body: bytes) -> None:
        at = 0
        while at < len(body):
            flag, size = struct.unpack_from(">BI", body, at)
            message = pb.PutFrame.FromString(body[at + 5 : at + 5 + size])
            at += 5 + size
            if message.WhichOneof("part") == "header":
                self.chunks.append((message.header, b""))
            else:
                h, data = self.chunks[-1]
                self.chunks[-1] = (h, data + message.data)
        reply = pb.PutReply(results=[pb.PutResult(key=h.key, tier="peer") for h, _ in self.chunks]).SerializeToString()
        conn.sendall(
            frame(HEADERS, END_HEADERS, stream, literal(":status", "200") + literal("content-type", "application/grpc"))
            + frame(DATA, 0, stream, struct.pack(">BI", 0, len(reply)) + reply)
            + frame(HEADERS, END_HEADERS | END_STREAM, stream, literal("grpc-status", "0"))
        )


def test_the_request_keeps_within_the_peers_windows_and_frame_size() -> None:
    """Against a peer with small windows and 16 KiB frames, the request never goes past
    a window (it waits for WINDOW_UPDATEs), no DATA frame exceeds the peer's
    SETTINGS_MAX_FRAME_SIZE, and the chunks arrive whole as gRPC Put messages."""
    values = [blob(1, 600_001), blob(2, 5), b""]
    items = [(key(i, model="h2put-peer"), *to_payload(v)) for i, v in enumerate(values)]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        peer = StrictPeer(listener)
        thread = threading.Thread(target=peer.run, daemon=True)
        thread.start()
        conn = H2PutConnection(Target("127.0.0.1", listener.getsockname()[1]))
        try:
            assert conn.put(items, durable=True, metadata=[("x-test", "1")], timeout_s=20) == ["peer"] * 3
        finally:
            conn.close()
        thread.join(20)
    assert not thread.is_alive() and peer.error is None, peer.error
    assert peer.violations == []
    assert max(peer.frames) == MIN_FRAME  # the peer's frame size, used to the full
    assert peer.grants >= sum(map(len, values)) // DEFAULT_WINDOW  # it waited for credit, again and again
    assert peer.headers[":path"] == PUT_PATH and peer.headers["x-test"] == "1"
    assert peer.headers["content-type"] == "application/grpc" and "grpc-timeout" in peer.headers
    assert [(h.key, h.durable, h.meta.nbytes, h.meta.checksum, data) for h, data in peer.chunks] == [
        (k, True, meta.nbytes, meta.checksum, bytes(data)) for k, meta, data in items
    ]
