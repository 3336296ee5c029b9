"""Receive buffers (kvstore/server/buffers.py): size classes, what each may make
resident, and idle buffers handed back to the kernel."""

from __future__ import annotations

import pytest
import torch

from kvstore.server.buffers import MIN_CLASS, BufferPool
from kvstore.server.resident import resident_bytes

MiB = 1 << 20


@pytest.mark.parametrize(
    ("n", "size"),
    [(1, 1), (MIN_CLASS - 1, MIN_CLASS - 1), (MIN_CLASS, MIN_CLASS), (24 * MiB, 24 * MiB),
     (24 * MiB + 1, 26 * MiB), (32 * MiB, 32 * MiB), (33 * MiB, 36 * MiB), (3 * MiB + 1, 3 * MiB + 256 * 1024)],
)
def test_size_classes_waste_at_most_an_eighth(n: int, size: int) -> None:
    assert BufferPool.size_class(n) == size
    assert n <= size <= n + n // 8 + 1


def test_growth_counts_only_pages_not_yet_resident() -> None:
    pool = BufferPool()
    buf = pool.take(24 * MiB - 100)
    assert buf.size == 24 * MiB and buf.growth == 24 * MiB  # fresh: nothing resident yet
    assert buf.advance(MiB + 1) == MiB + 4096  # whole pages
    assert buf.growth == 23 * MiB - 4096
    assert buf.advance(MiB) == 0  # rewriting what is resident adds nothing
    buf.advance(24 * MiB - 100)
    assert buf.growth == 0
    pool.give(buf)
    assert pool.idle == pool.idle_resident == 24 * MiB
    again = pool.take(23 * MiB + 1)  # a smaller put of the same class reuses it: already resident
    assert again is buf and again.growth == 0 and pool.idle == 0
    pool.give(again)
    small = pool.take(1000)
    assert small.size == 1000 and small.growth == 1000 and not small.mapped
    pool.give(small)
    assert pool.idle == 24 * MiB  # small buffers are never pooled


def test_trim_hands_idle_buffers_back_to_the_kernel() -> None:
    pool = BufferPool(max_pooled=256 * MiB)
    bufs = [pool.take(32 * MiB) for _ in range(4)]
    for b in bufs:
        b.write(0, b"\x01" * b.size)
        b.advance(b.size)
    before = resident_bytes()
    for b in bufs:
        pool.give(b)
    assert pool.idle_resident == 128 * MiB
    assert pool.trim(keep=32 * MiB) == 96 * MiB
    assert pool.idle == 32 * MiB
    assert resident_bytes() < before - 90 * MiB  # munmap: the pages are gone at once
    pool.trim()
    assert pool.idle == pool.idle_resident == 0


def test_pool_keeps_at_most_max_pooled_idle() -> None:
    pool = BufferPool(max_pooled=48 * MiB)
    bufs = [pool.take(24 * MiB) for _ in range(3)]
    for b in bufs:
        pool.give(b)
    assert pool.idle == 48 * MiB


def test_a_buffer_still_read_elsewhere_is_neither_reused_nor_unmapped() -> None:
    pool = BufferPool()
    buf = pool.take(2 * MiB)
    buf.write(0, b"\x07" * (2 * MiB))
    # e.g. a tier's copy thread still reading after its put was cancelled
    reader = torch.frombuffer(buf.payload(2 * MiB), dtype=torch.uint8)
    pool.give(buf)
    assert pool.idle == 0  # dropped, not pooled: no other put writes into it
    assert pool.take(2 * MiB) is not buf
    pool.trim()
    assert int(reader.sum()) == 7 * 2 * MiB  # and still mapped while read
    del reader
    # Given back once nothing reads it, a buffer is pooled and reused.
    other = pool.take(2 * MiB)
    view = other.payload(10)
    del view
    pool.give(other)
    assert pool.take(2 * MiB) is other
