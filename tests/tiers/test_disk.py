"""Unit tests of the disk tier: real files, real fsync, fault injection."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import threading
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import blake3
import pytest

from kvstore.chunk import SUM_LEAF, Chunk, ChunkMeta
from kvstore.errors import (
    CapacityError,
    Closed,
    ConfigError,
    CorruptChunk,
    InvalidArgument,
    KVStoreError,
)
from kvstore.keys import ChunkKey, Namespace
from kvstore.tiers.disk import (
    HEADER_BOUND,
    DiskTier,
    decode_header,
    encode_header,
    key_hash,
)
from kvstore.tiers.disk_config import DiskTierConfig

MiB = 1 << 20


def make_key(i: int, tenant: str = "acme", model: str = "org/model-1") -> ChunkKey:
    return ChunkKey(Namespace(tenant, model), "0123456789abcdef", "p" + f"{i:064x}")


def payload(i: int, n: int) -> bytes:
    """Deterministic bytes, different for every (i, n)."""
    return blake3.blake3(f"{i}/{n}".encode()).digest(length=n)


def make_chunk(i: int, n: int = 64 << 10) -> Chunk:
    return Chunk.from_bytes(payload(i, n))


def tier_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".lock")


def temp_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.tmp"))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "disk"


@pytest.fixture(params=[True, False], ids=["direct", "buffered"])
def config(request: pytest.FixtureRequest, root: Path) -> DiskTierConfig:
    return DiskTierConfig(path=root, capacity_bytes=64 * MiB, io_threads=4, direct_reads=request.param)


@pytest.fixture
async def tier(config: DiskTierConfig) -> AsyncIterator[DiskTier]:
    async with DiskTier("disk", config) as t:
        yield t


async def reopened(config: DiskTierConfig) -> DiskTier:
    t = DiskTier("disk", config)
    await t.open()
    return t


# -- basic operations ----------------------------------------------------------


async def test_put_get_roundtrip(tier: DiskTier) -> None:
    c = Chunk.from_bytes(payload(1, 100_000), dtype="float16", shape=(50_000,))
    await tier.put(make_key(1), c)
    got = await tier.get(make_key(1))
    assert got is not None
    assert got.meta == c.meta
    assert bytes(got.payload) == bytes(c.payload)
    assert got._release is None  # a private copy: nothing to release
    got.payload[0] ^= 0xFF  # writable, and changing it changes nothing stored
    again = await tier.get(make_key(1))
    assert again is not None and bytes(again.payload) == bytes(c.payload)
    assert tier.counters.puts == 1 and tier.counters.bytes_written == 100_000
    assert tier.counters.hits == 2 and tier.counters.bytes_read == 2 * 100_000


async def test_empty_payload(tier: DiskTier) -> None:
    await tier.put(make_key(1), Chunk.from_bytes(b""))
    got = await tier.get(make_key(1))
    assert got is not None and got.payload.nbytes == 0


async def test_get_missing_is_a_miss(tier: DiskTier) -> None:
    assert await tier.get(make_key(9)) is None
    assert tier.counters.misses == 1 and tier.counters.hits == 0


async def test_index_views(tier: DiskTier) -> None:
    for i in range(5):
        await tier.put(make_key(i), make_chunk(i, 1000 * (i + 1)))
    assert len(tier) == 5
    assert all(tier.contains(make_key(i)) for i in range(5))
    assert not tier.contains(make_key(5))
    assert await tier.contains_many([make_key(0), make_key(7)]) == [True, False]
    entries = dict(tier.entries())
    assert entries == {make_key(i): 1000 * (i + 1) for i in range(5)}  # payload bytes
    # Capacity counts on-disk bytes: headers included.
    assert tier.used_bytes == sum(tier.path_for(k).stat().st_size for k in entries)
    assert tier.used_bytes > sum(entries.values())
    st = tier.stats()
    assert (st.kind, st.chunks, st.used_bytes, st.capacity_bytes) == ("disk", 5, tier.used_bytes, 64 * MiB)


async def test_delete(tier: DiskTier) -> None:
    await tier.put(make_key(1), make_chunk(1))
    path = tier.path_for(make_key(1))
    assert await tier.delete(make_key(1)) == 64 << 10  # payload bytes
    assert not path.exists() and not tier.contains(make_key(1))
    assert tier.used_bytes == 0 and tier.counters.deletes == 1
    assert await tier.delete(make_key(1)) == 0
    assert await tier.get(make_key(1)) is None


async def test_overwrite_replaces(tier: DiskTier, root: Path) -> None:
    await tier.put(make_key(1), make_chunk(1, 300_000))
    await tier.put(make_key(1), make_chunk(2, 1000))
    got = await tier.get(make_key(1))
    assert got is not None and bytes(got.payload) == payload(2, 1000)
    assert len(tier) == 1
    assert tier_files(root) == [tier.path_for(make_key(1))]
    assert tier.used_bytes == tier.path_for(make_key(1)).stat().st_size


async def test_put_rejects_payload_that_disagrees_with_meta(tier: DiskTier) -> None:
    c = make_chunk(1, 100)
    with pytest.raises(InvalidArgument, match="payload is 50 bytes"):
        await tier.put(make_key(1), Chunk(c.meta, c.payload[:50]))
    assert tier.used_bytes == 0 and tier.fits(64 * MiB - HEADER_BOUND)


async def test_put_accepts_multidimensional_views(tier: DiskTier) -> None:
    raw = payload(3, 4096)
    view = memoryview(raw).cast("B", (64, 64))
    meta = Chunk.from_bytes(raw).meta
    await tier.put(make_key(3), Chunk(meta, view))
    got = await tier.get(make_key(3))
    assert got is not None and bytes(got.payload) == raw


async def test_closed_tier_refuses_operations(config: DiskTierConfig) -> None:
    t = await reopened(config)
    await t.close()
    await t.close()  # idempotent
    with pytest.raises(Closed):
        await t.put(make_key(1), make_chunk(1))
    with pytest.raises(Closed):
        await t.get(make_key(1))
    with pytest.raises(Closed):
        await t.delete(make_key(1))
    with pytest.raises(Closed):
        await t.open()


async def test_directory_is_locked_while_open(tier: DiskTier, config: DiskTierConfig) -> None:
    with pytest.raises(ConfigError, match="disk.path"):
        await reopened(config)


async def test_path_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"x")
    with pytest.raises(ConfigError, match="disk.path"):
        await reopened(DiskTierConfig(path=f, capacity_bytes=MiB))


# -- file names --------------------------------------------------------------


@pytest.mark.parametrize(
    ("tenant", "model"),
    [
        ("acme", "org/model"),
        ("a..b", "x/../../../../etc/passwd"),
        ("t", "m/+/-/_"),
        ("A-b_c.d", "a/./b/+c/.."),
    ],
)
async def test_file_names_come_from_the_hash_only(
    tier: DiskTier, root: Path, tenant: str, model: str
) -> None:
    key = make_key(7, tenant, model)
    await tier.put(key, make_chunk(7, 10))
    h = key_hash(key)
    assert h == blake3.blake3(str(key).encode()).hexdigest()
    expect = root / h[:2] / f"{h[2:]}.kvc"
    assert tier.path_for(key) == expect
    assert tier_files(root) == [expect]
    assert expect.resolve().is_relative_to(root.resolve())
    got = await tier.get(key)
    assert got is not None and bytes(got.payload) == payload(7, 10)


async def test_unvalidated_hostile_key_still_lands_under_root(tier: DiskTier, root: Path) -> None:
    # Keys built on hot paths skip validation (keys._fast_key); names must not depend on it.
    ns = tuple.__new__(Namespace, ("../../..", "/etc/passwd\0"))
    key = tuple.__new__(ChunkKey, (ns, "../..", "/tmp/x"))
    await tier.put(key, make_chunk(1, 10))
    [f] = tier_files(root)
    assert f.resolve().is_relative_to(root.resolve()) and f == tier.path_for(key)
    got = await tier.get(key)
    assert got is not None and bytes(got.payload) == payload(1, 10)


# -- capacity ----------------------------------------------------------------


async def test_capacity_is_enforced(root: Path) -> None:
    cap = 1 * MiB
    async with DiskTier("disk", DiskTierConfig(path=root, capacity_bytes=cap)) as t:
        await t.put(make_key(1), make_chunk(1, 600_000))
        assert not t.fits(600_000)
        with pytest.raises(CapacityError, match="does not fit"):
            await t.put(make_key(2), make_chunk(2, 600_000))
        assert not t.contains(make_key(2)) and temp_files(root) == []
        assert t.used_bytes <= cap
        # An overwrite needs room for the new file while the old one exists.
        with pytest.raises(CapacityError):
            await t.put(make_key(1), make_chunk(3, 600_000))
        got = await t.get(make_key(1))
        assert got is not None and bytes(got.payload) == payload(1, 600_000)
        await t.delete(make_key(1))
        assert t.fits(600_000)
        await t.put(make_key(2), make_chunk(2, 600_000))
        assert t.fits(cap - t.used_bytes - HEADER_BOUND)
        assert not t.fits(cap - t.used_bytes - HEADER_BOUND + 1)


class Gate:
    """Makes one os function block in the tier's threads until opened."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()
        real: Callable[..., Any] = getattr(os, name)

        def gated(*args: Any) -> Any:
            self.entered.set()
            if not self.open.wait(30):
                raise RuntimeError("gate never opened")
            return real(*args)

        monkeypatch.setattr(os, name, gated)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 30)


