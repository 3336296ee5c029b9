"""The shared arena and its index (kvstore/tiers/shared_arena.py) and their reader
(kvstore/tiers/arena_reader.py), both sides in one process.

The reader maps read-only descriptors, as a client does; the concurrency test
rewrites and reuses blocks from a second thread while reads copy, and checks
that no read ever returns bytes that were not the key's value at some point.
"""

from __future__ import annotations

import mmap
import os
import threading

import pytest
import torch

from kvstore.chunk import Chunk, ChunkMeta, checksum
from kvstore.errors import InvalidArgument
from kvstore.keys import ChunkKey, Namespace
from kvstore.tiers import shared_arena as sa
from kvstore.tiers.arena_reader import SPLIT_MIN, ArenaReader
from kvstore.tiers.memory import MemoryTier

# Only x86-64 gives the seqlock the load/store ordering it relies on, so the daemon shares its
# arena nowhere else; CI and the development machine are x86-64 and run these.
pytestmark = pytest.mark.skipif(not sa.SUPPORTED, reason="the shared arena is offered on x86-64 only")

MiB = 1 << 20
KEY = "t/m/fp/0001"


def pair(arena_bytes: int = 16 * MiB, buckets: int | None = None) -> tuple[sa.SharedArena, ArenaReader]:
    shared = sa.SharedArena(arena_bytes, buckets=buckets)
    fds = shared.client_fds()
    try:
        reader = ArenaReader(*fds, shared.describe())
    finally:
        for fd in fds:
            os.close(fd)
    return shared, reader


def put(shared: sa.SharedArena, key: str, offset: int, data: bytes, **meta: object) -> ChunkMeta:
    shared.arena[offset : offset + len(data)] = data
    m = ChunkMeta(nbytes=len(data), checksum=checksum(data), **meta)  # type: ignore[arg-type]
    assert shared.publish(key, offset, m)
    return m


def test_a_published_key_reads_back_with_its_metadata() -> None:
    shared, reader = pair()
    data = os.urandom(3 * MiB + 5)
    meta = put(shared, KEY, 4096, data, dtype="bfloat16", shape=(3, 2, 7), codec="zstd", codec_version=3, layout="LTKHD")
    got = reader.read(KEY, None)
    assert got is not None
    assert got[0] == meta
    assert bytes(got[1].numpy()) == data
    out = torch.zeros(4 * MiB, dtype=torch.uint8)
    got = reader.read(KEY, out)
    assert got is not None and bytes(out[: len(data)].numpy()) == data and got[1].numel() == len(data)
    assert reader.read("t/m/fp/other", None) is None
    shared.close()


def test_withdrawn_and_replaced_keys() -> None:
    shared, reader = pair()
    put(shared, KEY, 0, b"a" * 1000)
    shared.withdraw(KEY)
    assert reader.read(KEY, None) is None
    put(shared, KEY, 8192, b"b" * 2000)
    put(shared, KEY, 65536, b"c" * 3000)  # replaced in place: one slot
    got = reader.read(KEY, None)
    assert got is not None and bytes(got[1].numpy()) == b"c" * 3000
    assert len(shared) == 1
    shared.withdraw(KEY)
    shared.withdraw(KEY)  # twice: no-op
    assert len(shared) == 0


def test_too_little_room_is_the_callers_error() -> None:
    shared, reader = pair()
    put(shared, KEY, 0, b"x" * 5000)
    with pytest.raises(InvalidArgument, match="room for 4096 bytes, the chunk has 5000"):
        reader.read(KEY, torch.zeros(4096, dtype=torch.uint8))


def test_a_full_bucket_leaves_keys_unpublished() -> None:
    shared, reader = pair(buckets=1)  # one bucket of WAYS slots
    keys = [f"t/m/fp/{i:04d}" for i in range(sa.WAYS + 3)]
    published = [shared.publish(k, 0, ChunkMeta(nbytes=0, checksum=checksum(b""))) for k in keys]
    assert published == [True] * sa.WAYS + [False] * 3
    assert shared.overflows == 3
    assert reader.read(keys[-1], None) is None
    assert reader.read(keys[0], None) is not None
    shared.withdraw(keys[0])
    assert shared.publish(keys[-1], 0, ChunkMeta(nbytes=0, checksum=checksum(b"")))  # a slot came free


