"""The shared-memory control channel (kvstore/server/shm_channel.py) of a real daemon.

The clients use it on their own; these tests also speak its wire format with
a plain socket, to send what a client never would: a wrong nonce, requests
before the hello, oversized and malformed messages, other tenants' keys and
segments, slices outside the segment.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

import kvstore
from kvstore.client.shm import ClientSegment
from kvstore.admin.client import AdminClient
from kvstore.server.shm_channel import (
    HEADER,
    HELLO,
    KIND_ATTACH,
    KIND_ERROR,
    KIND_GET,
    KIND_HELLO,
    KIND_OK,
    KIND_PUT,
    KIND_TOUCHED,
    MAX_BODY,
    TOUCH,
)
from kvstore.v1 import kvstore_pb2 as pb
from tests.server import MiB, bearer, blob, channel, key, meta_for, raw_get, stub
from tests.support.daemon import DaemonProcess, cpu_only

A_RW = "token-of-tenant-a-readwrite"
B_RW = "token-of-tenant-b-readwrite"


@pytest.fixture(scope="module")
def authd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    work = tmp_path_factory.mktemp("shmctl")
    tokens = work / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump(
            {"tokens": [{"token": A_RW, "tenant": "a", "role": "readwrite"}, {"token": B_RW, "tenant": "b", "role": "readwrite"}]}
        )
    )
    with DaemonProcess(work / "d", cpu_only("64MiB", token_file=str(tokens))) as d:
        yield d


class Registered:
    """A segment registered over gRPC by ``token``'s tenant, and its control socket."""

    def __init__(self, address: str, token: str, size: int = 1 << 20) -> None:
        self.seg = ClientSegment(size)
        with channel(address) as ch:
            req = pb.RegisterSegmentRequest(name=self.seg.name, size=self.seg.size, nonce=self.seg.nonce)
            reply = stub(ch).RegisterSegment(req, metadata=bearer(token), timeout=10)
        self.seg.segment_id = reply.segment_id
        self.path = reply.control_socket

    def connect(self, *, hello: bool = True) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(self.path)
        if hello:
            assert call(sock, KIND_HELLO, HELLO.pack(self.seg.segment_id, self.seg.nonce)) == (KIND_OK, b"")
        return sock

    def close(self) -> None:
        self.seg.close()


def call(sock: socket.socket, kind: int, body: bytes) -> tuple[int, bytes]:
    sock.sendall(HEADER.pack(len(body) + 1, kind) + body)
    return read(sock)


def read(sock: socket.socket) -> tuple[int, bytes]:
    head = recv_exactly(sock, HEADER.size)
    length, kind = HEADER.unpack(head)
    return kind, recv_exactly(sock, length - 1)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        part = sock.recv(n - len(out))
        if not part:
            raise ConnectionError("closed")
        out += part
    return out


def error_of(reply: tuple[int, bytes]) -> tuple[str, str]:
    kind, body = reply
    assert kind == KIND_ERROR, reply
    status, _, message = body.decode().partition("\n")
    return status, message


def is_closed(sock: socket.socket) -> bool:
    return sock.recv(1) == b""


def put_req(seg: ClientSegment, k: str, data: bytes, offset: int = 4096) -> bytes:
    seg.view(offset, len(data)).copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    item = pb.ShmPutItem(
        key=k, meta=meta_for(data), slice=pb.ShmSlice(segment_id=seg.segment_id, offset=offset, length=len(data))
    )
    return pb.ShmPutRequest(items=[item]).SerializeToString()


def get_req(seg_id: int, k: str, offset: int = 4096, length: int = 1 << 16) -> bytes:
    sl = pb.ShmSlice(segment_id=seg_id, offset=offset, length=length)
    return pb.ShmGetRequest(items=[pb.ShmGetItem(key=k, slice=sl)]).SerializeToString()


