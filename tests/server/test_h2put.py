"""``KVStore/Put`` on the daemon's own HTTP/2 listener (kvstore/server/h2get.py,
h2conn.py, h2put.py) against real daemon processes on loopback, and the request
parser (:class:`~kvstore.server.h2put.PutSink`) on its own.

Clients of the listener here: grpcio (``stub(lch).Put``) and the bare HTTP/2
client of tests/server/test_h2get.py (:class:`H2`), which sends the request's
DATA frames cut where the test says.  Covered: byte-exact puts of several
sizes (past the 16 MiB connection window and the 8 MiB stream windows), read back on both ports;
requests in odd pieces (a message prefix or a data message across DATA frames,
padding, one frame for all, byte-sized frames, trailers, bytes dribbled through
the socket); puts and gets interleaved on one connection; receive windows given
back (a Put's stream window as its handler takes the data, so a Put waiting for a
stream slot holds back only its own stream; past it, FLOW_CONTROL_ERROR; a memory
bound narrows it); streams cut off (RST_STREAM, the socket closed or half-closed) store
nothing of their unfinished chunk and give their buffer back; SIGTERM during a
put; statuses (bad checksum, a chunk over max_chunk_bytes, a bad key: answered
while the client still sends, then RST_STREAM(NO_ERROR); compressed,
oversized, undecodable and cut messages; deadlines; tokens and tenants);
metrics.
"""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import grpc
import pytest

import kvstore

from kvstore.errors import InvalidArgument, KVStoreError
from kvstore.http2 import (
    ACK, CANCEL, DATA, DEFAULT_WINDOW, END_HEADERS, END_STREAM, FLOW_CONTROL_ERROR, GOAWAY, HEADERS, MAX_WINDOW,
    NO_ERROR, PADDED, PUT_PATH, REFUSED_STREAM, RST_STREAM, SETTINGS, SETTINGS_INITIAL_WINDOW_SIZE, WINDOW_UPDATE,
    frame, frame_header, grpc_timeout, literal,
)
from kvstore.server.h2conn import RECV_FRAME, RECV_WINDOW
from kvstore.server.h2data import STREAM_RECV_WINDOW
from kvstore.server.h2put import MAX_OTHER_MESSAGE, PutSink, Unimplemented
from kvstore.server.limits import stream_allowance
from kvstore.v1 import kvstore_pb2 as pb
from tests.server import MiB, bearer, blob, channel, header, key, put_frames, raw_get, raw_put, rpc_error, stub
from tests.server import test_auth_tls as auth_tls
from tests.server import test_h2get as h2get
from tests.server.test_h2get import H2, Reply, Served, discover, header_block, request
from tests.support.daemon import DaemonProcess, cpu_only
from tests.support.threads import run_workers
from tests.support.metrics import free_port, scrape

# Fixtures of tests/server/test_h2get.py: the daemon with its listener (module scope), a grpcio
# channel to the listener, the check that the daemon still serves after a test; a daemon with tokens.
served = h2get.served
lch = h2get.lch
after_check = h2get.after_check
authd = h2get.authd

MODEL = "h2put"
Code = grpc.StatusCode


def pk(i: int, tenant: str = "t") -> str:
    """The ``i``-th key of this module's puts."""
    return key(i, tenant=tenant, model=MODEL)


def num(code: grpc.StatusCode) -> int:
    """A status code's number, as grpc-status carries it."""
    return int(code.value[0])


# -- building requests ------------------------------------------------------------------------------
def pmsg(m: pb.PutFrame | bytes, flag: int = 0) -> bytes:
    """A gRPC message: the 5-byte prefix (``flag``: compressed) and ``m``."""
    raw = m if isinstance(m, bytes) else m.SerializeToString()
    return struct.pack(">BI", flag, len(raw)) + raw


def put_body(items: Iterable[tuple[str, bytes]], frame_bytes: int = MiB) -> bytes:
    """A well-formed Put request's DATA payload: each chunk's header, then its data messages."""
    return b"".join(pmsg(f) for f in put_frames(items, frame_bytes))


def data_msg(payload: bytes) -> bytes:
    return pmsg(pb.PutFrame(data=payload))


def put_headers(stream: int, extra: Sequence[tuple[str, str]] = (), *, end: bool = False) -> bytes:
    """The HEADERS frame opening a Put on ``stream``."""
    return frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), stream, header_block(PUT_PATH, extra))


def data_frames(stream: int, payload: bytes, *, end: bool = False, size: int = 256 << 10) -> bytes:
    """``payload`` in DATA frames of at most ``size`` bytes, the last ending the stream if ``end``."""
    starts = range(0, len(payload), size) if payload else [0]
    last = starts[-1]
    return b"".join(
        frame(DATA, END_STREAM if end and at == last else 0, stream, payload[at : at + size]) for at in starts
    )


def padded(stream: int, payload: bytes, pad: int, *, end: bool = False) -> bytes:
    """One PADDED DATA frame: pad length, ``payload``, ``pad`` zero bytes."""
    return frame(DATA, PADDED | (END_STREAM if end else 0), stream, bytes((pad,)) + payload + bytes(pad))


def open_put(h: H2, stream: int, extra: Sequence[tuple[str, str]] = ()) -> Reply:
    """Send a Put's HEADERS on ``stream``; its (empty) reply record."""
    h.replies[stream] = Reply()
    h.send(put_headers(stream, extra))
    return h.replies[stream]


def put_reply(r: Reply) -> pb.PutReply:
    """The one PutReply message of an OK reply."""
    assert r.ended and r.status == 0, (r.trailers, r.reset)
    body = bytes(r.body)
    flag, n = struct.unpack(">BI", body[:5])
    assert flag == 0 and len(body) == 5 + n, "one uncompressed message"
    return pb.PutReply.FromString(body[5:])


def assert_put(r: Reply, keys: Sequence[str]) -> None:
    """The Put ended OK and stored ``keys`` (in the CPU tier), in order."""
    reply = put_reply(r)
    assert [(x.key, x.tier) for x in reply.results] == [(k_, "cpu") for k_ in keys]


def refused_early(h: H2, stream: int, code: grpc.StatusCode, *fragments: str) -> None:
    """The call on ``stream`` ended with ``code`` (its message holding ``fragments``)
    and then RST_STREAM(NO_ERROR); the client has not ended the stream."""
    r = h.finish(stream)
    assert r.status == num(code), (r.trailers, r.reset)
    for f in fragments:
        assert f in r.message, (f, r.message)
    assert r.body == b""
    h.pump(lambda: r.reset is not None)
    assert r.reset == NO_ERROR
    ends = [n for n, (kind, flags, s) in enumerate(h.events) if s == stream and kind == HEADERS and flags & END_STREAM]
    resets = [n for n, (kind, _, s) in enumerate(h.events) if s == stream and kind == RST_STREAM]
    assert len(ends) == 1 and len(resets) == 1 and ends[0] < resets[0], h.events


# -- reading back and counting ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def mch(served: Served) -> Iterator[grpc.Channel]:
    """A grpcio channel to the daemon's gRPC port."""
    with channel(served.d.address) as ch:
        yield ch


@pytest.fixture
def checked(after_check: Served) -> Iterator[Served]:
    """``after_check`` (the daemon still serves its data), and no traceback in its log."""
    yield after_check
    assert "Traceback" not in after_check.d.log(), after_check.d.log()[-4000:]


def both_ports(s: Served, keys: Sequence[str]) -> list[bytes | None]:
    """``keys`` read through the listener and through the gRPC port, which must agree."""
    with channel(s.address) as lst, channel(s.d.address) as main:
        here = raw_get(stub(lst), keys)
        there = raw_get(stub(main), keys)
    assert here == there
    return here