async def test_fits_counts_puts_in_flight(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with DiskTier("disk", DiskTierConfig(path=root, capacity_bytes=MiB)) as t:
        gate = Gate(monkeypatch, "writev")
        task = asyncio.create_task(t.put(make_key(1), make_chunk(1, 600_000)))
        await gate.wait_entered()
        assert t.used_bytes == 0
        assert not t.fits(600_000)  # reserved by the put in flight
        with pytest.raises(CapacityError):
            await t.put(make_key(2), make_chunk(2, 600_000))
        gate.open.set()
        await task
        assert t.contains(make_key(1)) and not t.fits(600_000)


# -- persistence -------------------------------------------------------------


async def test_reopen_rebuilds_index_from_headers_only(
    config: DiskTierConfig, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with DiskTier("disk", config) as t:
        for i in range(6):
            await t.put(make_key(i), make_chunk(i, 500_000 + i))
        await t.delete(make_key(5))
        before = sorted(t.entries(), key=str)
        used = t.used_bytes
    read_bytes = 0
    real_pread, real_preadv = os.pread, os.preadv

    def counting_pread(fd: int, n: int, off: int) -> bytes:
        nonlocal read_bytes
        data = real_pread(fd, n, off)
        read_bytes += len(data)
        return data

    def counting_preadv(fd: int, bufs: list[memoryview], off: int) -> int:
        nonlocal read_bytes
        n = real_preadv(fd, bufs, off)
        read_bytes += n
        return n

    monkeypatch.setattr(os, "pread", counting_pread)
    monkeypatch.setattr(os, "preadv", counting_preadv)
    t = await reopened(config)
    try:
        assert read_bytes <= 5 * 4096  # one header page per file, no payload
        assert sorted(t.entries(), key=str) == before
        assert t.used_bytes == used and len(t) == 5 and t.counters.corrupt == 0
        for i in range(5):
            got = await t.get(make_key(i))
            assert got is not None and bytes(got.payload) == payload(i, 500_000 + i)
    finally:
        await t.close()


async def test_open_removes_temp_files_and_keeps_foreign_files(config: DiskTierConfig, root: Path) -> None:
    async with DiskTier("disk", config) as t:
        await t.put(make_key(1), make_chunk(1))
    (root / "ab" / ".deadbeef.0123.tmp").write_bytes(b"half a chunk")
    (root / "00" / "x.tmp").write_bytes(b"")
    (root / "README").write_text("not ours")
    (root / "ab" / "notes.txt").write_text("not ours")
    t = await reopened(config)
    try:
        assert temp_files(root) == []
        assert (root / "README").exists() and (root / "ab" / "notes.txt").exists()
        assert len(t) == 1 and t.counters.corrupt == 0
    finally:
        await t.close()


# -- corruption --------------------------------------------------------------


def flip_bit(path: Path, offset_from_end: int) -> None:
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        b = f.read(1)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x10]))