# -- the clients use it ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 4095, 70_000, 3 * MiB + 7])
def test_clients_round_trip_through_the_channel(authd: DaemonProcess, size: int) -> None:
    k = key(size, tenant="a", model="chan")
    with kvstore.Client(authd.address, token=A_RW, shm=True) as c:
        c.put(k, blob(size, size))
        assert c._aio._local.control is not None  # noqa: SLF001 - which path carried it is under test
        assert c.get_bytes(k) == blob(size, size)
        t = torch.arange(size // 2 + 1, dtype=torch.bfloat16)
        c.put(k, t)
        got = c.get_tensor(k)
        assert got is not None and got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), t.view(torch.int16))


def test_a_broken_channel_falls_back_to_grpc(authd: DaemonProcess) -> None:
    k = key(1, tenant="a", model="broken")
    with kvstore.Client(authd.address, token=A_RW, shm=True) as c:
        c.put(k, blob(1, 2 * MiB))
        ctl = c._aio._local.control  # noqa: SLF001
        assert ctl is not None
        ctl._writer.transport.abort()  # noqa: SLF001 - the connection dies under the client
        c.put(k, blob(2, 2 * MiB))  # over gRPC ShmPut, same segment
        assert c._aio._local.control is None and c.uses_shm  # noqa: SLF001
        assert c.get_bytes(k) == blob(2, 2 * MiB)


# -- what a client never sends --------------------------------------------------------------------------
def test_hello_needs_the_segments_id_and_nonce(authd: DaemonProcess) -> None:
    reg = Registered(authd.address, A_RW)
    try:
        assert reg.path
        with reg.connect(hello=False) as sock:
            status, msg = error_of(call(sock, KIND_HELLO, HELLO.pack(reg.seg.segment_id, b"\0" * 16)))
            assert status == "PERMISSION_DENIED" and "wrong nonce" in msg
            assert is_closed(sock)
        with reg.connect(hello=False) as sock:
            assert error_of(call(sock, KIND_HELLO, b"short"))[0] == "INVALID_ARGUMENT"
        with reg.connect(hello=False) as sock:
            status, msg = error_of(call(sock, KIND_GET, get_req(reg.seg.segment_id, key(1, tenant="a"))))
            assert status == "INVALID_ARGUMENT" and "hello" in msg
            assert is_closed(sock)
        with reg.connect() as sock:  # the right nonce
            assert error_of(call(sock, KIND_HELLO, HELLO.pack(reg.seg.segment_id, reg.seg.nonce)))[0] == "INVALID_ARGUMENT"
    finally:
        reg.close()


def test_malformed_messages_get_an_error_and_the_daemon_serves_on(authd: DaemonProcess) -> None:
    reg = Registered(authd.address, A_RW)
    try:
        with reg.connect() as sock:
            # An undecodable request keeps the framing: error, connection stays.
            status, msg = error_of(call(sock, KIND_PUT, b"\xff\xff\xff"))
            assert status == "INVALID_ARGUMENT" and "malformed ShmPutRequest" in msg
            assert call(sock, KIND_PUT, put_req(reg.seg, key(5, tenant="a", model="mal"), b"ok"))[0] == KIND_OK
            # An unknown kind or an oversized length loses it: error, connection closed.
            assert "unknown message kind" in error_of(call(sock, ord("Z"), b""))[1]
            assert is_closed(sock)
        with reg.connect() as sock:
            sock.sendall(struct.pack("<IB", MAX_BODY + 2, KIND_PUT))
            assert "at most" in error_of(read(sock))[1]
            assert is_closed(sock)
        with channel(authd.address) as ch:
            assert raw_get(stub(ch), [key(5, tenant="a", model="mal")], metadata=bearer(A_RW)) == [b"ok"]
    finally:
        reg.close()


