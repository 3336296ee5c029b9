"""Direct writes (kvstore/server/direct_writes.py) of a real daemon, over the
control channel's wire format with a plain socket: what a client never sends
(blocks it does not hold, sizes that do not match, too many reservations,
malformed requests), what the daemon offers to whom, and where reserved
blocks go when a connection ends; requests whose checksums follow them (an
``S`` message): nothing stored before it, a refused request or a bad ``S``
leaves the connection in step or closes it, and nothing leaks.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.admin.client import AdminClient
from kvstore.chunk import checksum
from kvstore.server.direct_writes import MAX_HELD, SUMS
from kvstore.server.shm_channel import HEADER, KIND_ATTACH, KIND_GET, KIND_OK, KIND_SUMS, KIND_WRITE
from kvstore.tiers.shared_arena import DESCRIPTION, SUMS_FOLLOW, SUPPORTED, WRITABLE
from kvstore.v1 import kvstore_pb2 as pb
from tests.server import MiB, blob, channel, key, stub
from tests.server.test_shm_channel import Registered, call, error_of, is_closed, read
from tests.support.daemon import DaemonProcess, cpu_and_disk, cpu_only
from tests.support.metrics import free_port, scrape

pytestmark = pytest.mark.skipif(not SUPPORTED, reason="the shared arena is offered on x86-64 only")


class Writer:
    """A registered segment's control connection with the arena attached (writable)."""

    def __init__(self, address: str, *, ask: bool = True) -> None:
        self.reg = Registered(address, "")
        self.sock = self.reg.connect()
        self.sock.sendall(HEADER.pack(2, KIND_ATTACH) + b"\x01" if ask else HEADER.pack(1, KIND_ATTACH))
        msg, fds, _flags, _addr = socket.recv_fds(self.sock, HEADER.size + DESCRIPTION.size, 2)
        assert HEADER.unpack_from(msg)[1] == KIND_OK and len(fds) == 2
        self.arena_bytes, _index_bytes, self.flags = DESCRIPTION.unpack(msg[HEADER.size :])
        self.arena_fd, self.index_fd = fds
        self.map: mmap.mmap | None = None
        if self.flags & WRITABLE:
            self.map = mmap.mmap(self.arena_fd, self.arena_bytes)

    def request(self, **fields: object) -> tuple[int, bytes]:
        return call(self.sock, KIND_WRITE, pb.ArenaPutRequest(**fields).SerializeToString())

    def ok(self, **fields: object) -> pb.ArenaPutReply:
        kind, body = self.request(**fields)
        assert kind == KIND_OK, error_of((kind, body))
        return pb.ArenaPutReply.FromString(body)

    def send(self, kind: int, body: bytes) -> None:
        self.sock.sendall(HEADER.pack(len(body) + 1, kind) + body)

    def follow(self, **fields: object) -> None:
        """Send a request with ``checksums_follow`` (its reply comes after the S)."""
        self.send(KIND_WRITE, pb.ArenaPutRequest(**fields, checksums_follow=True).SerializeToString())

    def sums(self, *blocks: bytes) -> tuple[int, bytes]:
        """Send the S of the request before (the checksums of ``blocks``); its reply."""
        self.send(KIND_SUMS, b"".join(SUMS.pack(checksum(b), 7) for b in blocks))
        return read(self.sock)

    def reserve(self, n: int) -> int:
        reply = self.ok(reserve=[n])
        assert len(reply.reserved) == 1
        return reply.reserved[0]

    def write(self, offset: int, data: bytes) -> None:
        assert self.map is not None
        self.map[offset : offset + len(data)] = data

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
        self.sock.close()
        for fd in (self.arena_fd, self.index_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.reg.close()


def item(k: str, data: bytes, offset: int, **meta: object) -> pb.ArenaPutItem:
    fields: dict[str, object] = {"nbytes": len(data), "checksum": checksum(data), **meta}
    return pb.ArenaPutItem(key=k, meta=pb.ChunkMeta(**fields), offset=offset)


def get(address: str, k: str) -> bytes | None:
    with channel(address) as ch:
        frames = list(stub(ch).Get(pb.GetRequest(keys=[k]), timeout=10))
    header = frames[0].header
    if not header.found:
        return None
    return header.data + b"".join(f.data for f in frames[1:])


def used(address: str) -> int:
    with AdminClient(address) as admin:
        return next(t.used_bytes for t in admin.stats().tiers if t.name == "cpu")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with DaemonProcess(tmp_path_factory.mktemp("dw"), cpu_only("64MiB", max_chunk_bytes=8 * MiB)) as d:
        yield d


@pytest.fixture
def writer(daemon: DaemonProcess) -> Iterator[Writer]:
    w = Writer(daemon.address)
    try:
        yield w
    finally:
        w.close()


def test_a_written_block_becomes_the_keys_chunk(daemon: DaemonProcess, writer: Writer) -> None:
    assert writer.flags & WRITABLE
    data = blob(1, 300_000)
    off = writer.reserve(len(data))
    writer.write(off, data)
    k = key(1, model="dw")
    reply = writer.ok(items=[item(k, data, off)], reserve=[len(data)])
    assert [r.tier for r in reply.results] == ["cpu"]
    assert len(reply.reserved) == 1 and reply.reserved[0] != off  # the next block
    assert get(daemon.address, k) == data
    # The next put into the block reserved with it replaces the value.
    new = blob(2, 300_000)
    writer.write(reply.reserved[0], new)
    writer.ok(items=[item(k, new, reply.reserved[0])])
    assert get(daemon.address, k) == new


def test_requests_naming_blocks_not_held_store_nothing(daemon: DaemonProcess, writer: Writer) -> None:
    data = blob(3, 4096)
    off = writer.reserve(len(data))
    writer.write(off, data)
    k = key(3, model="dw")
    for bad, status, words in [
        (dict(items=[item(k, data, off + 8192)]), "INVALID_ARGUMENT", "holds no block"),
        (dict(items=[item(k, data[:100], off)]), "INVALID_ARGUMENT", "differs from the block"),
        (dict(items=[item(k, data, off), item(key(4, model="dw"), data, off)]), "INVALID_ARGUMENT", "holds no block"),
        (dict(items=[item(k, data, off)], release=[off]), "INVALID_ARGUMENT", "holds no block"),
        (dict(items=[item("not a key", data, off)]), "INVALID_ARGUMENT", "key"),
        (dict(items=[item(k, data, off, dtype="complex7")]), "INVALID_ARGUMENT", "dtype"),
        (dict(reserve=[100, 8 * MiB + 1]), "RESOURCE_EXHAUSTED", "reserve[1]: 8388609 bytes exceeds the daemon's max_chunk_bytes"),
        (dict(reserve=[100, 0]), "INVALID_ARGUMENT", "reserve[1]: a block of 0 bytes"),
        (dict(items=[item(k, data, off)], reserve=[1] * (MAX_HELD + 1)), "RESOURCE_EXHAUSTED", "at most"),
    ]:
        got_status, message = error_of(writer.request(**bad))
        assert got_status == status, bad
        assert words in message, bad
        assert get(daemon.address, k) is None
    # The block is still this connection's: the good request goes through.
    writer.ok(items=[item(k, data, off)])
    assert get(daemon.address, k) == data
    # ... and is the chunk's now: a second put into it is refused.
    assert "holds no block" in error_of(writer.request(items=[item(key(5, model="dw"), data, off)]))[1]


def test_checksums_that_follow_the_request(daemon: DaemonProcess, writer: Writer) -> None:
    """The request goes first; the block is written after it (the daemon has
    not read it yet), then the S: the chunk is the bytes written, with the
    checksum of the S, and the reply reserves the next block."""
    assert writer.flags & SUMS_FOLLOW
    data = blob(11, 300_000)
    off = writer.reserve(len(data))
    k = key(11, model="dw-follow")
    writer.follow(items=[pb.ArenaPutItem(key=k, meta=pb.ChunkMeta(nbytes=len(data)), offset=off)], reserve=[len(data)])
    writer.write(off, data)
    assert get(daemon.address, k) is None  # nothing stored before the S
    kind, body = writer.sums(data)
    assert kind == KIND_OK, error_of((kind, body))
    reply = pb.ArenaPutReply.FromString(body)
    assert [r.tier for r in reply.results] == ["cpu"] and len(reply.reserved) == 1
    assert get(daemon.address, k) == data
    writer.ok(release=list(reply.reserved))


def test_a_refused_request_still_takes_its_checksums(daemon: DaemonProcess, writer: Writer) -> None:
    """A bad request whose checksums follow is answered after its S, so the
    connection stays in step; nothing is stored and the block stays held."""
    data = blob(12, 4096)
    off = writer.reserve(len(data))
    writer.write(off, data)
    k = key(12, model="dw-follow")
    before = used(daemon.address)
    for bad_key in ("not a key", k):
        fields = dict(items=[pb.ArenaPutItem(key=bad_key, meta=pb.ChunkMeta(nbytes=len(data) + 1), offset=off)],
                      reserve=[4096])
        writer.follow(**fields)
        status, message = error_of(writer.sums(data))
        assert status == "INVALID_ARGUMENT" and ("key" in message or "differs from the block" in message), message
        assert get(daemon.address, k) is None and used(daemon.address) == before  # no block reserved ahead either
    writer.follow(items=[pb.ArenaPutItem(key=k, meta=pb.ChunkMeta(nbytes=len(data)), offset=off)])
    assert writer.sums(data)[0] == KIND_OK
    assert get(daemon.address, k) == data


def test_a_request_refused_for_room_still_takes_its_checksums(daemon: DaemonProcess, writer: Writer) -> None:
    """Refused after its checks (no room for what it reserves): the S is still
    read, the blocks reserved ahead go back, and the connection serves on."""
    before = used(daemon.address)
    writer.follow(reserve=[8 * MiB] * 8)  # 64 MiB: past the reserved share, all or none
    status, message = error_of(writer.sums())
    assert status == "RESOURCE_EXHAUSTED", message
    assert used(daemon.address) == before
    writer.ok(release=[writer.reserve(100)])


def test_checksums_of_the_wrong_length_store_nothing(daemon: DaemonProcess, writer: Writer) -> None:
    """An S that does not have one checksum per item: INVALID_ARGUMENT, nothing
    stored, the blocks reserved ahead given back, the item's block still held."""
    data = blob(13, 8192)
    off = writer.reserve(len(data))
    writer.write(off, data)
    k = key(13, model="dw-follow")
    before = used(daemon.address)
    request = dict(items=[pb.ArenaPutItem(key=k, meta=pb.ChunkMeta(nbytes=len(data)), offset=off)], reserve=[MiB, MiB])
    writer.follow(**request)
    status, message = error_of(writer.sums(data, data))
    assert status == "INVALID_ARGUMENT" and f"expected {SUMS.size} per item" in message
    assert get(daemon.address, k) is None and used(daemon.address) == before
    writer.follow(**request)
    kind, body = writer.sums(data)
    assert kind == KIND_OK and get(daemon.address, k) == data
    writer.ok(release=list(pb.ArenaPutReply.FromString(body).reserved))


@pytest.mark.parametrize("instead", ["another request", "the end of the stream"])
def test_no_checksums_closes_the_connection_and_stores_nothing(daemon: DaemonProcess, instead: str) -> None:
    """Where the S is due, another message gets an error and the connection is
    closed; so does an end of stream: nothing stored, every block given back."""
    before = used(daemon.address)
    w = Writer(daemon.address)
    data = blob(14, 8192)
    k = key(14, model=f"dw-follow-{instead[:3]}")
    try:
        off = w.reserve(len(data))
        w.write(off, data)
        w.follow(items=[pb.ArenaPutItem(key=k, meta=pb.ChunkMeta(nbytes=len(data)), offset=off)], reserve=[MiB])
        if instead == "another request":
            w.send(KIND_GET, b"")
            status, message = error_of(read(w.sock))
            assert status == "INVALID_ARGUMENT" and "checksums (S)" in message
            assert is_closed(w.sock)
        else:
            w.sock.shutdown(socket.SHUT_WR)
            assert is_closed(w.sock)
    finally:
        w.close()
    deadline = time.monotonic() + 10
    while used(daemon.address) != before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert used(daemon.address) == before and get(daemon.address, k) is None


def test_undecodable_requests_get_an_error_and_the_daemon_serves_on(daemon: DaemonProcess, writer: Writer) -> None:
    status, message = error_of(call(writer.sock, KIND_WRITE, b"\xff\xff\xff"))
    assert status == "INVALID_ARGUMENT" and "ArenaPutRequest" in message
    assert writer.reserve(100) >= 0
    writer.ok(release=[writer.reserve(100)])


def test_reservations_are_bounded_and_given_back(daemon: DaemonProcess) -> None:
    before = used(daemon.address)
    w = Writer(daemon.address)
    try:
        blocks = [w.reserve(MiB) for _ in range(MAX_HELD)]
        assert used(daemon.address) == before + MAX_HELD * MiB  # reserved blocks count as used
        status, message = error_of(w.request(reserve=[MiB]))
        assert status == "RESOURCE_EXHAUSTED" and f"would hold {MAX_HELD + 1} blocks, at most {MAX_HELD}" in message
        # Releasing one makes room for one; unknown offsets in release are ignored.
        w.ok(release=[blocks[0], 12345], reserve=[MiB])
        assert used(daemon.address) == before + MAX_HELD * MiB
        w.ok(release=blocks[1:2])
        assert used(daemon.address) == before + (MAX_HELD - 1) * MiB
    finally:
        w.close()
    # The connection ended: the daemon takes back what it still held (when it sees the end).
    deadline = time.monotonic() + 10
    while used(daemon.address) != before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert used(daemon.address) == before


def test_reserving_in_a_full_tier_evicts_as_a_put_would(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, cpu_only("8MiB")) as d:
        w = Writer(d.address)
        try:
            keys = [key(i, model="full") for i in range(3)]
            for k in keys:  # 3 x 2 MiB, then a 2 MiB reservation: all 8 MiB
                data = blob(hash(k) % 1000, 2 * MiB)
                off = w.reserve(len(data))
                w.write(off, data)
                w.ok(items=[item(k, data, off)])
            w.reserve(2 * MiB)
            assert all(get(d.address, k) is not None for k in keys)
            w.reserve(2 * MiB)  # the oldest chunk makes room
            assert [get(d.address, k) is not None for k in keys] == [False, True, True]
            status, message = error_of(w.request(reserve=[9 * MiB]))
            assert status == "RESOURCE_EXHAUSTED" and "larger than tier" in message
        finally:
            w.close()


def test_durable_direct_writes_reach_the_disk_tier(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path / "d", cpu_and_disk(tmp_path / "disk", cpu="16MiB", disk="64MiB")) as d:
        w = Writer(d.address)
        try:
            data = blob(9, MiB + 3)
            off = w.reserve(len(data))
            w.write(off, data)
            k = key(9, model="durable")
            w.ok(items=[item(k, data, off)], durable=True)  # answered once the disk tier has it
            with AdminClient(d.address) as admin:
                tiers = {info.key: list(info.tiers) for info in admin.iter_chunks()}
            assert tiers == {k: ["cpu", "disk"]}
            assert get(d.address, k) == data
        finally:
            w.close()


@pytest.mark.parametrize("how", ["config", "not asked", "tokens"])
def test_direct_writes_are_offered_only_when_allowed(tmp_path: Path, how: str) -> None:
    if how != "tokens":
        cfg = cpu_only("16MiB", shm_direct_writes=how != "config")
        with DaemonProcess(tmp_path, cfg) as d:
            w = Writer(d.address, ask=how != "not asked")
            try:
                assert not w.flags & WRITABLE
                with pytest.raises(OSError):  # the descriptor is read-only
                    mmap.mmap(w.arena_fd, w.arena_bytes)
                status, message = error_of(w.request(reserve=[100]))
                why = "shm_direct_writes" if how == "config" else "attach asking for the arena writable"
                assert status == "FAILED_PRECONDITION" and why in message
                assert not is_closed_now(w.sock)
            finally:
                w.close()
    else:
        # With a token file there is no arena to map (tests/server/test_shm_channel.py),
        # and a W request is refused like any other.
        from tests.server.test_shm_channel import A_RW

        tokens = tmp_path / "tokens.yaml"
        tokens.write_text(f"tokens:\n  - {{token: {A_RW}, tenant: a, role: readwrite}}\n")
        with DaemonProcess(tmp_path / "d", cpu_only("16MiB", token_file=str(tokens))) as d:
            reg = Registered(d.address, A_RW)
            try:
                with reg.connect() as sock:
                    body = pb.ArenaPutRequest(reserve=[100]).SerializeToString()
                    status, message = error_of(call(sock, KIND_WRITE, body))
                    assert status == "FAILED_PRECONDITION" and "token file" in message
            finally:
                reg.close()


def is_closed_now(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return is_closed(sock)
    except BlockingIOError:
        return False
    finally:
        sock.setblocking(True)


def test_the_block_reserved_with_a_put_never_evicts_what_it_stored(tmp_path: Path) -> None:
    # The whole tier may be reserved here: a block of more than half of it is the point.
    with DaemonProcess(tmp_path, cpu_only("8MiB", shm_reserved_share=1.0)) as d:
        w = Writer(d.address)
        try:
            k = key(1, model="ahead")
            data = blob(1, 5 * MiB)  # more than half the tier
            off = w.reserve(len(data))
            w.write(off, data)
            reply = w.ok(items=[item(k, data, off)], reserve=[len(data)])
            assert not reply.reserved  # only evicting k would make room
            assert get(d.address, k) == data
            w.reserve(len(data))  # asked alone, it evicts as the next put would
            assert get(d.address, k) is None
        finally:
            w.close()


def test_a_batch_is_handed_over_and_reserved_again_in_one_request(daemon: DaemonProcess, writer: Writer) -> None:
    sizes = [MiB, 3000, MiB]
    offs = list(writer.ok(reserve=sizes).reserved)
    assert len(set(offs)) == 3
    keys = [key(20 + i, model="batch") for i in range(3)]
    datas = [blob(20 + i, n) for i, n in enumerate(sizes)]
    for off, data in zip(offs, datas, strict=True):
        writer.write(off, data)
    reply = writer.ok(items=[item(k, d, o) for k, d, o in zip(keys, datas, offs, strict=True)], reserve=sizes)
    assert [r.key for r in reply.results] == keys and {r.tier for r in reply.results} == {"cpu"}
    assert len(reply.reserved) == 3 and not set(reply.reserved) & set(offs)
    assert [get(daemon.address, k) for k in keys] == datas
    writer.ok(release=list(reply.reserved))


def test_a_batch_reservation_alone_is_all_or_none(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, cpu_only("8MiB")) as d:
        w = Writer(d.address)
        try:
            before = used(d.address)
            status, message = error_of(w.request(reserve=[3 * MiB, 3 * MiB, 3 * MiB]))
            assert status == "RESOURCE_EXHAUSTED", message
            assert used(d.address) == before  # the first two went back
            # With items, as many as evict none of them: a prefix.
            k = key(30, model="prefix")
            data = blob(30, 3 * MiB)
            off = w.reserve(len(data))
            w.write(off, data)
            reply = w.ok(items=[item(k, data, off)], reserve=[3 * MiB, 3 * MiB])
            assert len(reply.reserved) == 1  # a second would evict k
            assert get(d.address, k) == data
            assert used(d.address) == before + 6 * MiB
        finally:
            w.close()


def test_all_connections_together_hold_at_most_the_reserved_share(tmp_path: Path) -> None:
    """A 16 MiB tier with shm_reserved_share 0.25: 4 MiB reserved at most,
    whichever connections hold it; a put hands its block over and reserves
    the next within the bound, or stands without it; what a connection held
    is free again once it ends; the gauge follows."""
    port = free_port()
    with DaemonProcess(tmp_path, cpu_only("16MiB", shm_reserved_share=0.25, metrics_port=port)) as d:

        def gauge() -> float:
            return scrape(port)[("kvstore_direct_write_reserved_bytes", ())]

        a, b = Writer(d.address), Writer(d.address)
        try:
            off = a.reserve(3 * MiB)
            status, message = error_of(b.request(reserve=[2 * MiB]))
            assert status == "RESOURCE_EXHAUSTED" and "shm_reserved_share" in message, message
            off_b = b.reserve(MiB)  # up to the bound
            assert gauge() == 4 * MiB
            k, data = key(40, model="share"), blob(40, 3 * MiB)
            a.write(off, data)
            reply = a.ok(items=[item(k, data, off)], reserve=[3 * MiB])  # its block holds k now
            assert len(reply.reserved) == 1 and get(d.address, k) == data
            assert gauge() == 4 * MiB
            # Past the bound, a reservation made with a put is left out of the reply; the put stands.
            k2, data2 = key(41, model="share"), blob(41, MiB)
            b.write(off_b, data2)
            reply = b.ok(items=[item(k2, data2, off_b)], reserve=[2 * MiB])
            assert not reply.reserved and get(d.address, k2) == data2
            assert gauge() == 3 * MiB
        finally:
            a.close()
        try:
            deadline = time.monotonic() + 10
            while gauge() != 0 and time.monotonic() < deadline:  # a's block went back when it ended
                time.sleep(0.02)
            assert gauge() == 0
            b.reserve(4 * MiB)
            assert gauge() == 4 * MiB
        finally:
            b.close()