async def test_bit_flip_in_payload_is_dropped_on_get(tier: DiskTier) -> None:
    await tier.put(make_key(1), make_chunk(1, 100_000))
    await tier.put(make_key(2), make_chunk(2, 100_000))
    path = tier.path_for(make_key(1))
    flip_bit(path, 1234)
    assert await tier.get(make_key(1)) is None
    assert tier.counters.corrupt == 1 and tier.counters.misses == 1
    assert not path.exists() and not tier.contains(make_key(1))
    assert tier.used_bytes == tier.path_for(make_key(2)).stat().st_size
    got = await tier.get(make_key(2))  # the rest keeps working
    assert got is not None and bytes(got.payload) == payload(2, 100_000)


@pytest.mark.parametrize("damage", ["header-garbage", "truncated", "extended", "meta-bit", "empty"])
async def test_damaged_file_is_dropped_on_get_and_on_open(
    config: DiskTierConfig, root: Path, damage: str
) -> None:
    async with DiskTier("disk", config) as t:
        await t.put(make_key(1), make_chunk(1, 100_000))
        await t.put(make_key(2), make_chunk(2, 100_000))
    path = t.path_for(make_key(1))

    def spoil() -> None:
        data = path.read_bytes()
        if damage == "header-garbage":
            data = os.urandom(64) + data[64:]
        elif damage == "truncated":
            data = data[:-1000]
        elif damage == "extended":
            data = data + b"\0" * 10
        elif damage == "meta-bit":
            i = data.index(b"KVM1") + 20
            data = data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
        else:
            data = b""
        path.write_bytes(data)

    # Damaged while the tier is closed: found by open() from the header and size.
    spoil()
    t = await reopened(config)
    try:
        assert t.counters.corrupt == 1 and not path.exists()
        assert not t.contains(make_key(1)) and len(t) == 1
        assert await t.get(make_key(1)) is None
        await t.put(make_key(1), make_chunk(1, 100_000))
        # Damaged while open: found by get, never served.
        spoil()
        assert await t.get(make_key(1)) is None
        assert t.counters.corrupt == 2 and not path.exists() and not t.contains(make_key(1))
        got = await t.get(make_key(2))
        assert got is not None and bytes(got.payload) == payload(2, 100_000)
    finally:
        await t.close()


