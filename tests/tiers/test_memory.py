"""The memory tiers (cpu, and gpu where CUDA exists): arena, views, capacity."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
import torch

from kvstore.chunk import Chunk, ChunkMeta, checksum
from kvstore.errors import CapacityError, Closed, ConfigError, InvalidArgument
from kvstore.keys import ChunkKey, Namespace
from kvstore.tiers import copier
from kvstore.tiers.cpu import CpuTier, CpuTierConfig
from kvstore.tiers.gpu import GpuTier, GpuTierConfig
from kvstore.tiers.memory import MemoryTier, tensor_view

MiB = 1 << 20
T = TypeVar("T")


def key(i: int) -> ChunkKey:
    return ChunkKey(Namespace("t", "m"), "0" * 16, "s" + f"{i:064x}")


@pytest.fixture
def copies_held(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Copies made on a pool thread wait for the returned event, so a test can
    cancel a put while its copy is certainly still running."""
    go = threading.Event()

    def held(fn: Callable[..., T]) -> Callable[..., T]:
        def wait_then(*args: object) -> T:
            if threading.current_thread() is not threading.main_thread():
                assert go.wait(30), "a held copy was never let go"
            return fn(*args)

        return wait_then

    monkeypatch.setattr(copier, "_copy_part", held(copier._copy_part))
    monkeypatch.setattr(copier, "copy_summed", held(copier.copy_summed))
    yield go
    go.set()


@pytest.fixture
async def tier() -> CpuTier:
    t = CpuTier("cpu", CpuTierConfig(capacity_bytes=2 * MiB, prefault=False))
    await t.open()
    yield t
    await t.close()


async def test_round_trip_views(tier: CpuTier) -> None:
    await tier.put(key(1), Chunk.from_bytes(b"hello" * 100))
    chunk = await tier.get(key(1))
    assert chunk is not None
    with chunk:
        assert bytes(chunk.payload) == b"hello" * 100
        chunk.verify()
    assert tier.counters.hits == 1 and (await tier.get(key(2))) is None and tier.counters.misses == 1


async def test_capacity_is_hard(tier: CpuTier) -> None:
    await tier.put(key(1), Chunk.from_bytes(bytes(MiB + 1)))
    assert not tier.fits(MiB)
    with pytest.raises(CapacityError):
        await tier.put(key(2), Chunk.from_bytes(bytes(MiB)))
    assert tier.used_bytes <= tier.capacity_bytes


