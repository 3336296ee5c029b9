"""The copier: large host copies split over threads, exact, and safe to cancel."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import xxhash

from kvstore.chunk import SUM_LEAF, checksum
from kvstore.tiers import copier as copier_module
from kvstore.tiers.copier import PART_ALIGN, SPLIT_SUMMED, SUM_PIECE, Copier, copy_summed, finish, when_done

MiB = 1 << 20
#: Small enough that the tests' buffers are split (the default is 8 MiB).
SPLIT = 2 * MiB


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    p = ThreadPoolExecutor(2)
    yield p
    p.shutdown(wait=True)


def buffers(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    return src, torch.zeros(n, dtype=torch.uint8)


@pytest.mark.parametrize("n", [0, 1, 4095, 2 * MiB - 1, 2 * MiB, 2 * MiB + 12345, 9 * MiB + 7])
def test_copy_now_is_exact_for_every_size(pool: ThreadPoolExecutor, n: int) -> None:
    src, dst = buffers(n, seed=n)
    Copier(pool, 2, split_min=SPLIT).copy_now(dst, src)
    assert torch.equal(src, dst)


def test_parts_are_page_aligned_and_cover_the_buffer(pool: ThreadPoolExecutor) -> None:
    n = 3 * MiB + 5
    src, dst = buffers(n)
    parts = Copier(pool, 3, split_min=SPLIT).parts(dst, src)
    assert len(parts) == 3
    offsets = [d.data_ptr() - dst.data_ptr() for d, _ in parts]
    assert all(o % PART_ALIGN == 0 for o in offsets)
    assert sum(d.numel() for d, _ in parts) == n
    assert [s.data_ptr() - src.data_ptr() for _, s in parts] == offsets


def test_small_copies_and_single_thread_copiers_are_not_split(pool: ThreadPoolExecutor) -> None:
    src, dst = buffers(MiB)
    assert len(Copier(pool, 2, split_min=SPLIT).parts(dst, src)) == 1  # under split_min
    big_src, big_dst = buffers(4 * MiB)
    assert len(Copier(pool, 1, split_min=SPLIT).parts(big_dst, big_src)) == 1
    assert len(Copier(None, 2).parts(big_dst, big_src)) == 1
    with pytest.raises(ValueError, match="copy of"):
        Copier(pool, 2, split_min=SPLIT).parts(dst, big_src)
    with pytest.raises(ValueError, match="threads"):
        Copier(pool, 0, split_min=SPLIT)


def test_a_busy_pool_never_makes_the_caller_wait(pool: ThreadPoolExecutor) -> None:
    """Both pool threads are held by other work: the caller copies the parts itself."""
    release = threading.Event()
    blockers = [pool.submit(release.wait, 30) for _ in range(2)]
    try:
        src, dst = buffers(4 * MiB, seed=3)
        done = threading.Event()

        def run() -> None:
            Copier(pool, 2, split_min=SPLIT).copy_now(dst, src)
            done.set()

        t = threading.Thread(target=run)
        t.start()
        assert done.wait(10), "copy_now waited for a busy pool"
        assert torch.equal(src, dst)
    finally:
        release.set()
        for b in blockers:
            b.result()
        t.join()


async def test_large_copies_run_in_the_pool_while_the_loop_serves(pool: ThreadPoolExecutor) -> None:
    src, dst = buffers(64 * MiB, seed=5)
    copier = Copier(pool, 2, inline_max=8 * MiB, split_min=SPLIT)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    t = asyncio.create_task(ticker())
    fut = copier.start(dst, src)
    assert not fut.done()  # handed to the pool, not copied on the loop
    await finish(fut)
    t.cancel()
    assert torch.equal(src, dst)
    assert ticks > 0


async def test_cancelled_waiter_leaves_the_copy_running_to_its_end(pool: ThreadPoolExecutor) -> None:
    # Both pool threads are held, so the copy's parts wait in the pool's queue
    # until the waiter has been cancelled: the order does not depend on timing.
    release = threading.Event()
    blockers = [pool.submit(release.wait, 30) for _ in range(2)]
    try:
        src, dst = buffers(64 * MiB, seed=7)
        copier = Copier(pool, 2, inline_max=MiB, split_min=SPLIT)
        fut = copier.start(dst, src)
        complete_at_callback: list[bool] = []
        when_done(fut, lambda: complete_at_callback.append(torch.equal(src, dst)))

        task = asyncio.create_task(finish(fut))
        await asyncio.sleep(0)
        assert not fut.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not fut.cancelled()  # the waiter's cancellation did not reach the copy
    finally:
        release.set()
    await asyncio.wait_for(asyncio.shield(fut), 30)
    await asyncio.sleep(0)
    assert complete_at_callback == [True]
    for b in blockers:
        b.result()


@pytest.mark.parametrize("n", [0, 100, 3 * MiB + 1, 20 * MiB])
async def test_memoryviews_and_tensors_mix(pool: ThreadPoolExecutor, n: int) -> None:
    """Byte views (a tier's arena, a client's segment) copy like tensors, split or not."""
    src, dst = buffers(n, seed=11)
    copier = Copier(pool, 2, inline_max=8 * MiB, split_min=SPLIT)
    for d, s in [
        (memoryview(dst.numpy()), memoryview(src.numpy())),
        (dst, memoryview(src.numpy())),
        (memoryview(dst.numpy()), src),
    ]:
        dst.zero_()
        await copier.copy(d, s)
        assert torch.equal(src, dst)
    # A view of another item format is copied as its bytes.
    words = memoryview(src.numpy()).cast("B")[: n // 4 * 4].cast("I")
    dst.zero_()
    await copier.copy(memoryview(dst.numpy())[: n // 4 * 4], words)
    assert torch.equal(src[: n // 4 * 4], dst[: n // 4 * 4])


@pytest.mark.parametrize("n", [0, 7, 2 * MiB, 5 * MiB + 3, 24 * MiB + 1])
async def test_summed_copies_checksum_what_they_wrote(pool: ThreadPoolExecutor, n: int) -> None:
    """start_summed streams xxh3 over the parts as they are copied, in order:
    the digest equals xxh3 of the whole destination, inline or in the pool."""
    for inline_max in (MiB, 64 * MiB):
        src, dst = buffers(n, seed=n % 97)
        copier = Copier(pool, 2, inline_max=inline_max, split_min=SPLIT)
        got = await finish(copier.start_summed(memoryview(dst.numpy()), src))
        assert torch.equal(src, dst)
        assert got == checksum(memoryview(dst.numpy()))


def test_each_part_is_seen_once_in_order_even_when_taken_back(pool: ThreadPoolExecutor) -> None:
    release = threading.Event()
    blockers = [pool.submit(release.wait, 30) for _ in range(2)]
    try:
        src, dst = buffers(6 * MiB + 5, seed=4)
        seen: list[int] = []
        Copier(pool, 3, split_min=SPLIT).copy_now(dst, src, each=lambda part: seen.append(part.data_ptr() - dst.data_ptr()))
        assert seen == sorted(seen) and len(seen) == 3 and seen[0] == 0
        assert torch.equal(src, dst)
    finally:
        release.set()
        for b in blockers:
            b.result()


# -- copy_summed: the copy a direct write makes, checksummed as it goes -------------------------
@pytest.mark.parametrize(
    "n",
    [
        0, 1, 4095, SUM_PIECE - 1, SUM_PIECE, SUM_PIECE + 1, 5 * SUM_PIECE + 3, SUM_LEAF, SUM_LEAF + 1,
        SPLIT_SUMMED - 1, SPLIT_SUMMED, SPLIT_SUMMED + 4097, 9 * SUM_LEAF + 3,
    ],
)
@pytest.mark.parametrize("with_pool", [True, False])
def test_copy_summed_is_exact_and_sums_what_it_wrote(pool: ThreadPoolExecutor, n: int, with_pool: bool) -> None:
    src, dst = buffers(n, seed=n + 1)
    got = copy_summed(dst, src, pool if with_pool else None)
    assert torch.equal(src, dst)
    assert got == checksum(dst.numpy().data)


def test_copy_summed_shares_the_leaves_with_the_pool(pool: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool's thread takes leaves from the end while the caller takes them from the start
    (seen by which threads make the real xxh3 hashers).  The caller dawdles over
    each leaf, so a loaded machine that is slow to start the pool's thread
    does not see the caller take every leaf before it runs."""
    threads: set[str] = set()
    real = xxhash.xxh3_64
    caller = threading.current_thread().name

    def spy() -> xxhash.xxh3_64:
        name = threading.current_thread().name
        threads.add(name)
        if name == caller:
            time.sleep(0.005)
        return real()

    src, dst = buffers(32 * MiB, seed=8)
    monkeypatch.setattr(copier_module.xxhash, "xxh3_64", spy)
    got = copy_summed(dst, src, pool)
    assert torch.equal(src, dst) and got == checksum(dst.numpy().data)
    assert threading.current_thread().name in threads and len(threads) == 2


def test_copy_summed_does_it_all_when_the_pool_is_busy() -> None:
    with ThreadPoolExecutor(1) as busy:
        release = threading.Event()
        blocker = busy.submit(release.wait, 30)
        try:
            src, dst = buffers(SPLIT_SUMMED + 4097, seed=9)
            got = copy_summed(dst, src, busy)  # its share never starts: the caller takes it back
            assert torch.equal(src, dst) and got == checksum(dst.numpy().data)
        finally:
            release.set()
            blocker.result()


def test_copy_summed_refuses_buffers_of_different_sizes(pool: ThreadPoolExecutor) -> None:
    src, dst = buffers(100)
    with pytest.raises(ValueError, match="copy of 100 bytes into 99"):
        copy_summed(dst[:99], src, pool)