async def test_file_holding_another_key_is_not_served(config: DiskTierConfig) -> None:
    async with DiskTier("disk", config) as t:
        await t.put(make_key(1), make_chunk(1))
        await t.put(make_key(2), make_chunk(2))
        # A (buggy or malicious) copy of one key's file under another's name.
        t.path_for(make_key(2)).write_bytes(t.path_for(make_key(1)).read_bytes())
        assert await t.get(make_key(2)) is None
        assert t.counters.corrupt == 1
        t.path_for(make_key(2)).write_bytes(t.path_for(make_key(1)).read_bytes())
    t = await reopened(config)
    try:
        assert t.counters.corrupt == 1 and not t.contains(make_key(2)) and t.contains(make_key(1))
    finally:
        await t.close()


async def test_file_removed_behind_the_tiers_back(tier: DiskTier) -> None:
    await tier.put(make_key(1), make_chunk(1))
    tier.path_for(make_key(1)).unlink()
    assert await tier.get(make_key(1)) is None
    assert not tier.contains(make_key(1)) and tier.used_bytes == 0


def _as_version_1(path: Path) -> None:
    """Rewrite a chunk file's header as version 1 wrote it (before the leaf checksum)."""
    data = bytearray(path.read_bytes())
    _, _, hlen = decode_header(data)
    data[4:6] = (1).to_bytes(2, "little")
    data[hlen - 4 : hlen] = zlib.crc32(bytes(data[: hlen - 4])).to_bytes(4, "little")
    path.write_bytes(data)


async def test_version_1_files_are_kept_where_their_checksum_still_holds(config: DiskTierConfig) -> None:
    """Version 1 summed a payload whole; version 2 sums 1 MiB leaves.  The checksums agree up to
    a leaf, so such files are still served after an upgrade; a larger one is dropped at open."""
    small, large = make_chunk(1, SUM_LEAF), make_chunk(2, SUM_LEAF + 1)
    async with DiskTier("disk", config) as t:
        await t.put(make_key(1), small)
        await t.put(make_key(2), large)
        paths = [t.path_for(make_key(1)), t.path_for(make_key(2))]
    for path in paths:
        _as_version_1(path)
    t = await reopened(config)
    try:
        assert t.contains(make_key(1)) and not t.contains(make_key(2))
        assert t.counters.corrupt == 1 and not paths[1].exists()
        got = await t.get(make_key(1))
        assert got is not None and bytes(got.payload) == payload(1, SUM_LEAF)
    finally:
        await t.close()