def put_counts(s: Served) -> dict[str, float]:
    """KVStore/Put's calls ("calls") and its non-OK ends by status name, from /metrics."""
    out: dict[str, float] = {}
    for (name, labels), value in scrape(s.metrics_port).items():
        got = dict(labels)
        if got.get("method") != "KVStore/Put":
            continue
        if name == "kvstore_rpc_duration_seconds_count":
            out["calls"] = value
        elif name == "kvstore_rpc_errors_total":
            out[got["code"]] = value
    return out


def wait_counted(s: Served, before: dict[str, float], **more: float) -> dict[str, float]:
    """Poll /metrics until each count in ``more`` ("calls" or a status name) grew by
    at least that much since ``before`` (calls end when their task does); the counts."""
    deadline = time.monotonic() + 15
    while True:
        now = put_counts(s)
        if all(now.get(n, 0.0) - before.get(n, 0.0) >= v for n, v in more.items()):
            return now
        assert time.monotonic() < deadline, ("not counted", before, now, more)
        time.sleep(0.02)


# == 1. grpcio on the listener ==========================================================================
@pytest.mark.parametrize(
    ("base", "sizes", "frame_bytes"),
    [
        (1000, [1], MiB),
        (1010, [0, 3, 4095], MiB),
        (1020, [MiB + 3], MiB),
        (1030, [MiB + 3], 64 << 10),
        (1040, [5 * MiB], MiB),
        (1050, [20 * MiB + 7], MiB),  # past the 16 MiB connection window and the 8 MiB stream window
        (1060, [20 * MiB + 7], 20 * MiB + 7),  # one message over all of them: the window given back inside it
        (1070, [5 * MiB, 17, MiB + 1, 0, 2 * MiB], 3 * MiB + 5),  # several chunks
    ],
    ids=["1", "0-3-4095", "1MiB+3", "1MiB+3-in-64KiB", "5MiB", "20MiB", "20MiB-one-message", "five-chunks"],
)
def test_grpcio_puts_round_trip(
    checked: Served, lch: grpc.Channel, base: int, sizes: list[int], frame_bytes: int
) -> None:
    """grpcio's Put on the listener stores each chunk byte-exact: read back through the
    listener and through the gRPC port."""
    keys = [pk(base + n) for n in range(len(sizes))]
    want = [blob(base + n, size) for n, size in enumerate(sizes)]
    assert both_ports(checked, keys) == [None] * len(keys)
    reply = stub(lch).Put(put_frames(zip(keys, want, strict=True), frame_bytes), timeout=60)
    assert [(r.key, r.tier) for r in reply.results] == [(k_, "cpu") for k_ in keys]
    assert both_ports(checked, keys) == want


def test_grpcio_puts_overwrite_and_share_a_connection(checked: Served, lch: grpc.Channel) -> None:
    """Puts from several threads on one grpcio channel, each overwriting its key with a
    new value; the last value of each key is what is read back."""
    keys = [pk(2000 + n) for n in range(4)]

    def work(n: int) -> None:
        for j in range(3):
            raw_put(stub(lch), [(keys[n], blob(2000 + 10 * n + j, (n + 1) * MiB + j))])

    run_workers(work, len(keys), timeout_s=60)
    assert both_ports(checked, keys) == [blob(2000 + 10 * n + 2, (n + 1) * MiB + 2) for n in range(len(keys))]


def test_puts_of_no_message_and_of_one(checked: Served, lch: grpc.Channel) -> None:
    """A Put with no messages (HEADERS with END_STREAM) is OK with no results, on the bare
    client and grpcio, as on the gRPC port; a Put whose header block comes in
    CONTINUATION frames, with one message (an empty chunk's header), stores the chunk."""
    with H2(checked.port) as h:
        h.replies[1] = Reply()
        h.send(put_headers(1, end=True))
        assert put_reply(h.finish(1)).results == []
        h.replies[3] = Reply()
        h.send(request(3, header(pk(1900), b"").SerializeToString(), path=PUT_PATH, split_headers=True))
        assert_put(h.finish(3), [pk(1900)])
    assert list(stub(lch).Put(iter([]), timeout=30).results) == []
    assert both_ports(checked, [pk(1900)]) == [b""]


# == 2. the request in odd pieces ========================================================================
def _chunks(base: int) -> list[tuple[str, bytes]]:
    """Three chunks: 5000 bytes (a 2-byte varint), 300 bytes, and an empty one."""
    return [(pk(base), blob(base, 5000)), (pk(base + 1), blob(base + 1, 300)), (pk(base + 2), b"")]


def _messages(items: list[tuple[str, bytes]]) -> list[bytes]:
    """The request's messages: header A, data A[:1000], data A[1000:], header B, data B, header C."""
    (ka, a), (kb, b), (kc, c) = items
    return [pmsg(header(ka, a)), data_msg(a[:1000]), data_msg(a[1000:]), pmsg(header(kb, b)), data_msg(b),
            pmsg(header(kc, c))]


def _prefix_split(m: list[bytes]) -> list[bytes]:
    """Message prefixes cut across DATA frames (after 2 and after 4 of their 5 bytes)."""
    return [frame(DATA, 0, 1, m[0] + m[1][:2]), frame(DATA, 0, 1, m[1][2:] + m[2][:4]),
            frame(DATA, END_STREAM, 1, m[2][4:] + b"".join(m[3:]))]


def _data_split(m: list[bytes]) -> list[bytes]:
    """Data messages cut after their tag, inside their varint, after it, and inside the payload."""
    d = m[1]
    cuts = [0, 5, 6, 7, 8, 9, 300, len(d)]
    pieces = [d[a:b] for a, b in zip(cuts, cuts[1:])]
    tail = m[2]
    return [frame(DATA, 0, 1, m[0]), *(frame(DATA, 0, 1, p) for p in pieces),
            frame(DATA, 0, 1, tail[:16]), frame(DATA, 0, 1, tail[16:2000]),
            frame(DATA, 0, 1, tail[2000:] + m[3] + m[4][:6]), frame(DATA, END_STREAM, 1, m[4][6:] + m[5])]


def _padded(m: list[bytes]) -> list[bytes]:
    """Every DATA frame padded (pad lengths 0, 7, 255), one with no data at all."""
    body = b"".join(m)
    return [padded(1, body[:3], 0), padded(1, b"", 9), padded(1, body[3:1500], 255), padded(1, body[1500:1510], 7),
            frame(DATA, 0, 1, body[1510:4000]), padded(1, body[4000:], 3, end=True)]


def _one_frame(m: list[bytes]) -> list[bytes]:
    """Headers and data of all three chunks in one DATA frame that ends the stream."""
    return [frame(DATA, END_STREAM, 1, b"".join(m))]


def _byte_frames(m: list[bytes]) -> list[bytes]:
    """The first 80 bytes (the header message and the first data message's head) one per
    DATA frame; an empty DATA frame ends the stream."""
    body = b"".join(m)
    return [*(frame(DATA, 0, 1, body[i : i + 1]) for i in range(80)), frame(DATA, 0, 1, body[80:]),
            frame(DATA, END_STREAM, 1)]


def _trailers(m: list[bytes]) -> list[bytes]:
    """Request trailers end the stream (after an empty DATA frame in the middle)."""
    body = b"".join(m)
    return [frame(DATA, 0, 1, body[:2500]), frame(DATA, 0, 1), frame(DATA, 0, 1, body[2500:]),
            frame(HEADERS, END_HEADERS | END_STREAM, 1, literal("x-trailer", "1"))]


def _random_mix(m: list[bytes]) -> list[bytes]:
    """Frames of random sizes (seeded), padded or not."""
    body, rng, out, at = b"".join(m), random.Random(7), [], 0
    while at < len(body):
        n = rng.choice([1, 2, 3, 5, 11, 64, 700, 3000])
        piece, at = body[at : at + n], at + n
        out.append(padded(1, piece, rng.randrange(0, 20)) if rng.random() < 0.5 else frame(DATA, 0, 1, piece))
    return [*out, frame(DATA, END_STREAM, 1)]