def test_metadata_round_trips_and_overlong_metadata_is_not_published() -> None:
    longest_ascii = ChunkMeta(nbytes=10, checksum=2**64 - 1, codec="c" * 32, layout="L" * 16, shape=(2**40,) * 8)
    assert sa.unpack_meta(sa.pack_meta(longest_ascii) or b"") == longest_ascii
    shared, reader = pair()
    put(shared, KEY, 0, b"x" * 10)
    overlong = ChunkMeta(nbytes=10, checksum=0, codec="\U0001d400" * 32, layout="\U0001d400" * 16, shape=(1,) * 8)
    assert sa.pack_meta(overlong) is None
    assert not shared.publish(KEY, 0, overlong)
    assert reader.read(KEY, None) is None  # the old value is withdrawn, not left stale
    assert len(shared) == 0


def test_clients_cannot_write_through_their_descriptors() -> None:
    shared = sa.SharedArena(MiB)
    arena_fd, index_fd = shared.client_fds()
    try:
        for fd in (arena_fd, index_fd):
            with pytest.raises(PermissionError):
                mmap.mmap(fd, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            with pytest.raises(OSError):
                os.write(fd, b"x")
            with pytest.raises(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(arena_fd)
        os.close(index_fd)
        shared.close()


def test_a_closed_arena_is_not_read() -> None:
    shared, reader = pair()
    put(shared, KEY, 0, b"x" * 10)
    assert reader.open
    shared.close()
    assert not reader.open
    assert reader.read(KEY, None) is None
    reader.close()
    assert reader.read(KEY, None) is None


def test_reads_racing_rewrites_and_reuse_never_return_foreign_bytes() -> None:
    """A writer republishes the key between two blocks and scribbles over the
    block it just left (as a put reusing freed space would); every read that
    succeeds must be one whole version of the value."""
    n = MiB
    shared, reader = pair(4 * MiB)
    versions = [bytes([v]) * n for v in range(1, 200)]
    blocks = [0, 2 * MiB]
    put(shared, KEY, blocks[0], versions[0])
    stop = threading.Event()

    def writer() -> None:
        v, side = 0, 0
        while not stop.is_set():
            v, side = (v + 1) % len(versions), 1 - side
            off = blocks[side]
            shared.arena[off : off + n] = versions[v]
            shared.publish(KEY, off, ChunkMeta(nbytes=n, checksum=checksum(versions[v])))
            old = blocks[1 - side]
            shared.arena[old : old + n] = b"\xee" * n  # reused for something else

    t = threading.Thread(target=writer)
    t.start()
    good = 0
    try:
        out = torch.empty(n, dtype=torch.uint8)
        for _ in range(1500):
            got = reader.read(KEY, out)
            if got is None:
                continue
            good += 1
            first = int(out[0])
            assert first != 0xEE and bool((out == first).all()), "a read returned bytes of two versions"
            assert checksum(out.numpy().tobytes()) == got[0].checksum
            if good >= 150 and reader.torn >= 5:
                break
    finally:
        stop.set()
        t.join()
    assert good > 100
    assert reader.torn > 0  # the race was really run


async def test_memory_tier_publishes_what_it_holds() -> None:
    tier = MemoryTier("cpu", 8 * MiB, shared=True)
    await tier.open()
    assert tier.shared is not None
    fds = tier.shared.client_fds()
    reader = ArenaReader(*fds, tier.shared.describe())
    for fd in fds:
        os.close(fd)
    key = ChunkKey(Namespace("t", "m"), "0" * 16, "s" + "ab" * 32)
    data = os.urandom(MiB)
    await tier.put(key, Chunk.from_bytes(data))
    got = reader.read(str(key), None)
    assert got is not None and bytes(got[1].numpy()) == data
    assert tier.note_shared_read(key) == MiB and tier.counters.hits == 1
    await tier.delete(key)
    assert reader.read(str(key), None) is None
    assert tier.note_shared_read(key) is None
    await tier.close()
    assert not reader.open


def test_reads_inside_inference_mode() -> None:
    """Engines run in torch's inference mode; large reads are split over a helper
    thread, which must not write into an inference tensor (torch refuses)."""
    shared, reader = pair(32 * MiB)
    data = os.urandom(SPLIT_MIN + 4096)
    put(shared, KEY, 0, data)
    with torch.inference_mode():
        out = torch.empty(len(data), dtype=torch.uint8)
        got = reader.read(KEY, out)
        assert got is not None and bytes(out.numpy()) == data
        got = reader.read(KEY, None)
        assert got is not None and bytes(got[1].numpy()) == data
    got[1].add_(0)  # a normal tensor: usable outside inference mode
