"""The sync client's own HTTP/2 connection for gets (kvstore/client/h2get.py),
against real daemons: byte-exact round trips with data written by the raw
stubs and by the client, missing keys, typed errors from the daemon (auth,
bad input, a too small output), deadlines, a daemon that restarts, threads,
and the pieces of the protocol (HPACK literals, data-frame prefixes,
addresses) on their own."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import hpack
import pytest
import torch
import yaml

import kvstore
from kvstore.client.h2channel import parse_address
from kvstore.client.h2get import H2GetConnection
from kvstore.client.h2wire import Target, inline_data_at
from kvstore.http2 import hpack_int as _hpack_int, literal as _literal
from kvstore.server.frames import HeaderWithData, _varint, data_prefix, encode
from kvstore.errors import DeadlineExceeded, InvalidArgument, PermissionDenied, Unauthenticated
from kvstore.v1 import kvstore_pb2 as pb
from tests.server import MiB, bearer, blob, channel, key, raw_put, stub
from tests.support.daemon import DaemonProcess, cpu_only
from tests.support.threads import run_workers

SIZES = [0, 1, 4095, MiB + 3, 9 * MiB + 1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with DaemonProcess(tmp_path_factory.mktemp("h2get"), cpu_only("256MiB")) as d:
        with channel(d.address) as ch:  # written by a standard gRPC client
            raw_put(stub(ch), [(key(i, model="h2"), blob(i, n)) for i, n in enumerate(SIZES)])
        yield d


@pytest.mark.parametrize(("i", "size"), list(enumerate(SIZES)))
def test_gets_are_byte_exact_and_take_the_http2_connection(server: DaemonProcess, i: int, size: int) -> None:
    with kvstore.Client(server.address, shm=False) as c:
        assert c.get_bytes(key(i, model="h2")) == blob(i, size)
        out = torch.full((size + 7,), 0xAB, dtype=torch.uint8)
        meta = c.get_into(key(i, model="h2"), out)
        assert meta is not None and meta.nbytes == size
        assert bytes(out[:size].numpy()) == blob(i, size)
        assert bool((out[size:] == 0xAB).all())  # nothing written past the chunk
        assert c.http2_gets == 2


def test_get_many_keeps_order_and_reports_missing_keys(server: DaemonProcess) -> None:
    keys = [key(4, model="h2"), key(99, model="h2"), key(1, model="h2"), key(4, model="h2")]
    with kvstore.Client(server.address, shm=False) as c:
        got = c.get_many(keys)
        assert [None if g is None else bytes(g.data) for g in got] == [
            blob(4, SIZES[4]), None, blob(1, SIZES[1]), blob(4, SIZES[4])
        ]
        assert c.get(key(99, model="h2")) is None
        assert c.get_into(key(99, model="h2"), torch.empty(8, dtype=torch.uint8)) is None
        assert c.http2_gets == 3


def test_tensors_written_by_the_client_come_back_bit_exact(server: DaemonProcess) -> None:
    with kvstore.Client(server.address, shm=False) as c:
        for n, dtype in enumerate((torch.bfloat16, torch.float16, torch.float32)):
            t = torch.randn(3, 257, 5, generator=torch.Generator().manual_seed(n)).to(dtype)
            c.put(key(n, model="h2-tensor"), t)
            back = c.get_tensor(key(n, model="h2-tensor"))
            assert back is not None and back.dtype == dtype and back.shape == t.shape
            assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))
        assert c.http2_gets == 3


def test_an_output_too_small_is_refused_and_the_next_get_works(server: DaemonProcess) -> None:
    with kvstore.Client(server.address, shm=False) as c:
        with pytest.raises(InvalidArgument, match="room for 100 bytes"):
            c.get_into(key(3, model="h2"), torch.empty(100, dtype=torch.uint8))
        # The half-read reply closed that connection; the next get opens a new one.
        assert c.get_bytes(key(3, model="h2")) == blob(3, SIZES[3])
        assert c.http2_gets == 1


def test_bad_input_gets_the_daemons_status(server: DaemonProcess) -> None:
    with kvstore.Client(server.address, shm=False) as c:
        # A key the client itself would refuse, so that the daemon's check answers.
        with pytest.raises(InvalidArgument, match="keys\\[1\\]"):
            c._h2_get([key(0, model="h2"), "not-a-key"], None)  # noqa: SLF001
        assert c.get_bytes(key(2, model="h2")) == blob(2, SIZES[2])


def test_turned_off_goes_through_grpcio(server: DaemonProcess) -> None:
    with kvstore.Client(server.address, shm=False, http2_get=False) as c:
        assert c.get_bytes(key(2, model="h2")) == blob(2, SIZES[2])
        assert c.http2_gets == 0
    with pytest.raises(InvalidArgument, match="http2_get"):
        kvstore.Client(server.address, http2_get="yes")  # type: ignore[arg-type]


def test_threads_share_one_client(server: DaemonProcess) -> None:
    with kvstore.Client(server.address, shm=False) as c:

        def work(w: int) -> None:
            for j in range(12):
                i = (w + j) % len(SIZES)
                assert c.get_bytes(key(i, model="h2")) == blob(i, SIZES[i])

        run_workers(work, 4)
        assert c.http2_gets > 0  # the others went through grpcio while it was busy


# -- auth ------------------------------------------------------------------------------------------
def test_tokens_and_tenants(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": [
        {"token": "a-reader-token-0123456789", "tenant": "a", "role": "read"},
        {"token": "b-writer-token-0123456789", "tenant": "b", "role": "readwrite"},
    ]}))
    with DaemonProcess(tmp_path / "d", cpu_only("16MiB", token_file=str(tokens))) as d:
        b_key = key(1, tenant="b")
        with channel(d.address) as ch:
            raw_put(stub(ch), [(b_key, blob(1, 3 * MiB))], metadata=bearer("b-writer-token-0123456789"))
        with kvstore.Client(d.address, shm=False, token="b-writer-token-0123456789") as b:
            assert b.get_bytes(b_key) == blob(1, 3 * MiB)
            assert b.http2_gets == 1
        with kvstore.Client(d.address, shm=False, token="a-reader-token-0123456789") as a:
            with pytest.raises(PermissionDenied, match="tenant 'b'"):
                a.get(b_key)
        with kvstore.Client(d.address, shm=False) as anon:
            with pytest.raises(Unauthenticated):
                anon.get(b_key)


# -- connections -----------------------------------------------------------------------------------
def test_a_daemon_that_restarts(tmp_path: Path) -> None:
    """The idle connection does not hold up the daemon's graceful stop (it waits up to
    20 s for a PING's answer); the next get opens a new connection."""
    first = DaemonProcess(tmp_path / "a", cpu_only("16MiB")).start()
    port = first.port
    try:
        c = kvstore.Client(first.address, shm=False, timeout_s=20)
        c.put(key(1, model="restart"), blob(1, MiB))
        assert c.get_bytes(key(1, model="restart")) == blob(1, MiB)
        assert c.http2_gets == 1
        time.sleep(0.3)  # idle
    finally:
        t0 = time.monotonic()
        first.stop()
    assert time.monotonic() - t0 < 10
    with c, DaemonProcess(tmp_path / "b", cpu_only("16MiB", port=port)) as second:
        assert second.port == port
        c.put(key(2, model="restart"), blob(2, MiB))
        assert c.get_bytes(key(2, model="restart")) == blob(2, MiB)
        assert c.get_bytes(key(2, model="restart")) == blob(2, MiB)
        assert c.get(key(1, model="restart")) is None  # the new daemon never had it
        assert c.http2_gets >= 3