SPLITS: dict[str, Callable[[list[bytes]], list[bytes]]] = {
    "prefix-split": _prefix_split, "data-split": _data_split, "padded": _padded, "one-frame": _one_frame,
    "byte-frames": _byte_frames, "trailers": _trailers, "random-mix": _random_mix,
}


@pytest.mark.parametrize("how", list(SPLITS))
def test_raw_put_in_pieces(checked: Served, how: str) -> None:
    """The request's messages cut across DATA frames in odd places store the right bytes
    (with a PING answered between two of the frames)."""
    items = _chunks(3000 + 10 * list(SPLITS).index(how))
    frames = SPLITS[how](_messages(items))
    with H2(checked.port) as h:
        open_put(h, 1)
        half = len(frames) // 2
        h.send(b"".join(frames[:half]))
        h.ping()  # the daemon has read the first half (as DATA frames apart from the rest)
        assert not h.reply(1).ended
        h.send(b"".join(frames[half:]))
        assert_put(h.finish(1), [k_ for k_, _ in items])
        assert h.goaway is None
    assert both_ports(checked, [k_ for k_, _ in items]) == [v for _, v in items]


def test_raw_put_dribbled_through_the_socket(checked: Served) -> None:
    """HEADERS and DATA frames (one of 1 MiB, the daemon's SETTINGS_MAX_FRAME_SIZE) written
    in small random pieces: frame headers and messages split across the daemon's reads."""
    big = blob(3100, 3 * MiB + 11)
    items = [(pk(3100), big), (pk(3101), blob(3101, 999))]
    body = put_body(items, frame_bytes=2 * MiB)
    raw = put_headers(1) + frame(DATA, 0, 1, body[:RECV_FRAME]) + data_frames(1, body[RECV_FRAME:], end=True)
    rng = random.Random(3100)
    with H2(checked.port) as h:
        h.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        h.replies[1] = Reply()
        at = 0
        while at < len(raw):
            n = rng.choice([1, 3, 9, 10, 17, 200]) if at < 4000 or len(raw) - at < 4000 else rng.randrange(1, 400_000)
            h.send(raw[at : at + n])
            at += n
            if n < 400:
                # No condition to poll inside a frame: a pause lets the daemon read the piece on its own.
                time.sleep(0.001)
        assert_put(h.finish(1), [pk(3100), pk(3101)])
    assert both_ports(checked, [pk(3100), pk(3101)]) == [big, blob(3101, 999)]


def test_puts_and_gets_interleave_on_one_connection(checked: Served) -> None:
    """Two Puts whose DATA frames alternate, and a Get answered while both are open, on one connection."""
    a, b = blob(3200, 2 * MiB + 1), blob(3201, 700_001)
    body_a, body_b = put_body([(pk(3200), a)], 512 << 10), put_body([(pk(3201), b)], 100_000)
    with H2(checked.port) as h:
        open_put(h, 1)
        open_put(h, 3)
        step = 100_003
        for at in range(0, max(len(body_a), len(body_b)), step):
            if at < len(body_a):
                h.send(frame(DATA, 0, 1, body_a[at : at + step]))
            if at < len(body_b):
                h.send(frame(DATA, 0, 3, body_b[at : at + step]))
            if at == 5 * step:
                h.call(5, [pk(3200), pk(3201)])
                r = h.finish(5)
                assert r.status == 0 and len(r.messages()) == 2  # two headers: not found yet
                assert not any(m.header.found for m in r.messages())
        h.ping()
        assert not h.reply(1).ended and not h.reply(3).ended
        h.send(frame(DATA, END_STREAM, 3) + frame(DATA, END_STREAM, 1))
        assert_put(h.finish(1), [pk(3200)])
        assert_put(h.finish(3), [pk(3201)])
    assert both_ports(checked, [pk(3200), pk(3201)]) == [a, b]


# == 3. streams cut off ===================================================================================
#: server.limits.max_inflight of the daemon for cut streams: room for one 60 MiB put's buffer, not two.
CUT_INFLIGHT = 96 * MiB