def test_header_roundtrip_and_damage() -> None:
    meta = ChunkMeta(nbytes=10, checksum=5, dtype="float16", shape=(5,))
    h = encode_header(make_key(1), meta)
    assert decode_header(h + b"payload") == (str(make_key(1)), meta, len(h))
    assert len(h) < HEADER_BOUND
    for bad in (h[:5], h[:-1], b"XXXX" + h[4:], h[:-1] + bytes([h[-1] ^ 1])):
        with pytest.raises(CorruptChunk):
            decode_header(bad)


def test_header_bound_holds_for_the_longest_key() -> None:
    key = make_key(1, "t" * 64, "m" * 256)
    meta = ChunkMeta(
        nbytes=2**62,
        checksum=2**64 - 1,
        codec="c" * 32,
        codec_version=65535,
        dtype="float8_e4m3fn",
        shape=(2**62,) * 8,
        layout="L" * 16,
    )
    assert len(encode_header(key, meta)) < HEADER_BOUND


@pytest.mark.parametrize("refused_at", ["open", "read"])
async def test_file_system_without_direct_io(
    root: Path, monkeypatch: pytest.MonkeyPatch, refused_at: str
) -> None:
    # tmpfs refuses O_DIRECT at open; some FUSE file systems only at read.
    real_open, real_preadv = os.open, os.preadv

    def no_direct_open(path: Any, flags: int, *args: Any) -> int:
        if refused_at == "open" and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    def no_direct_preadv(fd: int, bufs: Any, off: int) -> int:
        if refused_at == "read" and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, bufs, off)

    async with DiskTier("disk", DiskTierConfig(path=root, capacity_bytes=64 * MiB)) as t:
        await t.put(make_key(1), make_chunk(1, 10_000))
        monkeypatch.setattr(os, "open", no_direct_open)
        monkeypatch.setattr(os, "preadv", no_direct_preadv)
        for _ in range(2):  # the first read falls back, the second starts buffered
            got = await t.get(make_key(1))
            assert got is not None and bytes(got.payload) == payload(1, 10_000)
        assert t.counters.errors == 0 and t.counters.corrupt == 0


async def test_without_fsync(root: Path) -> None:
    async with DiskTier("disk", DiskTierConfig(path=root, capacity_bytes=MiB, fsync=False)) as t:
        await t.put(make_key(1), make_chunk(1, 1000))
        got = await t.get(make_key(1))  # O_DIRECT reads see data not yet written back
        assert got is not None and bytes(got.payload) == payload(1, 1000)


# -- failures ----------------------------------------------------------------