def test_a_daemon_that_never_answers_hits_the_deadline() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        host, port = listener.getsockname()
        conn = H2GetConnection(Target(host, port))
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="within 0.3 s"):
            conn.get(pb.GetRequest(keys=[key(1)]), metadata=(), timeout_s=0.3,
                     destination=lambda h: memoryview(bytearray(h.meta.nbytes)))
        assert time.monotonic() - t0 < 5
        assert conn.broken


# -- protocol pieces -------------------------------------------------------------------------------
def test_hpack_literals_decode_as_sent() -> None:
    headers = [(":path", "/kvstore.v1.KVStore/Get"), ("authorization", "Bearer " + "x" * 300), ("te", "trailers")]
    block = b"\x83\x86" + b"".join(_literal(k, v) for k, v in headers)
    assert hpack.Decoder().decode(block) == [(":method", "POST"), (":scheme", "http"), *headers]
    assert _hpack_int(10, 5) == b"\x0a" and _hpack_int(1337, 5) == b"\x1f\x9a\x0a"  # RFC 7541 C.1


def test_data_frame_prefixes() -> None:
    for n in (0, 1, 127, 128, 1 << 20, (64 << 20) + 5):
        raw = pb.GetFrame(data=b"\0" * n).SerializeToString() if n < 4096 else None
        if raw is not None:
            assert data_prefix(raw[:11]) == (n, len(raw) - n)
    assert data_prefix(b"\x12\x80\x80\x04") == (1 << 16, 4)
    assert data_prefix(pb.GetFrame(header=pb.GetHeader(key="k")).SerializeToString()) == (None, 0)
    assert data_prefix(b"\x12\x80") == (None, 0)  # varint cut short


@pytest.mark.parametrize("n", [0, 1, 127, 128, 5000, 1 << 20])
def test_a_header_with_inline_data_is_found_in_its_first_bytes(n: int) -> None:
    header = pb.GetHeader(index=3, key="t/m/" + "f" * 16 + "/s" + "0" * 64, found=True, meta=pb.ChunkMeta(nbytes=n + 9))
    data = bytes(range(256)) * (n // 256) + bytes(n % 256)
    raw = encode(HeaderWithData(header, memoryview(data)))
    parsed = pb.GetFrame.FromString(raw)  # what any gRPC client reads
    assert parsed.header.data == data and parsed.header.key == header.key and parsed.header.meta.nbytes == n + 9
    fields_at, data_at, length = inline_data_at(raw[:4096], len(raw)) or (0, 0, -1)
    assert length == n and raw[data_at:] == data
    assert pb.GetHeader.FromString(raw[fields_at : data_at - 1 - len(_varint(n))]) == header


def test_other_layouts_are_left_to_the_whole_message_parse() -> None:
    header = pb.GetHeader(index=1, key="k", found=True)
    # data first, then the other fields: a valid GetHeader, but not the daemon's layout
    body = b"\x2a\x03abc" + header.SerializeToString()
    raw = b"\x0a" + bytes([len(body)]) + body
    assert pb.GetFrame.FromString(raw).header.data == b"abc"
    assert inline_data_at(raw[:4], len(raw)) is None
    assert inline_data_at(raw, len(raw) + 1) is None  # the frame's length disagrees
    assert inline_data_at(b"\x12\x03abc", 5) is None  # a data frame
    assert inline_data_at(b"\x0a", 9) is None  # cut short


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("127.0.0.1:51061", ("127.0.0.1", 51061)),
        ("localhost:1", ("localhost", 1)),
        ("[::1]:80", ("::1", 80)),
        ("::1:80", None),
        ("dns:///host:1", None),
        ("unix:/tmp/sock", None),
        ("host", None),
        ("host:port", None),
    ],
)
def test_addresses(address: str, parsed: tuple[str, int] | None) -> None:
    assert parse_address(address) == parsed