def test_the_channel_acts_for_the_segments_tenant_only(authd: DaemonProcess) -> None:
    a, b = Registered(authd.address, A_RW), Registered(authd.address, B_RW)
    try:
        with kvstore.Client(authd.address, token=B_RW, shm=False) as cb:
            cb.put(key(1, tenant="b", model="iso"), b"secret of b")
        with a.connect() as sock:
            # Tenant b's keys: denied, whatever the slice.
            status, msg = error_of(call(sock, KIND_GET, get_req(a.seg.segment_id, key(1, tenant="b", model="iso"))))
            assert status == "PERMISSION_DENIED" and "tenant 'a'" in msg
            status, _ = error_of(call(sock, KIND_PUT, put_req(a.seg, key(2, tenant="b", model="iso"), b"x")))
            assert status == "PERMISSION_DENIED"
            # Tenant b's segment, named by id from a's connection: denied.
            status, msg = error_of(call(sock, KIND_GET, get_req(b.seg.segment_id, key(1, tenant="a", model="iso"))))
            assert status == "PERMISSION_DENIED" and "another tenant" in msg
            # Slices outside a's own segment: refused, nothing read or written.
            for offset, length in ((a.seg.size - 10, 100), (-1 & 0xFFFFFFFFFFFFFFFF, 10)):
                status, msg = error_of(call(sock, KIND_GET, get_req(a.seg.segment_id, key(1, tenant="a"), offset, length)))
                assert status == "INVALID_ARGUMENT" and "outside segment" in msg
            assert call(sock, KIND_PUT, put_req(a.seg, key(3, tenant="a", model="iso"), b"mine"))[0] == KIND_OK
        with kvstore.Client(authd.address, token=B_RW, shm=False) as cb:
            assert cb.get_bytes(key(1, tenant="b", model="iso")) == b"secret of b"
            assert cb.exists([key(2, tenant="b", model="iso")]) == [False]
    finally:
        a.close()
        b.close()


# -- direct reads: attach and touched ---------------------------------------------------------------------
def test_a_daemon_with_tokens_does_not_share_its_memory(authd: DaemonProcess) -> None:
    reg = Registered(authd.address, A_RW)
    try:
        with reg.connect() as sock:
            sock.sendall(HEADER.pack(1, KIND_ATTACH))
            msg, fds, _flags, _addr = socket.recv_fds(sock, 4096, 2)
            assert fds == []
            kind, body = HEADER.unpack_from(msg)[1], msg[HEADER.size :]
            status, message = error_of((kind, body))
            assert status == "FAILED_PRECONDITION" and "token file" in message
            # The connection serves on.
            assert call(sock, KIND_PUT, put_req(reg.seg, key(6, tenant="a", model="att"), b"ok"))[0] == KIND_OK
        with reg.connect(hello=False) as sock:  # before the hello: refused like any request
            assert "send a hello" in error_of(call(sock, KIND_ATTACH, b""))[1]
            assert is_closed(sock)
    finally:
        reg.close()


def test_touched_messages_are_checked(tmp_path: Path) -> None:
    """A well-formed ``T`` gets no reply and counts only keys the tier holds; a
    malformed one closes the connection (it has no reply to carry an error)."""
    with DaemonProcess(tmp_path, cpu_only("64MiB")) as d:
        reg = Registered(d.address, "")
        try:
            k = key(1, model="touch")
            with reg.connect() as sock:
                assert call(sock, KIND_PUT, put_req(reg.seg, k, b"v" * 100))[0] == KIND_OK
                good = b"".join(TOUCH.pack(7, len(t)) + t for t in (k.encode(), b"not a key", key(2).encode()))
                sock.sendall(HEADER.pack(len(good) + 1, KIND_TOUCHED) + good)
                assert call(sock, KIND_GET, get_req(reg.seg.segment_id, k))[0] == KIND_OK  # no reply came between
                sock.sendall(HEADER.pack(4, KIND_TOUCHED) + TOUCH.pack(1, 50)[:3])
                assert is_closed(sock)
            with AdminClient(d.address) as admin:
                stats = admin.stats()
            assert next(t.hits for t in stats.tiers if t.name == "cpu") == 2  # the touch, the get
        finally:
            reg.close()