@pytest.fixture(scope="module")
def cutd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A daemon of its own for the cut streams (a short grace period: a call left hanging
    would hold up its stop by that long, not the other tests' daemon's)."""
    mport = free_port()
    config = cpu_only("256MiB", metrics_port=mport, grace_s=2, limits={"max_inflight": f"{CUT_INFLIGHT}B"})
    with DaemonProcess(tmp_path_factory.mktemp("h2cut"), config) as d:
        port = discover(d.address)
        assert port is not None and port != d.port
        yield Served(d, port, mport)
        assert "Traceback" not in d.log(), d.log()[-4000:]


def wait_ended(s: Served, before: dict[str, float], timeout: float = 5.0) -> dict[str, float]:
    """Poll /metrics until one more KVStore/Put call has ended, not OK; the counts."""
    deadline = time.monotonic() + timeout
    while True:
        now = put_counts(s)
        errors = sum(v for n, v in now.items() if n != "calls") - sum(v for n, v in before.items() if n != "calls")
        if now.get("calls", 0.0) - before.get("calls", 0.0) >= 1 and errors >= 1:
            return now
        assert time.monotonic() < deadline, (f"the cut Put has not ended {timeout:g} s after its stream was cut",
                                             before, now)
        time.sleep(0.02)


CUTS = ["rst-stream", "socket-closed", "socket-closed-inside-a-frame", "write-side-shut"]


@pytest.mark.parametrize("cut", CUTS)
def test_a_cut_put_stores_nothing(cutd: Served, cut: str) -> None:
    """A Put cut in the middle of a chunk's data (its stream reset, its socket closed
    between DATA frames or inside one, or its write side shut) ends (counted, not OK),
    stores nothing of that chunk: the key keeps its old value, or stays absent; the
    daemon goes on, on the same connection after a reset.  The complete chunk before it
    is stored, as on the gRPC port."""
    base = 4000 + 10 * CUTS.index(cut)
    old, new = blob(base, MiB + 5), blob(base + 1, 4 * MiB)
    had_old = cut != "socket-closed-inside-a-frame"
    with channel(cutd.d.address) as main:
        if had_old:
            raw_put(stub(main), [(pk(base), old)])
    before = put_counts(cutd)
    body = put_body([(pk(base + 2), blob(base + 2, 1000)), (pk(base), new)])
    half = len(body) // 2  # the first chunk (complete) and half of the new value
    h = H2(cutd.port)
    try:
        open_put(h, 1)
        h.send(data_frames(1, body[:half]))
        h.ping()  # the daemon has read it all
        if cut == "rst-stream":
            h.send(frame(RST_STREAM, 0, 1, struct.pack(">I", CANCEL)))
            h.ping()
            other = blob(base + 3, 300_000)
            open_put(h, 3)
            h.send(data_frames(3, put_body([(pk(base + 3), other)]), end=True))
            assert_put(h.finish(3), [pk(base + 3)])
            assert both_ports(cutd, [pk(base + 3)]) == [other]
            assert h.goaway is None and not h.reply(1).ended
        elif cut == "socket-closed-inside-a-frame":
            rest = frame(DATA, 0, 1, body[half : half + 200_000])
            h.send(rest[: len(rest) // 2])
        if cut == "write-side-shut":
            h.sock.shutdown(socket.SHUT_WR)
        elif cut != "rst-stream":
            h.close()
        after = wait_ended(cutd, before)
        if cut == "rst-stream":
            assert after.get("CANCELLED", 0.0) - before.get("CANCELLED", 0.0) == 1, (before, after)
        if cut == "write-side-shut":  # the daemon ended the call and then closed the connection
            h.until_closed()
    finally:
        h.close()
    assert both_ports(cutd, [pk(base), pk(base + 2)]) == [old if had_old else None, blob(base + 2, 1000)]
    # The daemon still takes puts on its listener.
    with channel(cutd.address) as lst:
        raw_put(stub(lst), [(pk(base + 4), new)])
    assert both_ports(cutd, [pk(base + 4)]) == [new]


def test_a_client_gone_mid_put_gives_its_buffer_back(cutd: Served) -> None:
    """A client that goes away (closes its socket) after a 60 MiB chunk's header and a
    little data: the receive buffer the daemon took for the chunk counts against
    server.limits.max_inflight (96 MiB) only until the call ends, so another 60 MiB put
    goes through soon after (retried while RESOURCE_EXHAUSTED, for 5 s)."""
    size = 60 * MiB
    h = H2(cutd.port)
    try:
        open_put(h, 1)
        h.send(frame(DATA, 0, 1, pmsg(header(pk(4400), b"", nbytes=size)) + data_msg(b"x" * 1000)[:500]))
        h.ping()  # the daemon has read the header: the buffer is taken
    finally:
        h.close()
    value = blob(4401, size)
    deadline = time.monotonic() + 5
    with channel(cutd.d.address) as main:
        while True:
            try:
                raw_put(stub(main), [(pk(4401), value)])
                break
            except grpc.RpcError as exc:
                assert exc.code() == Code.RESOURCE_EXHAUSTED, exc
                assert time.monotonic() < deadline, f"still refused 5 s after the client left: {exc.details()}"
                time.sleep(0.05)
    assert both_ports(cutd, [pk(4400), pk(4401)]) == [None, value]


def test_write_side_shut_after_a_whole_put_gets_its_reply(cutd: Served) -> None:
    """A client that ends its Put (END_STREAM) and then shuts its write side (a
    half-close) still gets the reply, and the chunk is stored."""
    value = blob(4500, 2 * MiB + 1)
    with H2(cutd.port) as h:
        open_put(h, 1)
        h.send(data_frames(1, put_body([(pk(4500), value)]), end=True))
        h.sock.shutdown(socket.SHUT_WR)
        assert_put(h.finish(1), [pk(4500)])
        h.until_closed()
    assert both_ports(cutd, [pk(4500)]) == [value]


def test_sigterm_lets_a_put_in_flight_finish(tmp_path: Path) -> None:
    """SIGTERM while a Put is half sent: GOAWAY, new streams refused, the Put's data
    still read and the Put answered OK; then the daemon closes the connection and exits 0."""
    value = blob(4600, 3 * MiB)
    body = put_body([(pk(4600), value)])
    with DaemonProcess(tmp_path / "d", cpu_only("64MiB", grace_s=30)) as d:
        port = discover(d.address)
        assert port is not None
        with H2(port) as h:
            open_put(h, 1)
            h.send(data_frames(1, body[: len(body) // 2]))
            h.ping()
            d.send_signal(signal.SIGTERM)
            h.pump(lambda: h.goaway is not None)
            assert h.goaway == (1, NO_ERROR, b"")
            open_put(h, 3)  # a new stream after GOAWAY: refused
            h.pump(lambda: h.reply(3).reset is not None)
            assert h.reply(3).reset == REFUSED_STREAM
            assert d.proc is not None and d.proc.poll() is None  # waiting for the Put
            h.send(data_frames(1, body[len(body) // 2 :], end=True))
            assert_put(h.finish(1), [pk(4600)])
            h.until_closed()
        assert d.wait(30) == 0, d.log()
        assert "Traceback" not in d.log()


# == 4. a bad checksum =====================================================================================
def test_bad_checksum_is_data_loss_as_on_the_grpc_port(checked: Served, lch: grpc.Channel, mch: grpc.Channel) -> None:
    """A chunk whose bytes fail their checksum: the status and message of the gRPC port
    (CorruptChunk: DATA_LOSS), on grpcio and the bare client; nothing stored."""
    payload = blob(5000, MiB + 1)
    frames = [header(pk(5000), payload, checksum=12345), pb.PutFrame(data=payload)]
    main_err = rpc_error(lambda: stub(mch).Put(iter(frames), timeout=30), Code.DATA_LOSS, "checksum")
    here = rpc_error(lambda: stub(lch).Put(iter(frames), timeout=30), Code.DATA_LOSS, "checksum")
    assert here.details() == main_err.details()
    with H2(checked.port) as h:
        open_put(h, 1)
        h.send(data_frames(1, b"".join(pmsg(f) for f in frames), end=True))
        r = h.finish(1)
        assert r.status == num(Code.DATA_LOSS), r.trailers
        assert r.message == main_err.details()
        assert r.reset is None  # the request had ended: nothing to reset
    assert both_ports(checked, [pk(5000)]) == [None]


# == 5. refused while the client still sends ===============================================================
def _refusals() -> list[tuple[pb.PutFrame, grpc.StatusCode, str]]:
    return [
        (header(pk(6000), b"", nbytes=5 << 30), Code.RESOURCE_EXHAUSTED, "max_chunk_bytes"),  # the default: 4 GiB
        (header("not-a-key", blob(6001, 100)), Code.INVALID_ARGUMENT, "chunk 0.key"),
        (header("t/m/short/s1", blob(6002, 100)), Code.INVALID_ARGUMENT, "chunk 0.key"),
    ]


@pytest.mark.parametrize("n", range(len(_refusals())), ids=["over-max-chunk", "bad-key", "short-key"])
def test_a_refused_header_is_answered_before_the_request_ends(checked: Served, mch: grpc.Channel, n: int) -> None:
    """A header the daemon refuses: its status (the gRPC port's message) arrives while the
    client is still sending, then RST_STREAM(NO_ERROR); what the client still sends on the
    stream is ignored and the connection serves a Put and a Get after it."""
    bad, code, what = _refusals()[n]
    main_err = rpc_error(lambda: stub(mch).Put(iter([bad, pb.PutFrame(data=b"x" * 100)]), timeout=30), code, what)
    with H2(checked.port) as h:
        open_put(h, 1)
        h.send(frame(DATA, 0, 1, pmsg(bad) + data_msg(b"x" * 100)[:50]))
        refused_early(h, 1, code, what)
        assert h.reply(1).message == main_err.details()
        h.send(data_frames(1, blob(6003, 600_000)) + frame(DATA, END_STREAM, 1))  # ignored
        h.ping()
        good = blob(6004, 70_000)
        open_put(h, 3)
        h.send(data_frames(3, put_body([(pk(6004), good)]), end=True))
        assert_put(h.finish(3), [pk(6004)])
        h.call(5, [pk(6004)])
        assert [m.data for m in h.finish(5).messages()][1:] == [good]
        assert h.goaway is None
    assert both_ports(checked, [pk(6000)]) == [None]


def test_a_refusal_inside_a_data_frame(checked: Served) -> None:
    """The refusal (a chunk over max_chunk_bytes) comes while the DATA frame carrying the
    header is still arriving (the daemon reads a Put's DATA as it comes); the rest of
    that frame and the frames after it are skipped in step: the next Put on the
    connection is stored."""
    start = pmsg(header(pk(6050), b"", nbytes=5 << 30)) + data_msg(b"w" * 1000)[:600]
    length = RECV_FRAME
    with H2(checked.port) as h:
        h.ping()  # the daemon's SETTINGS read (and acknowledged): no frame of ours goes out inside the DATA frame
        open_put(h, 1)
        h.send(frame_header(DATA, 0, 1, length) + start)  # the frame's first bytes only
        refused_early(h, 1, Code.RESOURCE_EXHAUSTED, "max_chunk_bytes")
        h.send(bytes(length - len(start)))  # the rest of the frame
        h.send(frame(DATA, END_STREAM, 1, b"\x00" * 7))
        good = blob(6051, 123_457)
        open_put(h, 3)
        h.send(data_frames(3, put_body([(pk(6051), good)]), end=True))
        assert_put(h.finish(3), [pk(6051)])
        assert h.goaway is None
    assert both_ports(checked, [pk(6050), pk(6051)]) == [None, good]


def test_grpcio_hears_the_refusal_while_its_iterator_waits(checked: Served, lch: grpc.Channel) -> None:
    """grpcio's Put whose request iterator blocks after a refused header (over
    max_chunk_bytes) ends RESOURCE_EXHAUSTED at once, not when the iterator would end."""
    release = threading.Event()

    def frames() -> Iterator[pb.PutFrame]:
        yield header(pk(6100), b"", nbytes=5 << 30)
        yield pb.PutFrame(data=b"y" * 1000)
        release.wait(15)

    t0 = time.monotonic()
    try:
        rpc_error(lambda: stub(lch).Put(frames(), timeout=30), Code.RESOURCE_EXHAUSTED, "max_chunk_bytes")
        assert time.monotonic() - t0 < 10
    finally:
        release.set()
    assert raw_put(stub(lch), [(pk(6101), blob(6101, 10))]).results[0].key == pk(6101)


def test_data_past_the_chunks_size_is_refused_mid_message(checked: Served, lch: grpc.Channel) -> None:
    """One 20 MiB data message for a chunk whose header says 1 MiB: INVALID_ARGUMENT
    (the gRPC port's message), nothing stored; the channel goes on."""
    payload = blob(6200, 20 * MiB)
    frames = [header(pk(6200), payload[:MiB]), pb.PutFrame(data=payload)]
    rpc_error(lambda: stub(lch).Put(iter(frames), timeout=60), Code.INVALID_ARGUMENT, "header said 1048576")
    assert both_ports(checked, [pk(6200)]) == [None]
    assert raw_put(stub(lch), [(pk(6201), payload[:MiB])]).results[0].key == pk(6201)
    assert both_ports(checked, [pk(6201)]) == [payload[:MiB]]


# == 6. malformed request messages ===========================================================================
def _started(base: int) -> bytes:
    """A chunk's header and the first half of its data (the chunk stays unfinished)."""
    return pmsg(header(pk(base), blob(base, 4000))) + data_msg(blob(base, 4000)[:2000])


MALFORMED: dict[str, tuple[Callable[[int], bytes], bool, grpc.StatusCode, str]] = {
    # name: (the stream's DATA payload, whether it ends the stream, the status, a fragment of its message)
    "compressed": (lambda b: _started(b) + pmsg(pb.PutFrame(data=b"z" * 10), flag=1), False, Code.UNIMPLEMENTED,
                   "compressed"),
    "compressed-first": (lambda b: pmsg(header(pk(b), b"abc"), flag=1) + data_msg(b"abc"), True, Code.UNIMPLEMENTED,
                         "compressed"),
    "oversized-header": (
        lambda b: _started(b) + struct.pack(">BI", 0, MAX_OTHER_MESSAGE + 1) + b"\x0a" + b"\xff" * 10 + bytes(1000),
        False, Code.INVALID_ARGUMENT, str(MAX_OTHER_MESSAGE)),
    "oversized-bad-data-field": (  # starts as a data field whose length is not the message's
        lambda b: _started(b) + struct.pack(">BI", 0, 2 * MiB) + b"\x12\x80\x80\x40" + bytes(1000),
        False, Code.INVALID_ARGUMENT, str(MAX_OTHER_MESSAGE)),
    "undecodable": (lambda b: _started(b) + pmsg(b"\x0a\x05ab"), False, Code.INVALID_ARGUMENT, "malformed PutFrame"),
    "undecodable-tag": (lambda b: _started(b) + pmsg(b"\xff\xff\xff"), False, Code.INVALID_ARGUMENT,
                        "malformed PutFrame"),
    "empty-message": (lambda b: _started(b) + pmsg(b""), False, Code.INVALID_ARGUMENT, "empty PutFrame"),
    # An empty data message before any header: refused, as on the gRPC port.
    "empty-data-first": (lambda b: data_msg(b"") + pmsg(header(pk(b), b"abc")) + data_msg(b"abc"), True,
                         Code.INVALID_ARGUMENT, "data frame before any header"),
    "ended-inside-data": (lambda b: _started(b) + data_msg(b"q" * 100)[:60], True, Code.INVALID_ARGUMENT,
                          "ended inside a message"),
    "ended-inside-prefix": (lambda b: _started(b) + data_msg(b"q" * 100)[:3], True, Code.INVALID_ARGUMENT,
                            "ended inside a message"),
    "ended-inside-header": (lambda b: pmsg(header(pk(b), b"abc"))[:20], True, Code.INVALID_ARGUMENT,
                            "ended inside a message"),
    "ended-inside-chunk": (lambda b: _started(b), True, Code.INVALID_ARGUMENT, "stream ended inside chunk 0"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_messages_are_statuses(checked: Served, case: str) -> None:
    """Requests this port cannot take end with their status, store nothing (the chunk
    begun before them is dropped), and leave the connection usable; one refused before
    the client ended its stream is followed by RST_STREAM(NO_ERROR)."""
    base = 7000 + 10 * list(MALFORMED).index(case)
    payload, ends, code, what = MALFORMED[case]
    with H2(checked.port) as h:
        open_put(h, 1)
        h.send(data_frames(1, payload(base), end=ends, size=3000))
        if ends:
            r = h.finish(1)
            assert r.status == num(code), (r.trailers, r.reset)
            assert what in r.message, r.message
            h.ping()
            assert r.reset in (None, NO_ERROR)  # NO_ERROR: answered before the daemon read END_STREAM
        else:
            refused_early(h, 1, code, what)
        h.call(3, [pk(base)])
        assert [m.header.found for m in h.finish(3).messages()] == [False]
        assert h.goaway is None
    assert both_ports(checked, [pk(base)]) == [None]


def test_put_headers_are_checked(checked: Served) -> None:
    """A Put with a bad grpc-timeout or content type is refused at its headers (the
    client still sending: then RST_STREAM(NO_ERROR)); nothing stored."""
    with H2(checked.port) as h:
        open_put(h, 1, extra=[("grpc-timeout", "soon")])
        h.send(frame(DATA, 0, 1, pmsg(header(pk(7500), b"abc"))))
        refused_early(h, 1, Code.INVALID_ARGUMENT, "grpc-timeout")
        h.replies[3] = Reply()
        h.send(put_headers(3).replace(b"application/grpc", b"text/plain+json!"))
        refused_early(h, 3, Code.UNIMPLEMENTED, "content-type")
        assert h.goaway is None
    assert both_ports(checked, [pk(7500)]) == [None]


# == 7. deadlines ===========================================================================================
@pytest.mark.parametrize("sent", ["header", "half-the-data"])
def test_deadline_of_a_put_that_stops_sending(checked: Served, sent: str) -> None:
    """A Put with grpc-timeout 300 ms whose client stops after its header (or half its
    data) ends DEADLINE_EXCEEDED at about its deadline, then RST_STREAM(NO_ERROR);
    nothing stored; the connection goes on."""
    base = 8000 + (10 if sent == "header" else 20)
    value = blob(base, 2 * MiB)
    body = put_body([(pk(base), value)])
    with H2(checked.port) as h:
        t0 = time.monotonic()
        open_put(h, 1, extra=[("grpc-timeout", grpc_timeout(0.3))])
        h.send(data_frames(1, body[: (len(pmsg(header(pk(base), value))) if sent == "header" else len(body) // 2)]))
        r = h.finish(1, timeout=20)
        elapsed = time.monotonic() - t0
        assert r.status == num(Code.DEADLINE_EXCEEDED), (r.trailers, r.reset)
        assert 0.25 < elapsed < 10
        refused_early(h, 1, Code.DEADLINE_EXCEEDED)
        h.send(data_frames(1, body[len(body) // 2 :], end=True))  # too late: ignored
        h.ping()
        open_put(h, 3, extra=[("grpc-timeout", grpc_timeout(30))])
        h.send(data_frames(3, put_body([(pk(base + 1), value)]), end=True))
        assert_put(h.finish(3), [pk(base + 1)])
    assert both_ports(checked, [pk(base), pk(base + 1)]) == [None, value]


# == 8. tokens and tenants ==================================================================================
def test_tokens_and_tenants_for_puts_on_the_listener(authd: DaemonProcess) -> None:
    """Puts on the listener of a daemon with tokens: none or an unknown token is
    UNAUTHENTICATED, another tenant's key or a read-only token PERMISSION_DENIED (the
    gRPC port's messages), nothing stored; the tenant's read-write token stores."""
    port = discover(authd.address, metadata=bearer(auth_tls.A_READ), probe=auth_tls.A_KEY)
    assert port is not None and port != authd.port
    mine, theirs = pk(9000, tenant="a"), pk(9000, tenant="b")
    value = blob(9000, MiB + 9)
    admin = bearer(auth_tls.ADMIN)
    cases = [
        (None, mine, Code.UNAUTHENTICATED, "authorization"),
        (bearer("not-a-token-anyone-has"), mine, Code.UNAUTHENTICATED, "unknown token"),
        (bearer(auth_tls.A_RW), theirs, Code.PERMISSION_DENIED, "tenant 'b'"),
        (bearer(auth_tls.A_READ), mine, Code.PERMISSION_DENIED, ""),
        (bearer(auth_tls.B_RW), mine, Code.PERMISSION_DENIED, "tenant 'a'"),
    ]
    with channel(f"127.0.0.1:{port}") as ch, channel(authd.address) as main:
        for md, k_, code, what in cases:
            here = rpc_error(lambda: raw_put(stub(ch), [(k_, value)], metadata=md), code, what)
            there = rpc_error(lambda: raw_put(stub(main), [(k_, value)], metadata=md), code, what)
            assert here.details() == there.details()
        assert raw_get(stub(main), [mine, theirs], metadata=admin) == [None, None]
        # Over the bare client: refused before its request ended.
        with H2(port) as h:
            open_put(h, 1)
            h.send(frame(DATA, 0, 1, pmsg(header(mine, value))))
            refused_early(h, 1, Code.UNAUTHENTICATED, "authorization")
            open_put(h, 3, extra=bearer(auth_tls.A_RW))
            h.send(frame(DATA, 0, 3, pmsg(header(theirs, value))))
            refused_early(h, 3, Code.PERMISSION_DENIED, "tenant 'b'")
        assert raw_get(stub(main), [mine, theirs], metadata=admin) == [None, None]
        reply = raw_put(stub(ch), [(mine, value)], metadata=bearer(auth_tls.A_RW))
        assert [r.key for r in reply.results] == [mine]
        reply = raw_put(stub(ch), [(theirs, value[:100])], metadata=admin)
        assert [r.key for r in reply.results] == [theirs]
        assert raw_get(stub(ch), [mine], metadata=bearer(auth_tls.A_READ)) == [value]
        assert raw_get(stub(main), [mine, theirs], metadata=admin) == [value, value[:100]]


# == 9. PutSink on its own ===================================================================================
Item = pb.PutFrame | bytes


def _merged(items: Iterable[pb.PutFrame | memoryview | bytes]) -> list[Item]:
    """Consecutive data pieces joined into one bytes (empty ones dropped); PutFrames as they are."""
    out: list[Item] = []
    for item in items:
        if isinstance(item, pb.PutFrame):
            out.append(item)
        elif len(item):
            if out and isinstance(out[-1], bytes):
                out[-1] += bytes(item)
            else:
                out.append(bytes(item))
    return out


def _sink_stream() -> tuple[bytes, list[Item]]:
    """A request of several messages, and what the sink must give for it (merged)."""
    raws: list[bytes] = []
    want: list[pb.PutFrame | bytes] = []
    for n, size in enumerate([3, 9, 300, 20_000, 0, 1]):  # data shorter and longer than the 11-byte head
        h = header(pk(n), blob(n, size))
        raws.append(h.SerializeToString())
        want.append(h)
        d = blob(100 + n, size)
        raws.append(pb.PutFrame(data=d).SerializeToString())
        want.append(d)
    odd = b"\x12\x03abc\x12\x02xy"  # starts as a data field, but is two: parsed whole (the last wins)
    raws.append(odd)
    want.append(pb.PutFrame.FromString(odd))
    raws.append(b"")  # an empty message: an empty PutFrame
    want.append(pb.PutFrame())
    big = header(pk(99), b"", nbytes=7)
    big.header.meta.shape.extend(range(1000, 1400))  # a header of over 1 KiB
    raws.append(big.SerializeToString())
    want.append(big)
    raws.append(pb.PutFrame(data=blob(99, 7)).SerializeToString())
    want.append(blob(99, 7))
    return b"".join(pmsg(r) for r in raws), _merged(want)


def _pieces(stream: bytes, rng: random.Random | None) -> list[memoryview]:
    """``stream`` as views: byte by byte, or in random sizes."""
    view, out, at = memoryview(stream), [], 0
    while at < len(stream):
        n = 1 if rng is None else rng.choice([1, 2, 3, 4, 5, 6, 10, 11, 12, 64, 1000, 30_000])
        out.append(view[at : at + n])
        at += n
    return out


class Calls:
    """What a sink said it was done with (its ``taken`` calls)."""

    def __init__(self) -> None:
        self.taken: list[int] = []

    def sink(self, window: int = STREAM_RECV_WINDOW) -> PutSink:
        return PutSink(self.taken.append, window)


async def _drain(sink: PutSink) -> list[pb.PutFrame | memoryview]:
    return [item async for item in sink.messages()]


@pytest.mark.parametrize("seed", [None, 1, 2, 3], ids=["bytes", "seed1", "seed2", "seed3"])
def test_sink_parses_a_stream_in_any_pieces(seed: int | None) -> None:
    """Fed byte by byte or in random pieces (all fed first, or taken while fed), the
    sink gives each header as a PutFrame and the data bytes in order."""
    stream, want = _sink_stream()

    async def fed_first() -> list[Item]:
        sink = Calls().sink()
        for piece in _pieces(stream, None if seed is None else random.Random(seed)):
            sink.feed(piece)
        sink.end()
        return _merged(await _drain(sink))

    async def taken_while_fed() -> list[Item]:
        sink = Calls().sink()
        taker = asyncio.create_task(_drain(sink))
        rng = random.Random(seed or 0)
        for piece in _pieces(stream, None if seed is None else random.Random(seed)):
            sink.feed(piece)
            if rng.random() < 0.3:
                await asyncio.sleep(0)
        sink.end()
        return _merged(await taker)

    assert asyncio.run(fed_first()) == want
    assert asyncio.run(taken_while_fed()) == want


def test_sink_data_are_views_of_the_fed_bytes() -> None:
    """A data message fed in one piece comes out as views of that piece (no copy) but
    for the few bytes read with its head."""
    payload = blob(1, 100_000)
    stream = pmsg(header(pk(1), payload)) + data_msg(payload)

    async def run() -> list[pb.PutFrame | memoryview]:
        sink = Calls().sink()
        sink.feed(memoryview(stream))
        sink.end()
        return await _drain(sink)

    items = asyncio.run(run())
    views = [i for i in items if isinstance(i, memoryview)]
    assert b"".join(bytes(v) for v in views) == payload
    shared = sum(len(v) for v in views if v.obj is stream)
    assert shared >= len(payload) - 11, [(len(v), v.obj is stream) for v in views]


def test_sink_tells_what_it_is_done_with() -> None:
    """What is not a data message's bytes (prefixes, the header message, tag and varint)
    is told as it is fed; data bytes only as the handler takes them; in all, every
    byte fed, once.  A closed sink tells nothing more."""
    payload = blob(5, 3 * MiB)
    head = pmsg(header(pk(5), payload))
    msg = data_msg(payload)
    stream = head + msg
    overhead = len(stream) - len(payload)

    async def run() -> None:
        calls = Calls()
        sink = calls.sink()
        view = memoryview(stream)
        for at in range(0, len(stream), 100_000):
            sink.feed(view[at : at + 100_000])
        # Fed whole, nothing taken yet: only the bytes around the data are done with.
        assert sum(calls.taken) == overhead, (sum(calls.taken), overhead)
        sink.end()
        got, taken = sink.messages(), 0
        assert isinstance(await anext(got), pb.PutFrame)
        async for item in got:
            assert isinstance(item, memoryview)
            taken += len(item)
            assert sum(calls.taken) == overhead + taken
        assert taken == len(payload) and sum(calls.taken) == len(stream)

        calls = Calls()
        sink = calls.sink()
        sink.feed(view[: len(head) + MiB])
        told = sum(calls.taken)
        sink.close()
        assert await _drain(sink) == [] and sink.ended
        sink.feed(view[len(head) + MiB :])
        assert sum(calls.taken) - told == len(stream) - len(head) - MiB  # dropped: done with at once

    asyncio.run(run())


def test_sink_wakes_its_handler_within_half_its_window() -> None:
    """With a small window, data queued up to half of it wakes the handler before its
    message is complete: a client whose window is spent is never left waiting on a
    handler that sleeps."""
    window = 256 << 10
    payload = blob(6, MiB)
    stream = pmsg(header(pk(6), payload)) + data_msg(payload)

    async def run() -> int:
        sink = Calls().sink(window)
        got = sink.messages()
        first = asyncio.ensure_future(anext(got))
        sink.feed(memoryview(stream[:1000]))  # the header message
        assert isinstance(await first, pb.PutFrame)
        nxt = asyncio.ensure_future(anext(got))
        fed = 1000 + window // 2 + 20
        sink.feed(memoryview(stream[1000:fed]))
        item = await asyncio.wait_for(nxt, 5)
        assert isinstance(item, memoryview)
        return len(item)

    assert asyncio.run(run()) > 0


@pytest.mark.parametrize(
    ("tail", "error", "what", "partial"),
    [
        (data_msg(b"d" * 50)[:30], InvalidArgument, "ended inside a message", b"d" * 23),
        (data_msg(b"d" * 50)[:4], InvalidArgument, "ended inside a message", b""),
        (data_msg(b"d" * 50)[:6], InvalidArgument, "ended inside a message", b""),
        (pmsg(header(pk(1), b"x" * 10))[:12], InvalidArgument, "ended inside a message", b""),
        (pmsg(pb.PutFrame(data=b"c"), flag=1) + data_msg(b"more"), Unimplemented, "compressed", b""),
        (struct.pack(">BI", 0, MAX_OTHER_MESSAGE + 1) + b"\x0a" + b"\xff" * 10, InvalidArgument,
         str(MAX_OTHER_MESSAGE), b""),
        (pmsg(b"\x0a\x05ab") + data_msg(b"more"), InvalidArgument, "malformed PutFrame", b""),
    ],
    ids=["end-in-data", "end-in-prefix", "end-in-head", "end-in-header", "compressed", "oversized", "undecodable"],
)
def test_sink_errors(tail: bytes, error: type[KVStoreError], what: str, partial: bytes) -> None:
    """A malformed stream: the messages before the fault come out (and the data of a
    data message cut off, which streams as it comes), then its error, and nothing
    after it; an oversized message is refused on its head, before its body."""
    first = pmsg(header(pk(2), b"abc")) + data_msg(b"abc")

    async def run() -> tuple[list[Item], KVStoreError]:
        sink = Calls().sink()
        for piece in _pieces(first + tail, random.Random(len(tail))):
            sink.feed(piece)
        sink.end()
        got: list[pb.PutFrame | memoryview] = []
        with pytest.raises(error) as info:
            async for item in sink.messages():
                got.append(item)
        return _merged(got), info.value

    got, exc = asyncio.run(run())
    assert got == [header(pk(2), b"abc"), b"abc" + partial]
    assert what in str(exc)


def test_sink_end_between_messages_is_clean() -> None:
    """``end()`` right after a complete message: no error; a second ``end()`` changes nothing."""

    async def run() -> list[Item]:
        sink = Calls().sink()
        sink.feed(memoryview(pmsg(header(pk(3), b"ab")) + data_msg(b"ab")))
        sink.end()
        sink.end()
        sink.feed(memoryview(data_msg(b"after the end")))  # dropped
        return _merged(await _drain(sink))

    assert asyncio.run(run()) == [header(pk(3), b"ab"), b"ab"]


# == 10. metrics =============================================================================================
def test_puts_on_the_listener_are_counted(checked: Served, lch: grpc.Channel) -> None:
    """Each Put on the listener counts once under KVStore/Put in the daemon's RPC
    metrics, with its status when not OK; its chunks count as writes."""

    def writes() -> float:
        m = scrape(checked.metrics_port)
        return sum(v for (name, _), v in m.items() if name == "kvstore_writes_total")

    before, wrote = put_counts(checked), writes()
    raw_put(stub(lch), [(pk(10_000), blob(10_000, MiB)), (pk(10_001), blob(10_001, 10))])
    raw_put(stub(lch), [(pk(10_002), blob(10_002, 3 * MiB))])
    rpc_error(lambda: stub(lch).Put(iter([header(pk(10_003), b"abc", checksum=1), pb.PutFrame(data=b"abc")]),
                                    timeout=30), Code.DATA_LOSS)
    rpc_error(lambda: raw_put(stub(lch), [("bad", b"abc")]), Code.INVALID_ARGUMENT)
    with H2(checked.port) as h:  # one cancelled by RST_STREAM
        open_put(h, 1)
        h.send(frame(DATA, 0, 1, pmsg(header(pk(10_004), b"abcd"))))
        h.ping()
        h.send(frame(RST_STREAM, 0, 1, struct.pack(">I", CANCEL)))
        h.ping()
    after = wait_counted(checked, before, calls=5, CANCELLED=1)
    grew = {n: after.get(n, 0.0) - before.get(n, 0.0) for n in set(after) | set(before)}
    assert {n: v for n, v in grew.items() if v} == {"calls": 5, "DATA_LOSS": 1, "INVALID_ARGUMENT": 1,
                                                     "CANCELLED": 1}, (before, after)
    assert writes() - wrote == 3


def test_the_clients_goaway_lets_its_put_finish(checked: Served) -> None:
    """GOAWAY from the client while a Put is open: the Put finishes; nothing else breaks."""
    value = blob(11_000, 300_000)
    body = put_body([(pk(11_000), value)])
    with H2(checked.port) as h:
        open_put(h, 1)
        h.send(frame(DATA, 0, 1, body[:1000]))
        h.send(frame(GOAWAY, 0, 0, struct.pack(">II", 0, NO_ERROR)))
        h.send(data_frames(1, body[1000:], end=True))
        assert_put(h.finish(1), [pk(11_000)])
        h.until_closed()
    assert both_ports(checked, [pk(11_000)]) == [value]


class WindowedH2(H2):
    """:class:`H2` that adds up the daemon's WINDOW_UPDATE increments per stream (0: the connection)."""

    def __init__(self, port: int) -> None:
        self.granted: dict[int, int] = {}
        self.initial = -1  # the daemon's SETTINGS_INITIAL_WINDOW_SIZE, once read
        self.sent: dict[int, int] = {}  # DATA payload bytes sent per stream (0: the connection)
        super().__init__(port)

    def __enter__(self) -> WindowedH2:
        return self

    def _handle(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        super()._handle(kind, flags, stream, payload)
        if kind == WINDOW_UPDATE:
            self.granted[stream] = self.granted.get(stream, 0) + (int.from_bytes(payload, "big") & MAX_WINDOW)
        elif kind == SETTINGS and not flags & ACK:
            for i in range(0, len(payload), 6):
                ident, value = struct.unpack(">HI", payload[i : i + 6])
                if ident == SETTINGS_INITIAL_WINDOW_SIZE:
                    self.initial = value

    def ready(self) -> None:
        """Read the daemon's SETTINGS and its connection WINDOW_UPDATE."""
        self.pump(lambda: self.initial >= 0 and 0 in self.granted)

    def left(self, stream: int) -> int:
        """What the windows let this client send on ``stream`` now."""
        conn = DEFAULT_WINDOW + self.granted.get(0, 0) - self.sent.get(0, 0)
        return min(conn, self.initial + self.granted.get(stream, 0) - self.sent.get(stream, 0))

    def send_data(self, stream: int, payload: bytes, *, end: bool = False) -> None:
        """One DATA frame, counted against the windows (whether they allow it or not)."""
        self.send(frame(DATA, END_STREAM if end else 0, stream, payload))
        for n in (0, stream):
            self.sent[n] = self.sent.get(n, 0) + len(payload)

    def send_within(self, stream: int, body: bytes, *, end: bool = False, wait: bool = True) -> int:
        """``body`` in DATA frames as the windows allow, reading WINDOW_UPDATEs while they
        are spent (``wait``) or stopping there; how many bytes were sent."""
        at = 0
        while at < len(body):
            n = min(RECV_FRAME, len(body) - at, self.left(stream))
            if n <= 0:
                if not wait:
                    return at
                assert self.read_frame() is not None, "the daemon closed the connection"
                continue
            self.send_data(stream, body[at : at + n], end=end and at + n == len(body))
            at += n
        return at


def test_windows_are_given_back_for_put_data(checked: Served) -> None:
    """The daemon gives its receive windows back as a Put's data arrives (the stream's as
    the handler takes it): a bare client that sends only within the windows it was
    given puts more than either window."""
    value = blob(12_000, RECV_WINDOW + 3 * MiB)
    body = put_body([(pk(12_000), value)], frame_bytes=4 * MiB)
    with WindowedH2(checked.port) as h:
        h.ready()
        assert h.initial == STREAM_RECV_WINDOW
        open_put(h, 1)
        h.send_within(1, body)
        assert h.granted.get(1, 0) > 0
        h.send(frame(DATA, END_STREAM, 1))
        assert_put(h.finish(1), [pk(12_000)])
    assert both_ports(checked, [pk(12_000)]) == [value]


def _slots(tmp_path: Path, slots: int) -> DaemonProcess:
    """A daemon with ``slots`` streams in all (on the listener, per connection too); a
    stream past them waits for one (up to 60 s)."""
    return DaemonProcess(tmp_path, cpu_only("256MiB", max_concurrent_streams=slots, limits={"stream_wait_s": 60}))


def _listener(d: DaemonProcess) -> int:
    port = discover(d.address)
    assert port is not None
    return port


def _hold(h: WindowedH2, stream: int, k: str, value: bytes) -> bytes:
    """Open a Put of ``value`` on ``stream`` and send its header and first 64 KiB; the rest."""
    body = put_body([(k, value)])
    h.ready()
    open_put(h, stream)
    h.send_data(stream, body[: 64 << 10])
    return body[64 << 10 :]


def test_a_put_waiting_for_a_slot_holds_back_only_its_own_stream(tmp_path: Path) -> None:
    """Every stream slot taken (two Puts, one on each connection); a third Put, on the
    second connection, waits for one and its client sends all its window allows.  The
    other Put on that connection still finishes at once (its data is read: only the
    waiting stream's window is spent); then the waiting Put gets its slot, its window
    back as its handler takes the data, and finishes.  (When a waiting Put could hold a
    queue past which the connection stopped reading, the other Put waited for the
    waiting one's 60 s to run out.)"""
    a, b, c = blob(13_000, 2 * MiB), blob(13_001, 3 * MiB), blob(13_002, 12 * MiB)
    with _slots(tmp_path / "d", 2) as d:
        port = _listener(d)
        with WindowedH2(port) as x, WindowedH2(port) as y:
            rest_a = _hold(x, 1, pk(13_000), a)
            rest_b = _hold(y, 1, pk(13_001), b)
            x.ping()
            y.ping()
            time.sleep(0.3)  # both handlers started and took their slots
            body_c = put_body([(pk(13_002), c)], frame_bytes=4 * MiB)
            open_put(y, 3)
            sent = y.send_within(3, body_c, wait=False)
            assert sent == y.initial == STREAM_RECV_WINDOW  # a window's worth, not all 12 MiB
            y.ping()
            started = time.monotonic()
            y.send_within(1, rest_b, end=True)
            assert_put(y.finish(1, timeout=10), [pk(13_001)])
            assert time.monotonic() - started < 10
            y.send_within(3, body_c[sent:], end=True)  # stream 1's slot went to it: its window grows
            assert_put(y.finish(3), [pk(13_002)])
            x.send_within(1, rest_a, end=True)
            assert_put(x.finish(1), [pk(13_000)])
        with channel(d.address) as ch:
            assert raw_get(stub(ch), [pk(13_000), pk(13_001), pk(13_002)]) == [a, b, c]
        assert "Traceback" not in d.log()


def test_data_past_a_put_streams_window_resets_that_stream_only(tmp_path: Path) -> None:
    """A client that sends a waiting Put more than its stream window gets RST_STREAM
    (FLOW_CONTROL_ERROR) on that stream; nothing of it is stored, and the connection
    and the daemon go on serving."""
    a, c = blob(14_000, MiB), blob(14_001, 10 * MiB)
    with _slots(tmp_path / "d", 1) as d:
        port = _listener(d)
        with WindowedH2(port) as x, WindowedH2(port) as y:
            rest_a = _hold(x, 1, pk(14_000), a)
            x.ping()
            time.sleep(0.3)  # its handler started and took the slot
            body_c = put_body([(pk(14_001), c)])
            y.ready()
            assert y.initial == STREAM_RECV_WINDOW
            r = open_put(y, 1)
            for at in range(0, STREAM_RECV_WINDOW + MiB, MiB):  # a MiB past the window
                y.send_data(1, body_c[at : at + MiB])
            y.pump(lambda: r.reset is not None)
            assert r.reset == FLOW_CONTROL_ERROR and not r.ended
            x.send_within(1, rest_a, end=True)
            assert_put(x.finish(1), [pk(14_000)])
            open_put(y, 3)  # the connection goes on
            y.send_within(3, put_body([(pk(14_002), b"ok")]), end=True)
            assert_put(y.finish(3), [pk(14_002)])
        with channel(d.address) as ch:
            assert raw_get(stub(ch), [pk(14_000), pk(14_001), pk(14_002)]) == [a, None, b"ok"]
        assert "Traceback" not in d.log()


def test_a_memory_bound_narrows_the_put_window(tmp_path: Path) -> None:
    """With server.limits.max_memory set, each stream's window is what the daemon charges
    each Put stream (its transport allowance: 64 KiB and two messages of
    server.frame_bytes, with slack), and puts larger than it still go through."""
    want = stream_allowance(MiB)
    assert want < STREAM_RECV_WINDOW
    value = blob(15_000, 6 * MiB + 5)
    config = cpu_only("256MiB", frame_bytes=MiB, limits={"max_memory": "1GiB"})
    with DaemonProcess(tmp_path / "d", config) as d:
        with WindowedH2(_listener(d)) as h:
            h.ready()
            assert h.initial == want
            open_put(h, 1)
            h.send_within(1, put_body([(pk(15_000), value)]), end=True)
            assert_put(h.finish(1), [pk(15_000)])
            assert h.granted.get(1, 0) >= len(value) - want
        with kvstore.Client(d.address, shm=False) as cl:  # the sync client keeps to it as well
            cl.put(pk(15_001), value)
            assert cl.http2_puts == 1
            assert cl.get_bytes(pk(15_001)) == value
            assert cl.get_bytes(pk(15_000)) == value