async def test_enospc_raises_capacity_error_and_leaves_nothing(
    tier: DiskTier, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await tier.put(make_key(1), make_chunk(1))

    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    with pytest.raises(CapacityError, match="file system is full"):
        await tier.put(make_key(2), make_chunk(2))
    assert not tier.contains(make_key(2)) and temp_files(root) == []
    assert tier.counters.errors == 1
    assert tier.fits(64 * MiB - tier.used_bytes - HEADER_BOUND)  # reservation released
    got = await tier.get(make_key(1))
    assert got is not None and bytes(got.payload) == payload(1, 64 << 10)


async def test_eio_on_fsync_is_a_kvstore_error(
    tier: DiskTier, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(KVStoreError, match="put failed") as info:
        await tier.put(make_key(2), make_chunk(2))
    assert not isinstance(info.value, CapacityError)
    assert not tier.contains(make_key(2)) and temp_files(root) == [] and tier_files(root) == []


async def test_directory_fsync_failure_takes_the_put_back(
    tier: DiskTier, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await tier.put(make_key(1), make_chunk(1))

    def broken(fd: int) -> None:  # only directories are fsync'ed; files get fdatasync
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(KVStoreError):
        await tier.put(make_key(2), make_chunk(2))
    with pytest.raises(KVStoreError):
        await tier.put(make_key(1), make_chunk(3))  # an overwrite that fails
    assert not tier.contains(make_key(2)) and not tier.path_for(make_key(2)).exists()
    assert temp_files(root) == []
    assert tier.used_bytes == sum(p.stat().st_size for p in tier_files(root))


async def test_cancel_before_commit_leaves_nothing(
    tier: DiskTier, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(monkeypatch, "writev")
    task = asyncio.create_task(tier.put(make_key(1), make_chunk(1)))
    await gate.wait_entered()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.open.set()
    await tier.close()  # waits for the worker to finish
    assert not tier.contains(make_key(1)) and tier_files(root) == []
    assert tier.used_bytes == 0 and tier.fits(64 * MiB - HEADER_BOUND)


async def test_cancel_after_commit_takes_the_put_back(
    tier: DiskTier, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(monkeypatch, "fsync")  # the directory fsync, after the rename
    task = asyncio.create_task(tier.put(make_key(1), make_chunk(1)))
    await gate.wait_entered()
    assert tier.contains(make_key(1))  # renamed and indexed, not yet acknowledged
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not tier.contains(make_key(1)) and tier.used_bytes == 0
    gate.open.set()
    await tier.close()
    assert tier_files(root) == []


async def test_put_cancelled_while_queued(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with DiskTier("disk", DiskTierConfig(path=root, capacity_bytes=64 * MiB, io_threads=1)) as t:
        gate = Gate(monkeypatch, "writev")
        first = asyncio.create_task(t.put(make_key(1), make_chunk(1)))
        await gate.wait_entered()
        queued = asyncio.create_task(t.put(make_key(2), make_chunk(2)))
        await asyncio.sleep(0.01)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        gate.open.set()
        await first
    assert t.contains(make_key(1)) and not t.contains(make_key(2))
    assert tier_files(root) == [t.path_for(make_key(1))]


# -- concurrency -------------------------------------------------------------


async def test_concurrent_put_get_delete_of_one_key(tier: DiskTier, root: Path) -> None:
    key = make_key(1)
    values = {payload(1, 300_000), payload(2, 200_000)}
    chunks = [Chunk.from_bytes(v) for v in values]
    seen: set[bytes | None] = set()
    writers_done = asyncio.Event()
    await tier.put(key, chunks[0])

    async def reader() -> None:
        while not writers_done.is_set():
            got = await tier.get(key)
            data = None if got is None else bytes(got.payload)
            assert data is None or data in values  # old or new, whole, never a mix
            seen.add(data)
            await asyncio.sleep(0)  # a miss does not suspend; let the writers run

    async def writer(c: Chunk) -> None:
        for _ in range(10):
            await tier.put(key, c)

    async def deleter() -> None:
        for _ in range(5):
            await asyncio.sleep(0.002)
            await tier.delete(key)

    async def writers() -> None:
        await asyncio.gather(writer(chunks[0]), writer(chunks[1]), deleter())
        writers_done.set()

    await asyncio.gather(reader(), reader(), writers())
    assert seen & values
    # Whatever won, the index agrees with the disk.
    files = tier_files(root)
    if tier.contains(key):
        assert files == [tier.path_for(key)]
        got = await tier.get(key)
        assert got is not None and bytes(got.payload) in values
    else:
        assert files == []
    assert tier.used_bytes == sum(p.stat().st_size for p in files)
    assert temp_files(root) == [] and tier.counters.corrupt == 0


async def test_many_keys_concurrently(tier: DiskTier) -> None:
    await asyncio.gather(*(tier.put(make_key(i), make_chunk(i, 20_000 + i)) for i in range(40)))
    got = await asyncio.gather(*(tier.get(make_key(i)) for i in range(40)))
    for i, c in enumerate(got):
        assert c is not None and bytes(c.payload) == payload(i, 20_000 + i)
    assert len(tier) == 40


# -- configuration -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"path": ""}, "disk.path"),
        ({"path": 3}, "disk.path"),
        ({"capacity_bytes": 0}, "disk.capacity_bytes"),
        ({"capacity_bytes": -1}, "disk.capacity_bytes"),
        ({"capacity_bytes": 1.5}, "disk.capacity_bytes"),
        ({"capacity_bytes": True}, "disk.capacity_bytes"),
        ({"fsync": "yes"}, "disk.fsync"),
        ({"io_threads": 0}, "disk.io_threads"),
        ({"io_threads": 1000}, "disk.io_threads"),
        ({"direct_reads": 1}, "disk.direct_reads"),
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {"path": tmp_path, "capacity_bytes": MiB, **kwargs}
    with pytest.raises(ConfigError, match=field):
        DiskTierConfig(**args)


def test_config_accepts_a_string_path(tmp_path: Path) -> None:
    cfg = DiskTierConfig(path=str(tmp_path), capacity_bytes=MiB)  # type: ignore[arg-type]
    assert cfg.path == tmp_path and cfg.fsync and cfg.io_threads == 4
