"""The free-list allocator: no overlap, capacity holds, frees coalesce."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.tiers.allocator import FreeListAllocator


@settings(max_examples=200)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5000)), max_size=200))
def test_allocations_never_overlap(ops: list[tuple[bool, int]]) -> None:
    a = FreeListAllocator(64 * 1024, align=256)
    live: dict[int, int] = {}
    for is_alloc, size in ops:
        if is_alloc or not live:
            off = a.alloc(size)
            if off is None:
                assert not a.fits(size)
                continue
            n = a.size_of(off)
            assert n >= size and off + n <= a.capacity
            for o, m in live.items():
                assert off + n <= o or o + m <= off
            live[off] = n
        else:
            off = sorted(live)[size % len(live)]
            assert a.free(off) == live.pop(off)
        assert a.used == sum(live.values()) <= a.capacity
    for off in list(live):
        a.free(off)
    assert a.used == 0 and a.free_blocks == 1 and a.largest_free == a.capacity
