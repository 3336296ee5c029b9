"""The daemon's HTTP/2 Get listener (kvstore/server/h2get.py) against real
daemon processes on loopback.

Clients of the listener here: grpcio (an ordinary gRPC client that learned
the port from the main port's answer to :data:`~kvstore.http2.ASK_HEADER`),
a bare HTTP/2 client over a socket (:class:`H2`, frames built with
kvstore.http2's helpers, so the tests can send what no gRPC library would)
and ``kvstore.Client``.  Covered: byte-exact gets of several sizes and
layouts, missing keys, many keys in order, concurrent streams; statuses
(UNIMPLEMENTED for other methods, INVALID_ARGUMENT, tokens and tenants,
deadlines, compressed requests); the protocol (HTTP/1.1 and garbage,
malformed frames answered with GOAWAY, RST_STREAM of a call in flight);
TLS and mutual TLS; discovery, a fixed port, the listener turned off and the
client's fall-back; graceful shutdown; metrics.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import hpack
import pytest
import torch

import kvstore
from kvstore.client import ClientTLS
from kvstore.config import build
from kvstore.errors import ConfigError
from kvstore.http2 import (
    ACK, ASK_HEADER, CANCEL, CONTINUATION, DATA, DEFAULT_WINDOW, END_HEADERS, END_STREAM, ENHANCE_YOUR_CALM,
    FRAME_SIZE_ERROR, GET_PATH, PUT_PATH,
    GOAWAY, HEADERS, MAX_WINDOW, NO_ERROR, PADDED, PING, PORT_HEADER, PREFACE, PRIORITY_FLAG, PROTOCOL_ERROR,
    REFUSED_STREAM, RST_STREAM, SETTINGS, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, WINDOW_UPDATE, frame,
    grpc_timeout, literal, parse_frame_header,
)
from kvstore.server.h2conn import RECV_FRAME
from kvstore.client.h2channel import H2GetChannel
from kvstore.server.h2data import MAX_BUFFERED, MAX_GATHERED, MAX_REQUEST
from kvstore.v1 import admin_pb2 as apb
from kvstore.v1 import admin_pb2_grpc as apb_grpc
from kvstore.v1 import kvstore_pb2 as pb
from tests.server import MiB, bearer, blob, channel, health, key, raw_get, raw_put, rpc_error, stub
from tests.server import test_auth_tls as auth_tls
from tests.support.daemon import DaemonProcess, cpu_and_disk, cpu_only
from tests.support.threads import run_workers
from tests.support.metrics import free_port, metric, scrape

# Fixtures of tests/server/test_auth_tls.py: a daemon with a token file (module scope) and test certificates.
authd = auth_tls.authd
pki = auth_tls.pki

MODEL = "h2l"
SIZES = [0, 1, 4095, MiB + 3, 9 * MiB + 1]
BIG = len(SIZES) - 1  # index of the 9 MiB + 1 chunk
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def k(i: int) -> str:
    return key(i, model=MODEL)


def data(i: int) -> bytes:
    return blob(i, SIZES[i])


# -- discovery --------------------------------------------------------------------------------------
def discover(
    address: str, *, creds: grpc.ChannelCredentials | None = None, metadata: Sequence[tuple[str, str]] = (),
    probe: str | None = None,
) -> int | None:
    """The listener's port as the daemon's gRPC port tells it (None: it names none)."""
    ch = grpc.secure_channel(address, creds) if creds is not None else channel(address)
    with ch:
        request = pb.GetRequest(keys=[probe or key(0, model="discovery")])
        call = stub(ch).Get(request, metadata=[(ASK_HEADER, "1"), *metadata], timeout=30)
        list(call)
        port = dict(call.initial_metadata()).get(PORT_HEADER)
    return None if port is None else int(port)


@dataclass
class Served:
    d: DaemonProcess
    port: int  # the listener's
    metrics_port: int

    @property
    def address(self) -> str:
        """The listener's address."""
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    mport = free_port()
    with DaemonProcess(tmp_path_factory.mktemp("h2listener"), cpu_only("256MiB", metrics_port=mport)) as d:
        with channel(d.address) as ch:
            raw_put(stub(ch), [(k(i), data(i)) for i in range(len(SIZES))])
        port = discover(d.address)
        assert port is not None and port != d.port
        yield Served(d, port, mport)


@pytest.fixture(scope="module")
def lch(served: Served) -> Iterator[grpc.Channel]:
    """A grpcio channel with default options to the listener."""
    with channel(served.address) as ch:
        yield ch


def assert_still_serves(s: Served) -> None:
    """The daemon serves gets through kvstore.Client (over the listener) and its data is as stored."""
    with kvstore.Client(s.d.address, shm=False, retries=0, timeout_s=30) as c:
        for i in range(len(SIZES)):
            assert c.get_bytes(k(i)) == data(i), i
        assert c.http2_gets == len(SIZES)
        assert c.http2_get_port == s.port


@pytest.fixture
def after_check(served: Served) -> Iterator[Served]:
    """``served``; afterwards the daemon still serves and its data is unchanged."""
    yield served
    assert_still_serves(served)


# -- a bare HTTP/2 client ---------------------------------------------------------------------------
@dataclass
class Reply:
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None

    @property
    def status(self) -> int | None:
        got = dict(self.trailers).get("grpc-status")
        return None if got is None else int(got)

    @property
    def message(self) -> str:
        return dict(self.trailers).get("grpc-message", "")

    def messages(self) -> list[pb.GetFrame]:
        """The length-prefixed GetFrame messages of the body (all complete)."""
        out, at, body = [], 0, bytes(self.body)
        while at < len(body):
            flag, n = struct.unpack(">BI", body[at : at + 5])
            assert flag == 0 and at + 5 + n <= len(body), "a cut or compressed message"
            out.append(pb.GetFrame.FromString(body[at + 5 : at + 5 + n]))
            at += 5 + n
        return out


def reassemble(frames: Sequence[pb.GetFrame], keys: Sequence[str]) -> list[bytes | None]:
    """Per key, its bytes (None: not found), checking one header per key, in order;
    inline data (``GetHeader.data``) counted as the chunk's first bytes."""
    out: list[bytes | None] = [None] * len(keys)
    seen: list[int] = []
    parts: list[bytes] = []
    want, index = -1, -1  # want: bytes of the chunk being read; -1: none pending
    for f in frames:
        if f.WhichOneof("part") == "header":
            assert want < 0, "a header before the previous chunk was complete"
            h = f.header
            index = h.index
            seen.append(index)
            assert h.key == keys[index]
            parts, want = [h.data] if h.data else [], (h.meta.nbytes if h.found else -1)
        else:
            assert want > 0, "a data frame without a found header, or past its chunk"
            parts.append(f.data)
        if want >= 0:
            got = sum(map(len, parts))
            assert got <= want
            if got == want:
                out[index], want = b"".join(parts), -1
    assert want < 0, "the last chunk was cut"
    assert seen == list(range(len(keys))), f"headers for {seen}"
    return out


def get_request(keys: Sequence[str], **fields: Any) -> bytes:
    return pb.GetRequest(keys=list(keys), **fields).SerializeToString()


