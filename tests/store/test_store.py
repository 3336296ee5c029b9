"""TieredStore: unit tests and property tests of its invariants."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.chunk import Chunk, checksum
from kvstore.errors import CapacityError, ConfigError, CorruptChunk, QuotaExceeded
from kvstore.keys import ChunkKey, Namespace
from kvstore.pins import PinTable
from kvstore.store import TieredStore, TierSettings
from kvstore.tiers.cpu import CpuTier, CpuTierConfig
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.disk_config import DiskTierConfig

MiB = 1 << 20
NS = Namespace("t", "m")


def key(i: int, ns: Namespace = NS) -> ChunkKey:
    return ChunkKey(ns, "0" * 16, "s" + f"{i:064x}")


def payload(i: int, size: int, version: int = 0) -> bytes:
    return random.Random(i * 1_000_003 + version).randbytes(size)


def cpu(name: str, cap: int) -> CpuTier:
    return CpuTier(name, CpuTierConfig(capacity_bytes=cap, prefault=False))


async def read(store: TieredStore, k: ChunkKey) -> bytes | None:
    chunk = await store.get(k)
    if chunk is None:
        return None
    with chunk:
        return bytes(chunk.payload)


async def test_put_get_delete_round_trip() -> None:
    async with TieredStore([(cpu("cpu", 4 * MiB), TierSettings())]) as store:
        assert await store.put(key(1), Chunk.from_bytes(payload(1, 1000))) == "cpu"
        assert await read(store, key(1)) == payload(1, 1000)
        assert await store.delete(key(1))
        assert await read(store, key(1)) is None
        assert not await store.delete(key(1))


async def test_put_rejects_payload_not_matching_checksum() -> None:
    async with TieredStore([(cpu("cpu", 4 * MiB), TierSettings())]) as store:
        c = Chunk.from_bytes(bytearray(payload(1, 100)))
        c.payload[0] ^= 0xFF  # the bytes no longer match the checksum
        with pytest.raises(CorruptChunk):
            await store.put(key(1), c)
        assert await read(store, key(1)) is None


async def test_eviction_demotes_then_get_promotes() -> None:
    top, low = cpu("top", 1 * MiB), cpu("low", 4 * MiB)
    async with TieredStore([(top, TierSettings(on_evict="demote")), (low, TierSettings())]) as store:
        for i in range(6):  # 6 x 300 KiB > 1 MiB top tier
            await store.put(key(i), Chunk.from_bytes(payload(i, 300 << 10)))
        assert top.used_bytes <= top.capacity_bytes
        assert not top.contains(key(0)) and low.contains(key(0))
        assert await read(store, key(0)) == payload(0, 300 << 10)
        assert top.contains(key(0))  # promoted on the hit
        stats = store.stats()
        assert stats.slots["top"].demotions >= 3 and stats.slots["low"].promotions == 1


async def test_write_through_and_durable_put(tmp_path: Path) -> None:
    disk = DiskTier("disk", DiskTierConfig(path=tmp_path, capacity_bytes=64 * MiB))
    async with TieredStore(
        [(cpu("cpu", 4 * MiB), TierSettings()), (disk, TierSettings(write_through=True))]
    ) as store:
        await store.put(key(1), Chunk.from_bytes(payload(1, 5000)), durable=True)
        assert disk.contains(key(1))  # durable: already on disk when put returned
        await store.put(key(2), Chunk.from_bytes(payload(2, 5000)))
        await store.flush()
        assert disk.contains(key(2))
    # A new store over the same directory finds both, byte-exact.
    disk2 = DiskTier("disk", DiskTierConfig(path=tmp_path, capacity_bytes=64 * MiB))
    async with TieredStore([(cpu("cpu", 4 * MiB), TierSettings()), (disk2, TierSettings())]) as store:
        assert (await store.lookup([key(1), key(2), key(3)])).count == 2
        assert await read(store, key(2)) == payload(2, 5000)


async def test_delete_is_not_undone_by_a_pending_write_through(tmp_path: Path) -> None:
    disk = DiskTier("disk", DiskTierConfig(path=tmp_path, capacity_bytes=64 * MiB))
    async with TieredStore(
        [(cpu("cpu", 4 * MiB), TierSettings()), (disk, TierSettings(write_through=True))]
    ) as store:
        for i in range(20):
            await store.put(key(i), Chunk.from_bytes(payload(i, 20000)))
            await store.delete(key(i))
        await store.flush()
        assert len(disk) == 0
        assert (await store.lookup([key(i) for i in range(20)])).count == 0


async def test_overwrite_replaces_everywhere(tmp_path: Path) -> None:
    disk = DiskTier("disk", DiskTierConfig(path=tmp_path, capacity_bytes=64 * MiB))
    async with TieredStore(
        [(cpu("cpu", 4 * MiB), TierSettings()), (disk, TierSettings(write_through=True))]
    ) as store:
        await store.put(key(1), Chunk.from_bytes(payload(1, 1000, 0)), durable=True)
        await store.put(key(1), Chunk.from_bytes(payload(1, 3000, 1)), durable=True)
        await store.tiers[0].delete(key(1))  # force the read to come from disk
        store._slots[0].untrack(key(1))
        assert await read(store, key(1)) == payload(1, 3000, 1)


async def test_lookup_counts_leading_run_and_names_tiers() -> None:
    top, low = cpu("top", 2 * MiB), cpu("low", 2 * MiB)
    async with TieredStore([(top, TierSettings()), (low, TierSettings())]) as store:
        for i in (0, 1, 3):
            await store.put(key(i), Chunk.from_bytes(payload(i, 100)))
        await top.delete(key(1))
        store._slots[0].untrack(key(1))
        await low.put(key(1), Chunk.from_bytes(payload(1, 100)))
        store._slots[1].track(key(1), 100)
        res = await store.lookup([key(0), key(1), key(2), key(3)])
        assert res.count == 2 and res.tiers == ["top", "low"]
        assert await store.exists_many([key(0), key(2), key(3)]) == [True, False, True]


async def test_chunk_larger_than_every_tier_is_refused() -> None:
    async with TieredStore([(cpu("cpu", 1 * MiB), TierSettings())]) as store:
        with pytest.raises(CapacityError, match="larger than every tier"):
            await store.put(key(1), Chunk.from_bytes(bytes(2 * MiB)))


async def test_pinned_chunks_are_not_evicted_until_the_lease_ends() -> None:
    now = [0.0]
    pins = PinTable(clock=lambda: now[0])
    top = cpu("cpu", 1 * MiB)
    async with TieredStore([(top, TierSettings(on_evict="drop"))], pins=pins) as store:
        await store.put(key(0), Chunk.from_bytes(payload(0, 400 << 10)))
        store.pin(key(0), ttl_s=10)
        for i in range(1, 8):
            await store.put(key(i), Chunk.from_bytes(payload(i, 400 << 10)))
        assert top.contains(key(0))
        now[0] = 11.0  # lease over: now it may go
        for i in range(8, 12):
            await store.put(key(i), Chunk.from_bytes(payload(i, 400 << 10)))
        assert not top.contains(key(0))


async def test_everything_pinned_means_capacity_error() -> None:
    pins = PinTable(clock=lambda: 0.0)
    async with TieredStore([(cpu("cpu", 1 * MiB), TierSettings())], pins=pins) as store:
        await store.put(key(0), Chunk.from_bytes(payload(0, 600 << 10)))
        store.pin(key(0), 60)
        with pytest.raises(CapacityError, match="pinned"):
            await store.put(key(1), Chunk.from_bytes(payload(1, 600 << 10)))
        assert await read(store, key(0)) == payload(0, 600 << 10)


async def test_namespace_quota_evicts_own_chunks_first() -> None:
    other = Namespace("other", "m")
    async with TieredStore([(cpu("cpu", 4 * MiB), TierSettings(on_evict="drop"))], quotas={"t/m": 1 * MiB}) as store:
        await store.put(key(100, other), Chunk.from_bytes(payload(100, 500 << 10)))
        for i in range(5):
            await store.put(key(i), Chunk.from_bytes(payload(i, 300 << 10)))
        usage = {u.namespace: u.bytes for u in store.stats().namespaces}
        assert usage["t/m"] <= 1 * MiB
        assert await read(store, key(100, other)) is not None  # the other tenant was not pushed out
        with pytest.raises(QuotaExceeded):
            await store.put(key(9), Chunk.from_bytes(bytes(2 * MiB)))


async def test_concurrent_put_get_delete_same_key() -> None:
    async with TieredStore([(cpu("cpu", 8 * MiB), TierSettings())]) as store:
        versions = {v: payload(7, 50_000, v) for v in range(10)}

        async def writer(v: int) -> None:
            await store.put(key(7), Chunk.from_bytes(versions[v]))

        async def reader() -> None:
            for _ in range(20):
                got = await read(store, key(7))
                assert got is None or got in versions.values()
                await asyncio.sleep(0)

        async def deleter() -> None:
            for _ in range(5):
                await store.delete(key(7))
                await asyncio.sleep(0)

        await asyncio.gather(*(writer(v) for v in range(10)), reader(), reader(), deleter())
        got = await read(store, key(7))
        assert got is None or got in versions.values()


def test_bad_tier_list() -> None:
    with pytest.raises(ConfigError, match="at least one tier"):
        TieredStore([])
    with pytest.raises(ConfigError, match="unique"):
        TieredStore([(cpu("a", MiB), TierSettings()), (cpu("a", MiB), TierSettings())])


# -- properties ---------------------------------------------------------------
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 11), st.integers(1, 700 << 10)),
        st.tuples(st.just("get"), st.integers(0, 11), st.just(0)),
        st.tuples(st.just("delete"), st.integers(0, 11), st.just(0)),
        st.tuples(st.just("pin"), st.integers(0, 11), st.integers(1, 30)),
        st.tuples(st.just("tick"), st.just(0), st.integers(1, 20)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS, st.sampled_from(["lru", "lfu", "s3fifo"]))
def test_store_invariants(ops: list[tuple[str, int, int]], policy: str) -> None:
    """Capacity never exceeded; get returns exactly the last value put, or nothing;
    a pinned chunk is not evicted before its lease ends."""

    async def run() -> None:
        now = [0.0]
        pins = PinTable(clock=lambda: now[0])
        top, low = cpu("top", 1 * MiB), cpu("low", 2 * MiB)
        store = TieredStore(
            [(top, TierSettings(eviction=policy, on_evict="demote")), (low, TierSettings(eviction=policy))],
            pins=pins,
        )
        await store.open()
        last: dict[int, bytes] = {}
        version = 0
        pinned_until: dict[int, float] = {}
        try:
            for op, i, arg in ops:
                if op == "put":
                    version += 1
                    data = payload(i, arg, version)
                    try:
                        await store.put(key(i), Chunk.from_bytes(data))
                        last[i] = data
                    except CapacityError:
                        pass  # refused (everything pinned): the old value, if any, may remain
                elif op == "get":
                    got = await read(store, key(i))
                    assert got is None or got == last.get(i), "get returned a value that was not the last put"
                elif op == "delete":
                    await store.delete(key(i))
                    last.pop(i, None)
                    pinned_until.pop(i, None)
                elif op == "pin":
                    if (await store.exists_many([key(i)]))[0]:
                        store.pin(key(i), arg)
                        pinned_until[i] = now[0] + arg
                else:
                    now[0] += arg
                for t in (top, low):
                    assert t.used_bytes <= t.capacity_bytes
                for j, until in pinned_until.items():
                    if now[0] < until and j in last:
                        assert (await store.exists_many([key(j)]))[0], f"pinned chunk {j} was evicted"
        finally:
            await store.close()

    asyncio.run(run())


async def test_summing_put_stores_the_checksum_of_the_stored_bytes_everywhere(tmp_path: Path) -> None:
    """put(summing=True): the caller's checksum is ignored; the top tier checksums its copy,
    and the write-through copy on disk carries the same checksum (it verifies when read back)."""
    disk = DiskTier("disk", DiskTierConfig(path=tmp_path, capacity_bytes=64 * MiB))
    data = payload(7, 3 * MiB)
    async with TieredStore([(cpu("cpu", 16 * MiB), TierSettings()), (disk, TierSettings(write_through=True))]) as store:
        unsummed = Chunk(dataclasses.replace(Chunk.from_bytes(data).meta, checksum=12345), memoryview(data))
        assert await store.put(key(1), unsummed, durable=True, summing=True) == "cpu"
        got = await store.get(key(1))
        assert got is not None
        with got:
            got.verify()
            assert got.meta.checksum == checksum(data)
        on_disk = await disk.get(key(1))
        assert on_disk is not None
        with on_disk:
            on_disk.verify()
            assert on_disk.meta.checksum == checksum(data) and bytes(on_disk.payload) == data
        # The same value put again with its checksum is recognised as already held.
        assert await store.put(key(1), Chunk.from_bytes(data)) == "cpu"


async def test_summing_put_into_a_top_tier_that_cannot_sum_its_copy(tmp_path: Path) -> None:
    """A disk tier on top: the payload is checksummed before the put (Tier.put_summing's default)."""
    disk = DiskTier("disk", DiskTierConfig(path=tmp_path, capacity_bytes=64 * MiB))
    data = payload(8, 9 * MiB)  # large: checksummed in a thread
    async with TieredStore([(disk, TierSettings())]) as store:
        unsummed = Chunk(dataclasses.replace(Chunk.from_bytes(b"").meta, nbytes=len(data)), memoryview(data))
        await store.put(key(2), unsummed, summing=True)
        assert await read(store, key(2)) == data
        chunk = await disk.get(key(2))
        assert chunk is not None
        with chunk:
            assert chunk.meta.checksum == checksum(data)