async def test_deleted_chunk_stays_readable_while_held(tier: CpuTier) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    await tier.put(key(1), Chunk.from_bytes(data))
    held = await tier.get(key(1))
    assert held is not None
    await tier.delete(key(1))
    assert not tier.contains(key(1))
    # Its bytes still count as used, so a new put cannot reuse them...
    assert tier.used_bytes >= MiB
    with pytest.raises(CapacityError):
        await tier.put(key(2), Chunk.from_bytes(bytes(MiB + MiB // 2)))
    assert bytes(held.payload) == data
    held.release()
    assert tier.used_bytes == 0  # ...until the reader lets go
    await tier.put(key(2), Chunk.from_bytes(bytes(MiB + MiB // 2)))


async def test_overwrite_frees_old_block(tier: CpuTier) -> None:
    for v in range(10):
        await tier.put(key(1), Chunk.from_bytes(bytes([v]) * 700_000))
    assert len(tier) == 1 and tier.used_bytes < 800_000
    chunk = await tier.get(key(1))
    assert chunk is not None and bytes(chunk.payload[:1]) == b"\x09"
    chunk.release()


async def test_large_copy_runs_off_loop_and_cancel_is_safe(copies_held: threading.Event) -> None:
    t = CpuTier("cpu", CpuTierConfig(capacity_bytes=64 * MiB, prefault=False))
    await t.open()
    try:
        big = Chunk.from_bytes(bytes(32 * MiB))
        task = asyncio.create_task(t.put(key(1), big))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not t.contains(key(1))
        assert t.used_bytes > 0  # the copy still writes into its block ...
        copies_held.set()
        for _ in range(100):  # ... which it frees when it finishes
            if t.used_bytes == 0:
                break
            await asyncio.sleep(0.05)
        assert t.used_bytes == 0
    finally:
        await t.close()


async def test_payload_length_must_match_meta(tier: CpuTier) -> None:
    c = Chunk.from_bytes(b"abc")
    c.payload = memoryview(b"abcd")
    with pytest.raises(InvalidArgument):
        await tier.put(key(1), c)


async def test_closed_tier_refuses() -> None:
    t = CpuTier("cpu", CpuTierConfig(capacity_bytes=MiB, prefault=False))
    with pytest.raises(Closed):
        await t.get(key(1))


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="cpu.capacity_bytes"):
        CpuTierConfig(capacity_bytes=10)
    with pytest.raises(ConfigError, match="cpu.copy_threads"):
        CpuTierConfig(capacity_bytes=MiB, copy_threads=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a host without CUDA")
def test_gpu_tier_refused_without_cuda() -> None:
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        GpuTier("gpu", GpuTierConfig(capacity_bytes=MiB))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on CI)")
async def test_gpu_tier_round_trip() -> None:
    t = GpuTier("gpu", GpuTierConfig(capacity_bytes=64 * MiB))
    await t.open()
    try:
        data = torch.randint(0, 255, (8 * MiB,), dtype=torch.uint8)
        await t.put(key(1), Chunk.from_bytes(memoryview(data.numpy())))  # type: ignore[arg-type]
        got = t.get_tensor(key(1))
        assert got is not None and got[1].device.type == "cuda"
        assert torch.equal(got[1].cpu(), data)
        chunk = await t.get(key(1))
        assert chunk is not None
        with chunk:
            chunk.verify()
    finally:
        await t.close()


def test_memory_tier_is_the_shared_base() -> None:
    assert issubclass(CpuTier, MemoryTier) and issubclass(GpuTier, MemoryTier)


@pytest.mark.parametrize("size", [0, 1000, 3 * MiB + 5, 12 * MiB])
async def test_put_summing_checksums_the_stored_copy(size: int) -> None:
    t = CpuTier("cpu", CpuTierConfig(capacity_bytes=32 * MiB, prefault=False))
    await t.open()
    try:
        data = torch.randint(0, 256, (size,), dtype=torch.uint8).numpy().tobytes()
        unsummed = Chunk(ChunkMeta(nbytes=size, checksum=0), memoryview(data))
        meta = await t.put_summing(key(1), unsummed)
        assert meta.checksum == checksum(data) and meta.nbytes == size
        chunk = await t.get(key(1))
        assert chunk is not None
        with chunk:
            assert chunk.meta == meta and bytes(chunk.payload) == data
            chunk.verify()
    finally:
        await t.close()


async def test_put_summing_describes_the_bytes_stored_while_the_source_changes() -> None:
    """A client rewriting its buffer during a put cannot leave bytes that fail their checksum."""
    t = CpuTier("cpu", CpuTierConfig(capacity_bytes=256 * MiB, prefault=False))
    await t.open()
    src = torch.zeros(64 * MiB, dtype=torch.uint8)
    stop = threading.Event()

    def scribble() -> None:
        i = 0
        while not stop.is_set():
            src[(i * 4099) % src.numel()] = i % 251 + 1
            i += 1

    writer = threading.Thread(target=scribble)
    writer.start()
    try:
        for i in range(6):
            meta = await t.put_summing(key(i % 2), Chunk(ChunkMeta(nbytes=src.numel(), checksum=0), tensor_view(src)))
            chunk = await t.get(key(i % 2))
            assert chunk is not None
            with chunk:
                assert checksum(chunk.payload) == meta.checksum
    finally:
        stop.set()
        writer.join()
        await t.close()


async def test_put_summing_cancelled_frees_its_block_after_the_copy(copies_held: threading.Event) -> None:
    t = CpuTier("cpu", CpuTierConfig(capacity_bytes=64 * MiB, prefault=False))
    await t.open()
    try:
        task = asyncio.create_task(t.put_summing(key(1), Chunk(ChunkMeta(nbytes=32 * MiB, checksum=0), memoryview(bytes(32 * MiB)))))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not t.contains(key(1))
        assert t.used_bytes > 0
        copies_held.set()
        for _ in range(100):
            if t.used_bytes == 0:
                break
            await asyncio.sleep(0.05)
        assert t.used_bytes == 0
    finally:
        await t.close()