class H2:
    """A bare HTTP/2 client on a socket: sends what it is told, reads frames,
    acknowledges SETTINGS and PING, and records each stream's reply."""

    def __init__(self, port: int, *, window: int = MAX_WINDOW, preface: bool = True, rcvbuf: int = 0) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self.buf = bytearray()
        self.decoder = hpack.Decoder()
        self.replies: dict[int, Reply] = {}
        self.goaway: tuple[int, int, bytes] | None = None
        self.events: list[tuple[int, int, int]] = []  # (type, flags, stream) of every frame read
        self.pongs: list[bytes] = []  # payloads of the PING ACKs read
        if preface:
            grow = conn_window(window - DEFAULT_WINDOW) if window > DEFAULT_WINDOW else b""
            self.send(PREFACE + settings(window) + grow)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> H2:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def call(self, stream: int, keys: Sequence[str], **kw: Any) -> None:
        """Send a Get on ``stream`` (see :func:`request`)."""
        self.replies[stream] = Reply()
        self.send(request(stream, get_request(keys, **kw.pop("fields", {})), **kw))

    def reply(self, stream: int) -> Reply:
        return self.replies.setdefault(stream, Reply())

    def read_frame(self, timeout: float = 10.0) -> tuple[int, int, int, bytes] | None:
        """The next frame (handled), or None once the daemon closed the connection."""
        self.sock.settimeout(timeout)
        while True:
            if len(self.buf) >= 9:
                length, kind, flags, stream = parse_frame_header(self.buf[:9])
                if len(self.buf) >= 9 + length:
                    payload = bytes(self.buf[9 : 9 + length])
                    del self.buf[: 9 + length]
                    self._handle(kind, flags, stream, payload)
                    return kind, flags, stream, payload
            try:
                got = self.sock.recv(1 << 20)
            except ConnectionResetError:
                got = b""
            if not got:
                return None
            self.buf += got

    def _handle(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        self.events.append((kind, flags, stream))
        if kind == SETTINGS and not flags & ACK:
            with contextlib.suppress(OSError):  # the daemon may have closed the connection already
                self.send(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            with contextlib.suppress(OSError):
                self.send(frame(PING, ACK, 0, payload))
        elif kind == PING:
            self.pongs.append(payload)
        elif kind == GOAWAY:
            last, code = struct.unpack(">II", payload[:8])
            self.goaway = (last & MAX_WINDOW, code, payload[8:])
        elif kind == HEADERS:
            assert flags & END_HEADERS, "the daemon's header blocks fit one frame"
            r = self.reply(stream)
            fields = [(str(n), str(v)) for n, v in self.decoder.decode(payload)]
            if not r.headers:
                r.headers = fields
                if flags & END_STREAM:  # trailers-only
                    r.trailers = fields
            else:
                assert flags & END_STREAM, "trailers end the stream"
                r.trailers = fields
            r.ended = r.ended or bool(flags & END_STREAM)
        elif kind == DATA:
            r = self.reply(stream)
            assert r.headers and not r.ended, "DATA before the reply's headers or after its end"
            r.body += payload
            r.ended = r.ended or bool(flags & END_STREAM)
        elif kind == RST_STREAM:
            self.reply(stream).reset = struct.unpack(">I", payload)[0]

    def pump(self, until: Callable[[], bool], timeout: float = 30.0) -> None:
        """Read frames until ``until()``; fail on a timeout or a closed connection."""
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            assert left > 0, "timed out waiting for the daemon"
            try:
                got = self.read_frame(left)
            except TimeoutError:
                pytest.fail("timed out waiting for the daemon")
            if got is None:
                assert until(), f"the daemon closed the connection (GOAWAY {self.goaway})"
                return

    def finish(self, stream: int, timeout: float = 30.0) -> Reply:
        self.pump(lambda: self.reply(stream).ended or self.reply(stream).reset is not None, timeout)
        return self.reply(stream)

    def ping(self, payload: bytes = b"pingpong", timeout: float = 30.0) -> int:
        """Send a PING, read up to its ACK; the index in :attr:`events` just after the ACK
        (the daemon handled everything sent before the PING by then)."""
        self.send(frame(PING, 0, 0, payload))
        self.pump(lambda: payload in self.pongs, timeout)
        return len(self.events)

    def until_closed(self, timeout: float = 10.0) -> None:
        """Read (and handle) frames until the daemon closes the connection."""
        deadline = time.monotonic() + timeout
        try:
            while self.read_frame(max(0.01, deadline - time.monotonic())) is not None:
                assert time.monotonic() < deadline, "the daemon did not close the connection"
        except TimeoutError:
            pytest.fail("the daemon did not close the connection")


def settings(window: int = DEFAULT_WINDOW, *, max_frame: int = 0) -> bytes:
    """A SETTINGS frame: SETTINGS_INITIAL_WINDOW_SIZE, and SETTINGS_MAX_FRAME_SIZE if given."""
    payload = struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, window)
    if max_frame:
        payload += struct.pack(">HI", SETTINGS_MAX_FRAME_SIZE, max_frame)
    return frame(SETTINGS, 0, 0, payload)


def conn_window(grow: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", grow))


def header_block(path: str = GET_PATH, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    """A gRPC call's request headers: POST ``path``, the gRPC content type, ``extra``."""
    return b"\x83\x86" + b"".join(  # :method POST, :scheme http (static table)
        literal(n, v)
        for n, v in [(":path", path), (":authority", "127.0.0.1"), ("content-type", "application/grpc"),
                     ("te", "trailers"), *extra]
    )


def request(
    stream: int, message: bytes, *, path: str = GET_PATH, extra: Sequence[tuple[str, str]] = (), flag: int = 0,
    split_headers: bool = False,
) -> bytes:
    """HEADERS (see :func:`header_block`) and one DATA frame with ``message``
    length-prefixed (``flag``: the compressed-flag byte), ending the stream."""
    block = header_block(path, extra)
    if split_headers:  # HEADERS and two CONTINUATIONs
        a, b = len(block) // 3, 2 * len(block) // 3
        head = frame(HEADERS, 0, stream, block[:a]) + frame(CONTINUATION, 0, stream, block[a:b])
        head += frame(CONTINUATION, END_HEADERS, stream, block[b:])
    else:
        head = frame(HEADERS, END_HEADERS, stream, block)
    return head + frame(DATA, END_STREAM, stream, struct.pack(">BI", flag, len(message)) + message)


# == grpcio as a client of the listener ==============================================================
@pytest.mark.parametrize("i", range(len(SIZES)), ids=[str(n) for n in SIZES])
def test_grpcio_gets_are_byte_exact(lch: grpc.Channel, i: int) -> None:
    assert raw_get(stub(lch), [k(i)]) == [data(i)]
    assert raw_get(stub(lch), [k(i)], frame_bytes=64 << 10) == [data(i)]  # frames of 64 KiB


def test_grpcio_frames_over_its_default_message_limit(served: Served) -> None:
    """frame_bytes 8 MiB (the daemon caps it at its 4 MiB): messages over grpcio's default
    4 MiB limit, taken with grpc.max_receive_message_length raised."""
    with channel(served.address, ("grpc.max_receive_message_length", 16 * MiB)) as ch:
        frames = list(stub(ch).Get(pb.GetRequest(keys=[k(BIG)], frame_bytes=8 * MiB), timeout=60))
        assert [len(f.data) for f in frames[1:]] == [4 * MiB, 4 * MiB, MiB + 1]
        assert reassemble(frames, [k(BIG)]) == [data(BIG)]
    with channel(served.address) as ch:  # the default limit: grpcio refuses the message
        rpc_error(lambda: list(stub(ch).Get(pb.GetRequest(keys=[k(BIG)], frame_bytes=8 * MiB), timeout=60)),
                  grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_grpcio_inline_data(lch: grpc.Channel) -> None:
    keys = [k(i) for i in range(len(SIZES))]
    # frame_bytes 0: the daemon's default frame, header included, within grpcio's default 4 MiB limit.
    for frame_bytes in (0, MiB, 64 << 10):
        frames = list(stub(lch).Get(pb.GetRequest(keys=keys, inline_data=True, frame_bytes=frame_bytes), timeout=60))
        assert reassemble(frames, keys) == [data(i) for i in range(len(SIZES))]
        assert frames[0].header.found and frames[0].header.meta.nbytes == 0
        assert frames[1].header.data == data(1) and frames[2].header.data == data(2)  # found, all inline


def test_grpcio_missing_keys(lch: grpc.Channel) -> None:
    frames = list(stub(lch).Get(pb.GetRequest(keys=[k(99)]), timeout=30))
    assert len(frames) == 1
    h = frames[0].header
    assert (h.index, h.key, h.found, h.meta.nbytes, h.data) == (0, k(99), False, 0, b"")
    assert raw_get(stub(lch), [k(98), k(99)]) == [None, None]


def test_grpcio_many_keys_in_order(lch: grpc.Channel) -> None:
    keys = [k(4), k(99), k(1), k(0), k(4), k(3), k(98), k(2), k(1)]
    want = [data(4), None, data(1), data(0), data(4), data(3), None, data(2), data(1)]
    assert raw_get(stub(lch), keys) == want
    assert raw_get(stub(lch), keys, frame_bytes=100_000) == want
    # A request of over 1 MiB (more than the listener's receive window, in many DATA frames).
    many = [k(1000 + j) if j % 1000 else k(j // 1000 % len(SIZES)) for j in range(12_000)]
    assert len(pb.GetRequest(keys=many).SerializeToString()) > MiB
    got = raw_get(stub(lch), many)
    assert got == [None if j % 1000 else data(j // 1000 % len(SIZES)) for j in range(12_000)]
    # No keys: a reply of no messages and OK, as on the gRPC port.
    assert list(stub(lch).Get(pb.GetRequest(keys=[]), timeout=30)) == []


def test_grpcio_streams_interleave_on_one_channel(served: Served, lch: grpc.Channel) -> None:
    """Several calls open at once on one connection, read a message from each in turn;
    then threads sharing the channel."""
    which = [[BIG, 3], [3, BIG], [BIG], [2, BIG, 4]]
    # grpcio's stream windows kept at 64 KiB: no call gets ahead of what is read of it,
    # so the daemon sends the four replies interleaved.
    with channel(served.address, ("grpc.http2.bdp_probe", 0)) as ch:
        calls = [stub(ch).Get(pb.GetRequest(keys=[k(i) for i in w], frame_bytes=64 << 10), timeout=60) for w in which]
        got: list[list[pb.GetFrame]] = [[] for _ in calls]
        live = set(range(len(calls)))
        rounds = 0
        while live:
            rounds += 1
            for n in sorted(live):
                try:
                    got[n].append(next(calls[n]))
                except StopIteration:
                    live.discard(n)
    assert rounds > 100  # every call was open for many of its messages
    for w, frames in zip(which, got, strict=True):
        assert reassemble(frames, [k(i) for i in w]) == [data(i) for i in w]

    def work(w: int) -> None:
        for j in range(6):
            i = (w + j) % len(SIZES)
            assert raw_get(stub(lch), [k(i), k(99), k((i + 1) % len(SIZES))]) == [
                data(i), None, data((i + 1) % len(SIZES))
            ]

    run_workers(work, 6)


# == statuses ========================================================================================
def test_other_methods_are_unimplemented_naming_the_main_port(served: Served, lch: grpc.Channel) -> None:
    s = stub(lch)
    calls: dict[str, Callable[[], object]] = {
        "Exists": lambda: s.Exists(pb.ExistsRequest(keys=[k(1)]), timeout=10),
        "Lookup": lambda: s.Lookup(pb.LookupRequest(keys=[k(1)]), timeout=10),
        "Delete": lambda: s.Delete(pb.DeleteRequest(keys=[k(1)]), timeout=10),
    }
    for name, call in calls.items():
        err = rpc_error(call, grpc.StatusCode.UNIMPLEMENTED, f"/kvstore.v1.KVStore/{name}", GET_PATH, PUT_PATH)
        assert f"gRPC port {served.d.port}" in (err.details() or ""), err.details()
    # The health service too.
    rpc_error(lambda: health(served.address, ch=lch), grpc.StatusCode.UNIMPLEMENTED, str(served.d.port))
    with channel(served.d.address) as ch:  # nothing was deleted
        assert raw_get(stub(ch), [k(1)]) == [data(1)]


def test_bad_keys_get_the_daemons_message(served: Served, lch: grpc.Channel) -> None:
    requests = [
        pb.GetRequest(keys=[k(1), "not-a-key"]),
        pb.GetRequest(keys=["t/m/short/s1"]),
        pb.GetRequest(keys=[k(1)] * 70_000),  # over server.max_batch
    ]
    with channel(served.d.address) as main:
        for req in requests:
            on_main = rpc_error(lambda: list(stub(main).Get(req, timeout=30)), grpc.StatusCode.INVALID_ARGUMENT)
            here = rpc_error(lambda: list(stub(lch).Get(req, timeout=30)), grpc.StatusCode.INVALID_ARGUMENT)
            assert here.details() == on_main.details()
    rpc_error(lambda: list(stub(lch).Get(pb.GetRequest(keys=[k(1), "x"]), timeout=30)),
              grpc.StatusCode.INVALID_ARGUMENT, "keys[1]")


def test_tokens_and_tenants_on_the_listener(authd: DaemonProcess) -> None:
    port = discover(authd.address, metadata=bearer(auth_tls.A_READ), probe=auth_tls.A_KEY)
    assert port is not None and port != authd.port
    with channel(f"127.0.0.1:{port}") as ch, channel(authd.address) as main:
        s = stub(ch)
        for md, what in [(None, "authorization"), (bearer("not-a-token-anyone-has"), "unknown token")]:
            err = rpc_error(lambda: raw_get(s, [auth_tls.B_KEY], metadata=md), grpc.StatusCode.UNAUTHENTICATED, what)
            main_err = rpc_error(lambda: raw_get(stub(main), [auth_tls.B_KEY], metadata=md),
                                 grpc.StatusCode.UNAUTHENTICATED)
            assert err.details() == main_err.details()
        for k_ in (auth_tls.B_KEY, auth_tls.B_MISSING):  # the same refusal whether the key exists or not
            rpc_error(lambda: raw_get(s, [k_], metadata=bearer(auth_tls.A_RW)), grpc.StatusCode.PERMISSION_DENIED,
                      "tenant 'a'", "tenant 'b'")
        rpc_error(lambda: raw_get(s, [auth_tls.A_KEY, auth_tls.B_KEY], metadata=bearer(auth_tls.A_READ)),
                  grpc.StatusCode.PERMISSION_DENIED)
        assert raw_get(s, [auth_tls.A_KEY], metadata=bearer(auth_tls.A_READ)) == [auth_tls.A_DATA]
        assert raw_get(s, [auth_tls.B_KEY, auth_tls.B_MISSING], metadata=bearer(auth_tls.B_RW)) == [
            auth_tls.B_DATA, None
        ]
        assert raw_get(s, [auth_tls.A_KEY, auth_tls.B_KEY], metadata=bearer(auth_tls.ADMIN)) == [
            auth_tls.A_DATA, auth_tls.B_DATA
        ]
    # kvstore.Client with a token moves to the listener too.
    with kvstore.Client(authd.address, shm=False, token=auth_tls.B_RW) as c:
        for _ in range(3):
            assert c.get_bytes(auth_tls.B_KEY) == auth_tls.B_DATA
        assert c.http2_get_port == port


def test_grpcio_deadline_on_a_large_get(served: Served) -> None:
    """A call that cannot finish in time (grpcio's stream window kept at 64 KiB, the
    reader asleep past the deadline) ends DEADLINE_EXCEEDED; the channel goes on."""
    with channel(served.address, ("grpc.http2.bdp_probe", 0)) as ch:
        call = stub(ch).Get(pb.GetRequest(keys=[k(BIG)] * 4, frame_bytes=64 << 10), timeout=0.5)
        t0 = time.monotonic()
        assert next(call).header.found
        time.sleep(0.8)
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 10
        assert raw_get(stub(ch), [k(BIG), k(3)]) == [data(BIG), data(3)]


# == a bare HTTP/2 client ===========================================================================
def test_raw_get_and_its_frames(after_check: Served) -> None:
    with H2(after_check.port) as h:
        h.call(1, [k(3), k(99), k(BIG)])
        r = h.finish(1)
        assert dict(r.headers)[":status"] == "200" and dict(r.headers)["content-type"].startswith("application/grpc")
        assert r.status == 0 and r.reset is None
        assert reassemble(r.messages(), [k(3), k(99), k(BIG)]) == [data(3), None, data(BIG)]
        # Header blocks split over CONTINUATION frames; then a PING is answered on the same connection.
        h.call(3, [k(2)], split_headers=True)
        assert reassemble(h.finish(3).messages(), [k(2)]) == [data(2)]
        h.ping(b"12345678")
        assert h.goaway is None


def test_http1_request_gets_505_and_is_closed(after_check: Served) -> None:
    with socket.create_connection(("127.0.0.1", after_check.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 505"), got[:200]
    assert b"gRPC" in got


@pytest.mark.parametrize(
    "garbage",
    [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40), b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", b"hello\n"],
    ids=["tls-hello", "bad-preface", "text"],
)
def test_garbage_is_closed(after_check: Served, garbage: bytes) -> None:
    with socket.create_connection(("127.0.0.1", after_check.port), timeout=10) as s:
        s.sendall(garbage)
        got = b""
        while chunk := s.recv(65536):  # the daemon closes the connection (a timeout here fails)
            got += chunk
    # (Whether the answer starts with the 505 line is test_http1_request_gets_505_and_is_closed's.)
    assert b"HTTP/1.1 505" in got, got[:100]


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (frame(SETTINGS, 0, 0, b"\x00\x04\x00\x00\x10"), FRAME_SIZE_ERROR),  # 5 bytes: not a multiple of 6
        (frame(SETTINGS, ACK, 0, bytes(6)), FRAME_SIZE_ERROR),  # an ACK with a payload
        (frame(PING, 0, 0, b"1234"), FRAME_SIZE_ERROR),
        (frame(WINDOW_UPDATE, 0, 0, b"\x00\x01"), FRAME_SIZE_ERROR),
        (frame(DATA, 0, 1, bytes(RECV_FRAME + 1)), FRAME_SIZE_ERROR),  # over the SETTINGS_MAX_FRAME_SIZE announced
        (frame(HEADERS, END_HEADERS, 2, b"\x83"), PROTOCOL_ERROR),  # an even (server) stream
        (frame(SETTINGS, 0, 1, b""), PROTOCOL_ERROR),  # SETTINGS on a stream
        (frame(CONTINUATION, END_HEADERS, 1, b"\x83"), PROTOCOL_ERROR),  # without its HEADERS
        (frame(DATA, END_STREAM, 5, b"x"), PROTOCOL_ERROR),  # on an idle stream
        (frame(WINDOW_UPDATE, 0, 0, bytes(4)), PROTOCOL_ERROR),  # increment 0
    ],
    ids=["settings-length", "settings-ack-payload", "ping-length", "window-update-length", "frame-too-large",
         "even-stream", "settings-on-stream", "lone-continuation", "data-idle-stream", "window-update-zero"],
)
def test_bad_frames_get_goaway_with_the_error_code(after_check: Served, bad: bytes, code: int) -> None:
    with H2(after_check.port) as h:
        h.call(1, [k(2)])
        assert reassemble(h.finish(1).messages(), [k(2)]) == [data(2)]
        h.send(bad)
        h.until_closed()
        assert h.goaway is not None, h.events
        assert h.goaway[:2] == (1, code), h.goaway


def test_rst_stream_cancels_a_get_in_flight_and_the_connection_goes_on(after_check: Served) -> None:
    with H2(after_check.port, window=DEFAULT_WINDOW) as h:
        h.call(1, [k(BIG), k(BIG)])
        h.pump(lambda: len(h.reply(1).body) > 0)  # in flight: the reply is coming (and stops at the 64 KiB window)
        h.send(frame(RST_STREAM, 0, 1, struct.pack(">I", CANCEL)))
        # Windows wide open; what comes after the SETTINGS ACK is for stream 3 only.
        h.send(settings(MAX_WINDOW) + conn_window(MAX_WINDOW - DEFAULT_WINDOW))
        mark = h.ping()
        h.call(3, [k(BIG), k(99), k(3)])
        r = h.finish(3)
        assert r.status == 0
        assert reassemble(r.messages(), [k(BIG), k(99), k(3)]) == [data(BIG), None, data(3)]
        assert all(s != 1 for _, _, s in h.events[mark:]), ("the reset stream went on", h.events[mark - 3 :])
        assert not h.reply(1).ended
        assert h.goaway is None


def test_compressed_request_is_unimplemented(after_check: Served) -> None:
    with H2(after_check.port) as h:
        raw = gzip.compress(get_request([k(1)]))
        h.send(request(1, raw, flag=1, extra=[("grpc-encoding", "gzip")]))
        r = h.finish(1)
        assert r.status == grpc.StatusCode.UNIMPLEMENTED.value[0], r.trailers
        assert "compressed" in r.message
        assert r.body == b""
        h.call(3, [k(1)])  # the connection goes on
        assert reassemble(h.finish(3).messages(), [k(1)]) == [data(1)]


def test_request_errors_are_statuses(after_check: Served) -> None:
    """Calls the listener cannot take end with a status; the connection goes on."""
    unimplemented, invalid = grpc.StatusCode.UNIMPLEMENTED.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0]
    msg = get_request([k(1)])
    cases = [
        (request(1, msg, extra=[("grpc-timeout", "soon")]), invalid, "grpc-timeout"),
        (request(3, msg[:-3]), invalid, ""),  # a cut GetRequest
        (request(5, msg + bytes(5)), invalid, ""),  # two messages
        (request(7, msg, path="/kvstore.v1.KVStore/Exists"), unimplemented, "/kvstore.v1.KVStore/Exists"),
        (request(9, msg).replace(b"application/grpc", b"text/plain+json!"), unimplemented, "content-type"),
    ]
    with H2(after_check.port) as h:
        for raw, code, what in cases:
            stream = int.from_bytes(raw[5:9], "big")
            h.send(raw)
            r = h.finish(stream)
            assert r.status == code, (stream, r.trailers)
            assert what in r.message
        h.call(11, [k(1)])
        assert reassemble(h.finish(11).messages(), [k(1)]) == [data(1)]
        assert h.goaway is None


def test_raw_deadline_while_the_window_is_shut(after_check: Served) -> None:
    """The daemon honours grpc-timeout: a call that cannot send (the client gives no
    window) ends with DEADLINE_EXCEEDED trailers at about its deadline."""
    with H2(after_check.port, window=0) as h:
        t0 = time.monotonic()
        h.call(1, [k(BIG)], extra=[("grpc-timeout", grpc_timeout(0.3))])
        r = h.finish(1, timeout=20)
        elapsed = time.monotonic() - t0
        assert r.status == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], r.trailers
        assert 0.25 < elapsed < 10
        assert r.body == b""
        # Mid-reply: the first 64 KiB went, then the window shut; the call ends (trailers
        # or a reset: its last message is cut) and the connection goes on.
        h.send(settings(DEFAULT_WINDOW))
        t0 = time.monotonic()
        h.call(3, [k(BIG)], extra=[("grpc-timeout", "300m")])
        r = h.finish(3, timeout=20)
        assert 0.25 < time.monotonic() - t0 < 10
        assert r.reset is not None or r.status == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], r.trailers
        assert len(r.body) == DEFAULT_WINDOW
        h.send(settings(MAX_WINDOW) + conn_window(MAX_WINDOW - DEFAULT_WINDOW))
        h.call(5, [k(3)])
        assert reassemble(h.finish(5).messages(), [k(3)]) == [data(3)]
        assert h.goaway is None


def test_flow_control_windows_are_respected(after_check: Served) -> None:
    """Two calls share the connection's 64 KiB window: together they get exactly that
    much until the window grows; then both finish."""
    with H2(after_check.port, preface=False) as h:
        h.send(PREFACE + settings(MAX_WINDOW))  # stream windows wide open, the connection's at its default
        h.call(1, [k(BIG)])
        h.call(3, [k(3), k(BIG)])
        h.pump(lambda: len(h.reply(1).body) + len(h.reply(3).body) >= DEFAULT_WINDOW)
        h.ping()
        assert len(h.reply(1).body) + len(h.reply(3).body) == DEFAULT_WINDOW
        assert not h.reply(1).ended and not h.reply(3).ended
        h.send(conn_window(MAX_WINDOW - DEFAULT_WINDOW))
        assert reassemble(h.finish(1).messages(), [k(BIG)]) == [data(BIG)]
        assert reassemble(h.finish(3).messages(), [k(3), k(BIG)]) == [data(3), data(BIG)]
    # The stream's own window: 100 bytes at a time, each WINDOW_UPDATE lets exactly that much more out.
    with H2(after_check.port, window=100) as h:
        h.send(conn_window(MAX_WINDOW - DEFAULT_WINDOW))
        h.call(1, [k(2)])
        for n in range(1, 4):
            h.pump(lambda: len(h.reply(1).body) >= 100 * n)
            h.ping(b"ping%04d" % n)
            assert len(h.reply(1).body) == 100 * n
            h.send(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 100)))
        h.send(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", MAX_WINDOW - 100)))
        assert reassemble(h.finish(1).messages(), [k(2)]) == [data(2)]


def test_a_request_in_pieces(after_check: Served) -> None:
    """Padding and priority in HEADERS, the message over several (padded) DATA frames, an
    empty DATA frame or request trailers ending the stream."""
    msg = get_request([k(1), k(3)])
    body = struct.pack(">BI", 0, len(msg)) + msg
    block = header_block()
    with H2(after_check.port) as h:
        for stream, end in ((1, "empty-data"), (3, "trailers")):
            pad = 7
            headers = bytes((pad,)) + struct.pack(">IB", 0, 15) + block + bytes(pad)
            h.send(frame(HEADERS, END_HEADERS | PADDED | PRIORITY_FLAG, stream, headers))
            h.send(frame(DATA, 0, stream, body[:3]))
            h.send(frame(DATA, PADDED, stream, bytes((2,)) + body[3:20] + bytes(2)))
            h.send(frame(DATA, 0, stream, body[20:]))
            if end == "empty-data":
                h.send(frame(DATA, END_STREAM, stream, b""))
            else:
                h.send(frame(HEADERS, END_HEADERS | END_STREAM, stream, literal("x-trailer", "1")))
            r = h.finish(stream)
            assert r.status == 0, (end, r.trailers)
            assert reassemble(r.messages(), [k(1), k(3)]) == [data(1), data(3)]
        assert h.goaway is None


def test_the_clients_goaway_lets_its_call_finish(after_check: Served) -> None:
    """After the client's GOAWAY the call in flight finishes and the daemon closes the
    connection, also when the client sends a frame (a PING; a WINDOW_UPDATE or SETTINGS
    ACK would do) once the daemon has written the reply: the reply's bytes still
    queued for the client must not be thrown away (a socket closed with unread input
    is reset)."""
    with H2(after_check.port, rcvbuf=64 << 10) as h:  # the 1 MiB reply waits in the daemon's send buffer
        h.call(1, [k(3), k(2)])
        h.send(frame(GOAWAY, 0, 0, struct.pack(">II", 0, NO_ERROR)))
        time.sleep(0.5)  # the daemon has written the whole reply (its send buffer holds it) by now
        h.send(frame(PING, 0, 0, b"still-on"))
        r = h.finish(1)
        assert r.ended, f"the reply was cut after {len(r.body)} bytes"
        assert r.status == 0
        assert reassemble(r.messages(), [k(3), k(2)]) == [data(3), data(2)]
        h.until_closed()  # then the daemon closes the connection


def test_streams_per_client_are_limited(after_check: Served) -> None:
    """server.limits.max_streams_per_client (64) holds on the listener: with 64 calls
    open on a connection, the 65th is refused at once."""
    with H2(after_check.port, window=0) as h:  # no window: every call stays open
        for n in range(64):
            h.call(1 + 2 * n, [k(2)])
        h.ping()
        h.call(129, [k(2)])
        r = h.finish(129)
        assert r.status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], r.trailers
        assert "max_streams_per_client" in r.message
        assert not any(h.reply(1 + 2 * n).ended for n in range(64))
        h.send(frame(RST_STREAM, 0, 1, struct.pack(">I", CANCEL)))  # one ends: a new call may start
        h.ping()
        h.send(settings(MAX_WINDOW) + conn_window(MAX_WINDOW - DEFAULT_WINDOW))
        h.call(131, [k(2)])
        assert reassemble(h.finish(131).messages(), [k(2)]) == [data(2)]


def test_a_request_over_16_mib_is_refused(after_check: Served, lch: grpc.Channel) -> None:
    keys = [k(1)] * 200_000
    assert len(pb.GetRequest(keys=keys).SerializeToString()) > 16 * MiB
    rpc_error(lambda: list(stub(lch).Get(pb.GetRequest(keys=keys), timeout=60)),
              grpc.StatusCode.RESOURCE_EXHAUSTED, "16777216")
    assert raw_get(stub(lch), [k(3)]) == [data(3)]


def test_unfinished_requests_on_one_connection_are_bounded(after_check: Served) -> None:
    """Streams whose Get requests never end may hold at most MAX_BUFFERED bytes on one
    connection together (each alone is under MAX_REQUEST): past it, GOAWAY
    ENHANCE_YOUR_CALM and the connection closes; the daemon serves on."""
    piece = bytes(RECV_FRAME)
    with H2(after_check.port) as h:
        sent = 0
        stream = 1
        while sent <= MAX_BUFFERED:
            h.send(frame(HEADERS, END_HEADERS, stream, header_block()))
            for _ in range(MAX_REQUEST // RECV_FRAME - 1):  # under MAX_REQUEST each: no stream is refused alone
                h.send(frame(DATA, 0, stream, piece))
                sent += len(piece)
            stream += 2
        h.until_closed()
        assert h.goaway is not None and h.goaway[1] == ENHANCE_YOUR_CALM, h.goaway
        assert sent > MAX_BUFFERED
    assert_still_serves(after_check)


def _hold(h: H2, streams: Sequence[int], nbytes: int) -> None:
    """Open ``streams`` on ``h`` and send each ``nbytes`` of a request it never ends."""
    for stream in streams:
        h.send(frame(HEADERS, END_HEADERS, stream, header_block()))
        left = nbytes
        while left:
            n = min(left, RECV_FRAME)
            h.send(frame(DATA, 0, stream, bytes(n)))
            left -= n
    h.ping(os.urandom(8))  # read by the daemon (a PING of its own: pongs accumulate); still open


def _let_go(held: Sequence[H2]) -> None:
    """Half-close each connection and wait for the daemon to close it: it then holds none of
    their unfinished requests (the next test starts with none gathered)."""
    for h in held:
        with contextlib.suppress(OSError):
            h.sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            h.until_closed()
        h.close()


def test_a_client_that_half_closes_inside_a_request_is_let_go(after_check: Served) -> None:
    """A Get's request cut off by the client's end of stream can never end: the daemon drops
    it and closes the connection, instead of holding its bytes (and the connection) forever."""
    h = H2(after_check.port)
    try:
        _hold(h, (1, 3), 4 * RECV_FRAME)
        h.sock.shutdown(socket.SHUT_WR)
        h.until_closed()
        assert h.goaway is None
    finally:
        h.close()
    assert_still_serves(after_check)


def test_unfinished_requests_on_all_connections_are_bounded(after_check: Served) -> None:
    """Connections each under MAX_BUFFERED of unfinished Get requests may hold at most
    MAX_GATHERED together.  The request that crosses it is one of a well-behaved client
    (a Get of 401 keys, 36 KiB): the connection holding the most gets GOAWAY
    ENHANCE_YOUR_CALM and is closed, not that client's, whose Get is served; the
    others stay open, and their requests, once ended, are served."""
    hog_bytes = MAX_REQUEST - 2 * RECV_FRAME  # two streams of it: the most on one connection
    filler_bytes = hog_bytes - RECV_FRAME
    held: list[H2] = []
    try:
        hog = H2(after_check.port)
        held.append(hog)
        _hold(hog, (1, 3), hog_bytes)
        left = MAX_GATHERED - 2 * hog_bytes - (8 << 10)  # 8 KiB under the bound in all
        while left:
            h = H2(after_check.port)
            held.append(h)
            for stream in (1, 3):
                n = min(left, filler_bytes)
                if n:
                    _hold(h, (stream,), n)
                    left -= n
        polite = H2(after_check.port)
        keys = [k(3)] + [key(1000 + i, model="many") for i in range(400)]
        assert 32 << 10 < len(get_request(keys)) < 64 << 10
        polite.call(1, keys)
        assert reassemble(polite.finish(1).messages(), keys) == [data(3)] + [None] * 400
        hog.until_closed()
        assert hog.goaway is not None and hog.goaway[1] == ENHANCE_YOUR_CALM, hog.goaway
        assert b"all the connections" in hog.goaway[2] and b"holding the most" in hog.goaway[2]
        first = held[1]
        first.send(frame(RST_STREAM, 0, 1, struct.pack(">I", CANCEL)))  # gives back its bytes
        first.call(5, [k(3)])
        assert reassemble(first.finish(5).messages(), [k(3)]) == [data(3)]
        assert first.goaway is None
    finally:
        _let_go(held)
    assert_still_serves(after_check)


def test_the_connection_crossing_the_bound_is_closed_when_it_holds_the_most(after_check: Served) -> None:
    """Others holding less than the crossing connection are left alone."""
    held: list[H2] = []
    try:
        small = H2(after_check.port)
        held.append(small)
        _hold(small, (1,), 2 * RECV_FRAME)
        for _ in range(4):  # 4 x 24 MiB: the last connection crosses the bound holding 30 MiB
            h = H2(after_check.port)
            held.append(h)
            _hold(h, (1, 3), 12 * RECV_FRAME)
        last = H2(after_check.port)
        held.append(last)
        with contextlib.suppress(OSError):  # closed while it still sends
            for stream in (1, 3, 5):
                last.send(frame(HEADERS, END_HEADERS, stream, header_block()))
                for _ in range(21):
                    last.send(frame(DATA, 0, stream, bytes(RECV_FRAME // 2)))
        last.until_closed()
        assert last.goaway is not None and last.goaway[1] == ENHANCE_YOUR_CALM, last.goaway
        for h in held[:-1]:
            assert h.goaway is None
        small.send(frame(RST_STREAM, 0, 1, struct.pack(">I", CANCEL)))
        small.call(3, [k(3)])
        assert reassemble(small.finish(3).messages(), [k(3)]) == [data(3)]
    finally:
        _let_go(held)
    assert_still_serves(after_check)


# == TLS =============================================================================================
def test_tls_gets_move_to_the_listener(tmp_path: Path, pki: auth_tls.Pki) -> None:
    with auth_tls._tls_daemon(tmp_path / "d", pki) as d:  # noqa: SLF001 - the shared TLS daemon
        creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        port = discover(d.address, creds=creds)
        assert port is not None and port != d.port
        with kvstore.Client(d.address, shm=False, tls=ClientTLS(ca=pki.ca)) as c:
            for i in range(len(SIZES)):
                c.put(k(i), data(i))
            for _ in range(2):
                for i in range(len(SIZES)):
                    assert c.get_bytes(k(i)) == data(i)
            assert c.http2_gets == 2 * len(SIZES)
            assert c.http2_get_port == port
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as ch:  # grpcio over TLS (ALPN h2)
            assert raw_get(stub(ch), [k(BIG), k(99), k(2)]) == [data(BIG), None, data(2)]
        # A plaintext client is not served there.
        with channel(f"127.0.0.1:{port}") as ch:
            rpc_error(lambda: raw_get(stub(ch), [k(2)]), UNAVAILABLE)


def test_mutual_tls_on_the_listener(tmp_path: Path, pki: auth_tls.Pki) -> None:
    with auth_tls._tls_daemon(tmp_path / "d", pki, mutual=True) as d:  # noqa: SLF001
        good = grpc.ssl_channel_credentials(
            root_certificates=pki.ca.read_bytes(), private_key=pki.client_key.read_bytes(),
            certificate_chain=pki.client_cert.read_bytes(),
        )
        port = discover(d.address, creds=good)
        assert port is not None and port != d.port
        tls = ClientTLS(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
        with kvstore.Client(d.address, shm=False, tls=tls) as c:
            c.put(k(BIG), data(BIG))
            c.put(k(2), data(2))
            for _ in range(3):
                assert c.get_bytes(k(BIG)) == data(BIG)
            assert c.http2_get_port == port
        listener = f"127.0.0.1:{port}"
        with grpc.secure_channel(listener, good) as ch:
            assert raw_get(stub(ch), [k(BIG), k(2)]) == [data(BIG), data(2)]
        no_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        rogue = grpc.ssl_channel_credentials(
            root_certificates=pki.ca.read_bytes(), private_key=pki.rogue_key.read_bytes(),
            certificate_chain=pki.rogue_cert.read_bytes(),
        )
        for creds in (no_cert, rogue):
            with grpc.secure_channel(listener, creds) as ch:
                with pytest.raises(grpc.RpcError) as info:
                    raw_get(stub(ch), [k(2)])
                assert info.value.code() == UNAVAILABLE, info.value


# == discovery, a fixed port, the listener turned off, fall-back ====================================
def test_fixed_port_then_a_daemon_without_the_listener(tmp_path: Path) -> None:
    fixed = free_port()
    first = DaemonProcess(tmp_path / "a", cpu_only("64MiB", http2_get_port=fixed)).start()
    main = first.port
    c = kvstore.Client(first.address, shm=False, retries=3, timeout_s=20)
    try:
        assert discover(first.address) == fixed
        c.put(k(BIG), data(BIG))
        for _ in range(3):
            assert c.get_bytes(k(BIG)) == data(BIG)
        assert c.http2_get_port == fixed
        assert c.http2_gets == 3
    except BaseException:
        c.close()
        raise
    finally:
        rc = first.stop()
    assert rc == 0
    # The same gRPC port, no listener: the port the client knew is shut; its gets go to the gRPC port.
    with c, DaemonProcess(tmp_path / "b", cpu_only("64MiB", port=main, http2_get=False)) as second:
        assert second.port == main
        assert discover(second.address) is None
        c.put(k(3), data(3))
        for _ in range(4):
            assert c.get_bytes(k(3)) == data(3)
        assert c.get(k(BIG)) is None
        assert c.http2_get_port == main
        assert fixed in c._h2._unreachable  # noqa: SLF001 - not asked for again
        assert c.http2_gets >= 3 + 3


def test_a_listener_port_that_cannot_be_reached_costs_one_short_connect(tmp_path: Path) -> None:
    """A listener port that drops connection attempts (filtered; here a socket whose accept
    queue is full) costs the client one connect of at most LISTENER_CONNECT_S (not the 5 s
    of the gRPC port's), then its calls stay on the gRPC port."""
    fixed = free_port()
    first = DaemonProcess(tmp_path / "a", cpu_only("64MiB", http2_get_port=fixed)).start()
    main = first.port
    c = kvstore.Client(first.address, shm=False, retries=3, timeout_s=20)
    try:
        c.put(k(3), data(3))
        assert c.get_bytes(k(3)) == data(3) and c.http2_get_port == fixed
    except BaseException:
        c.close()
        raise
    finally:
        first.stop()
    jam = socket.socket()
    fill = [socket.socket() for _ in range(4)]
    try:
        jam.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the old listener's connections linger
        jam.bind(("127.0.0.1", fixed))
        jam.listen(0)
        for f in fill:  # the accept queue full: the next connection attempts are dropped
            f.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                f.connect(("127.0.0.1", fixed))
        with c, DaemonProcess(tmp_path / "b", cpu_only("64MiB", port=main, http2_get=False)) as second:
            assert second.port == main
            start = time.monotonic()
            c.put(k(4), data(4))
            assert c.get_bytes(k(4)) == data(4)
            assert time.monotonic() - start < H2GetChannel.LISTENER_CONNECT_S + 2.5
            assert fixed in c._h2._unreachable  # noqa: SLF001 - not tried again
            assert c.http2_get_port == main
    finally:
        for f in fill:
            f.close()
        jam.close()


def test_listener_turned_off(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path / "d", cpu_only("64MiB", http2_get=False)) as d:
        assert discover(d.address) is None
        with kvstore.Client(d.address, shm=False) as c:
            c.put(k(BIG), data(BIG))
            c.put(k(1), data(1))
            for _ in range(3):
                assert c.get_bytes(k(BIG)) == data(BIG)
                assert c.get_bytes(k(1)) == data(1)
            assert c.http2_get_port == d.port
            assert c.http2_gets == 6


def test_http2_get_port_equal_to_port_is_refused(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(ConfigError, match=f"server.http2_get_port: {port} is server.port too"):
        build(cpu_only(port=port, http2_get_port=port))
    build(cpu_only(port=port, http2_get_port=port, http2_get=False))  # no listener: no conflict
    assert_refused(DaemonProcess(tmp_path / "d", cpu_only("16MiB", port=port, http2_get_port=port)))
    # A port another socket holds: the daemon does not start, and says which setting.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert_refused(DaemonProcess(tmp_path / "taken", cpu_only("16MiB", http2_get_port=taken.getsockname()[1])))


def assert_refused(d: DaemonProcess) -> None:
    """``d`` does not start, and its message names server.http2_get_port."""
    try:
        with pytest.raises(RuntimeError, match="exited with") as info:
            d.start()
    finally:
        d.stop()
    assert "server.http2_get_port" in str(info.value)


# == graceful shutdown ===============================================================================
def test_sigterm_lets_gets_in_flight_finish(tmp_path: Path) -> None:
    """Calls in flight when SIGTERM comes (one from the bare client, held by its shut
    window, one from grpcio, its reader asleep) finish byte-exact; new streams are
    refused; the daemon exits 0."""
    with DaemonProcess(tmp_path / "d", cpu_only("64MiB", grace_s=30)) as d:
        with channel(d.address) as ch:
            raw_put(stub(ch), [(k(BIG), data(BIG)), (k(3), data(3))])
        port = discover(d.address)
        assert port is not None
        keys = [k(BIG), k(3), k(99), k(BIG)]
        want = [data(BIG), data(3), None, data(BIG)]
        h = H2(port, window=DEFAULT_WINDOW)
        h.call(1, keys)
        h.pump(lambda: len(h.reply(1).body) > 0)

        started, wake = threading.Event(), threading.Event()
        result: list[object] = []

        def grpc_reader() -> None:
            try:
                with channel(f"127.0.0.1:{port}", ("grpc.http2.bdp_probe", 0)) as ch:
                    call = stub(ch).Get(pb.GetRequest(keys=keys, frame_bytes=64 << 10), timeout=60)
                    frames = [next(call)]
                    started.set()
                    wake.wait(30)
                    frames += list(call)
                    result.append(reassemble(frames, keys))
            except BaseException as exc:  # noqa: BLE001 - checked by the test
                result.append(exc)
            finally:
                started.set()

        t = threading.Thread(target=grpc_reader)
        t.start()
        try:
            assert started.wait(30)
            d.send_signal(signal.SIGTERM)
            h.pump(lambda: h.goaway is not None)
            assert h.goaway == (1, NO_ERROR, b"")
            assert d.proc is not None and d.proc.poll() is None  # waiting for the calls
            h.call(3, [k(3)])  # a new stream after GOAWAY: refused
            h.pump(lambda: h.reply(3).reset is not None)
            assert h.reply(3).reset == REFUSED_STREAM
            wake.set()
            h.send(settings(MAX_WINDOW) + conn_window(MAX_WINDOW - DEFAULT_WINDOW))
            r = h.finish(1)
            assert r.status == 0, r.trailers
            assert reassemble(r.messages(), keys) == want
            h.until_closed()
        finally:
            wake.set()
            t.join(60)
            h.close()
        assert result == [want], result
        assert d.wait(30) == 0, d.log()
        assert "Traceback" not in d.log()


def test_sigterm_with_a_slow_reader(tmp_path: Path) -> None:
    """A reader slower than the daemon's writes (a client across a slow network): its
    call, in flight at SIGTERM, comes back whole, also when the daemon exits before
    the client has read it all (what the daemon had not handed to the kernel by then
    would be lost).  The reader allows frames of 16 MiB, so each 4 MiB message goes to
    the connection in one write."""
    with DaemonProcess(tmp_path / "d", cpu_only("64MiB", grace_s=30)) as d:
        big = blob(20, 8 * MiB)
        with channel(d.address) as ch:
            raw_put(stub(ch), [(k(20), big)])
        port = discover(d.address)
        assert port is not None and d.proc is not None
        keys = [k(20), k(20)]
        with H2(port, window=DEFAULT_WINDOW, rcvbuf=64 << 10) as h:
            h.call(1, keys, fields={"frame_bytes": 4 * MiB})
            h.pump(lambda: len(h.reply(1).body) > 0)
            d.send_signal(signal.SIGTERM)
            h.pump(lambda: h.goaway is not None)
            h.send(settings(MAX_WINDOW, max_frame=(1 << 24) - 1) + conn_window(MAX_WINDOW - DEFAULT_WINDOW))
            r = h.reply(1)
            # 64 KiB every 10 ms (6.4 MiB/s) until the daemon has exited, then at full speed.
            read, exited_at, t0 = 0, None, time.monotonic()
            while not r.ended and time.monotonic() - t0 < 60:
                if len(h.buf) >= 9 and len(h.buf) >= 9 + parse_frame_header(h.buf[:9])[0]:
                    h.read_frame()
                    continue
                if exited_at is None and d.proc.poll() is not None:
                    exited_at = read
                if exited_at is None:
                    time.sleep(0.01)
                try:
                    got = h.sock.recv(64 << 10)
                except ConnectionResetError:
                    got = b""
                if not got:
                    break
                read += len(got)
                h.buf += got
            assert r.ended, (
                f"the reply was cut after {len(r.body)} bytes (of {2 * len(big)} + headers); the daemon had exited "
                f"when the client had read {exited_at} bytes of the connection"
            )
            assert r.status == 0
            assert reassemble(r.messages(), keys) == [big, big]
        assert d.wait(30) == 0, d.log()


def test_sigterm_then_a_frame_from_the_reader(tmp_path: Path) -> None:
    """The call in flight at SIGTERM has been written whole (the daemon's send buffer
    holds the rest of it) when the client sends a frame (a PING): the reply must
    still arrive whole."""
    with DaemonProcess(tmp_path / "d", cpu_only("64MiB", grace_s=30)) as d:
        with channel(d.address) as ch:
            raw_put(stub(ch), [(k(3), data(3))])
        port = discover(d.address)
        assert port is not None
        with H2(port, window=DEFAULT_WINDOW, rcvbuf=64 << 10) as h:
            h.call(1, [k(3)])
            h.pump(lambda: len(h.reply(1).body) > 0)
            d.send_signal(signal.SIGTERM)
            h.pump(lambda: h.goaway is not None)
            h.send(settings(MAX_WINDOW) + conn_window(MAX_WINDOW - DEFAULT_WINDOW))
            time.sleep(0.5)  # the daemon has written the rest of the reply by now
            h.send(frame(PING, 0, 0, b"still-on"))
            r = h.finish(1)
            assert r.ended, f"the reply was cut after {len(r.body)} bytes"
            assert r.status == 0
            assert reassemble(r.messages(), [k(3)]) == [data(3)]
        assert d.wait(30) == 0, d.log()


# == metrics =========================================================================================
def test_gets_on_the_listener_are_counted(served: Served, lch: grpc.Channel) -> None:
    def counts() -> tuple[float, float, float]:
        """KVStore/Get's calls, INVALID_ARGUMENT and CANCELLED ends, from /metrics."""
        m = scrape(served.metrics_port)

        def get(name: str, **labels: str) -> float:
            return m.get((name, tuple(sorted({"method": "KVStore/Get", **labels}.items()))), 0.0)

        return (get("kvstore_rpc_duration_seconds_count"), get("kvstore_rpc_errors_total", code="INVALID_ARGUMENT"),
                get("kvstore_rpc_errors_total", code="CANCELLED"))

    before = counts()
    assert raw_get(stub(lch), [k(1)]) == [data(1)]
    assert raw_get(stub(lch), [k(99)]) == [None]
    rpc_error(lambda: list(stub(lch).Get(pb.GetRequest(keys=["bad"]), timeout=10)), grpc.StatusCode.INVALID_ARGUMENT)
    with H2(served.port, window=DEFAULT_WINDOW) as h:  # one cancelled by RST_STREAM
        h.call(1, [k(BIG)])
        h.pump(lambda: len(h.reply(1).body) > 0)
        h.send(frame(RST_STREAM, 0, 1, struct.pack(">I", CANCEL)))
        h.ping()
    deadline = time.monotonic() + 10
    while (after := counts())[0] < before[0] + 4 and time.monotonic() < deadline:
        time.sleep(0.02)  # the cancelled call is counted when its task ends: polling the endpoint
    assert after[0] - before[0] == 4, (before, after)
    assert after[1] - before[1] == 1
    assert after[2] - before[2] == 1
    assert metric(scrape(served.metrics_port), "kvstore_rpc_duration_seconds_count", method="KVStore/Get") == after[0]


# == gets answered at once (chunks in the top tier's memory) and the rest ======================
def test_chunks_below_the_top_tier_and_lru_order(tmp_path: Path) -> None:
    """The listener answers gets of chunks in the CPU tier at once (no task) and the
    others (here on disk) the ordinary way; both count as accesses for LRU: after
    A, B are stored and A is read, storing C evicts B, not A (fails if the
    at-once path forgets the access)."""
    config = cpu_and_disk(tmp_path / "disk", cpu="2560KiB", disk="64MiB")  # room for two 1 MiB chunks
    with DaemonProcess(tmp_path / "d", config) as d, kvstore.Client(d.address, shm=False) as c:
        a, b, cc = (blob(i, MiB) for i in (1, 2, 3))
        assert c.get_bytes(k(100)) is None  # the first get (on the gRPC port) learns the listener's port
        c.put(k(101), torch.frombuffer(bytearray(a), dtype=torch.uint8), durable=True)
        c.put(k(102), torch.frombuffer(bytearray(b), dtype=torch.uint8), durable=True)
        assert c.get_bytes(k(101)) == a  # on the listener, at once
        assert c.http2_get_port != d.port
        c.put(k(103), torch.frombuffer(bytearray(cc), dtype=torch.uint8), durable=True)
        with channel(d.address) as ch:
            placed = apb_grpc.AdminStub(ch).ListChunks(apb.ListChunksRequest(page_size=100), timeout=30)
        tiers = {info.key: list(info.tiers) for info in placed.chunks}
        assert tiers == {k(101): ["cpu", "disk"], k(102): ["disk"], k(103): ["cpu", "disk"]}
        # From disk over the listener (the ordinary path), byte-exact; then back in memory.
        assert c.get_bytes(k(102)) == b
        assert c.get_bytes(k(102)) == b
        assert c.http2_gets == 4
