"""Eviction policies: unit tests per policy, then properties over random operation sequences."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.errors import ConfigError, InvalidArgument
from kvstore.eviction import (
    DEFAULT_POLICY,
    POLICIES,
    ARCPolicy,
    EvictionPolicy,
    LFUPolicy,
    LRUPolicy,
    S3FIFOPolicy,
    make_policy,
)
from kvstore.keys import ChunkKey, Namespace

NAMES = sorted(POLICIES)


def key(i: int) -> ChunkKey:
    return ChunkKey(Namespace("t", "m"), "0" * 16, "s" + f"{i:064x}")


def evict(p: EvictionPolicy, skip: set[ChunkKey] | None = None) -> ChunkKey:
    """What the store does: ask for a victim, then remove it."""
    pinned = skip or set()
    v = p.victim(lambda k: k in pinned)
    assert v is not None
    p.remove(v)
    return v


# -- registry -------------------------------------------------------------------


def test_registry_names_classes_and_default() -> None:
    assert POLICIES == {"lru": LRUPolicy, "lfu": LFUPolicy, "s3fifo": S3FIFOPolicy, "arc": ARCPolicy}
    assert DEFAULT_POLICY == "lru"
    for name, cls in POLICIES.items():
        p = make_policy(name)
        assert type(p) is cls and p.name == name and len(p) == 0
    assert make_policy("lru") is not make_policy("lru")  # one instance per tier


@pytest.mark.parametrize("bad", ["mru", "LRU", "", None])
def test_unknown_policy_names_the_allowed_values(bad: object) -> None:
    with pytest.raises(ConfigError, match="arc, lfu, lru, s3fifo"):
        make_policy(bad)  # type: ignore[arg-type]


# -- LRU ----------------------------------------------------------------------------


def test_lru_order_and_skip_does_not_reorder() -> None:
    p = LRUPolicy()
    for i in range(3):
        p.insert(key(i), 1)
    p.access(key(0))
    assert p.victim() == key(1)
    assert p.victim(lambda k: k == key(1)) == key(2)
    # Skipping key 1 did not make it recent: it is still next once unskipped.
    assert evict(p) == key(1)
    p.insert(key(2), 1)  # re-insert of a present key is an access
    assert [evict(p), evict(p)] == [key(0), key(2)] and len(p) == 0


# -- LFU ----------------------------------------------------------------------------


def test_lfu_prefers_least_frequent_then_least_recent() -> None:
    p = LFUPolicy()
    for i in range(4):
        p.insert(key(i), 1)
    for i in (0, 0, 2, 3):
        p.access(key(i))
    # frequencies: 0->3, 1->1, 2->2, 3->2 (3 reached 2 after 2 did)
    assert [evict(p) for _ in range(4)] == [key(1), key(2), key(3), key(0)]
    assert p.victim() is None


def test_lfu_removing_a_whole_frequency_keeps_order() -> None:
    p = LFUPolicy()
    for i in range(3):
        p.insert(key(i), 1)
    p.access(key(1))
    p.access(key(2))
    p.access(key(2))
    p.remove(key(1))  # its bucket (frequency 2) empties and is unlinked
    p.access(key(0))  # 0 goes to frequency 2, a bucket created anew
    assert [evict(p), evict(p)] == [key(0), key(2)]


# -- S3-FIFO ----------------------------------------------------------------------


def test_s3fifo_keeps_reused_chunks_through_a_scan() -> None:
    p = S3FIFOPolicy()
    hot = [key(i) for i in range(9)]
    for k in hot:
        p.insert(k, 1)
        p.access(k)
    # A one-off scan of 200 chunks, one eviction per new chunk (capacity 10).
    p.insert(key(100), 1)
    for i in range(101, 300):
        evict(p)
        p.insert(key(i), 1)
    assert all(k in p for k in hot)
    lru = LRUPolicy()
    for k in hot:
        lru.insert(k, 1)
    for i in range(100, 300):
        if len(lru) == 10:
            evict(lru)
        lru.insert(key(i), 1)
    assert not any(k in lru for k in hot)  # what S3-FIFO is for


def test_s3fifo_ghost_hit_goes_to_main() -> None:
    p = S3FIFOPolicy()
    for i in range(5):
        p.insert(key(i), 1)
    assert evict(p) == key(0)  # not reused while in small: evicted, remembered as a ghost
    p.insert(key(0), 1)  # back soon: straight into main
    p.insert(key(9), 1)
    # small holds 1-4 and 9; it is over its share, so its oldest go first and key 0 stays.
    assert [evict(p) for _ in range(5)] == [key(1), key(2), key(3), key(4), key(9)]
    assert evict(p) == key(0)


def test_s3fifo_accessed_small_chunk_moves_to_main_with_count_cleared() -> None:
    p = S3FIFOPolicy()
    p.insert(key(0), 1)
    p.insert(key(1), 1)
    p.access(key(0))
    assert evict(p) == key(1)  # key 0 was promoted to main while looking
    assert evict(p) == key(0)  # ... with its count cleared: not reinserted again


def test_s3fifo_main_gives_accessed_chunks_another_round() -> None:
    p = S3FIFOPolicy()
    for i in range(5):
        p.insert(key(i), 1)
        p.access(key(i))
    assert p.victim() == key(0)  # all five reused: promoted to main, counts cleared
    p.access(key(0))
    p.access(key(1))
    p.access(key(3))
    p.access(key(3))
    # 0 and 1 spend their access and go to the back, in that order; 3 has one more.
    assert [evict(p) for _ in range(3)] == [key(2), key(4), key(0)]
    assert [evict(p) for _ in range(2)] == [key(1), key(3)]


def test_s3fifo_skipped_small_chunk_keeps_its_place() -> None:
    p = S3FIFOPolicy()
    for i in range(4):
        p.insert(key(i), 1)
    assert evict(p, {key(0)}) == key(1)
    assert evict(p) == key(0)  # not sent to the back of the queue for being pinned


def test_s3fifo_small_share_is_counted_in_bytes() -> None:
    p = S3FIFOPolicy()
    for i in range(10):  # ten small chunks reach main
        p.insert(key(i), 1)
        p.access(key(i))
    p.insert(key(50), 1)
    evict(p)  # promotes 0-9; key 50 is the victim
    p.insert(key(99), 100)  # one big new chunk: small holds most of the bytes
    assert p.victim() == key(99)


def test_s3fifo_rejects_bad_ratios() -> None:
    with pytest.raises(InvalidArgument, match="small_ratio"):
        S3FIFOPolicy(small_ratio=1.5)
    with pytest.raises(InvalidArgument, match="ghost_ratio"):
        S3FIFOPolicy(ghost_ratio=-1)


# -- ARC ----------------------------------------------------------------------------


def test_arc_scan_evicts_from_t1_and_keeps_t2() -> None:
    p = ARCPolicy()
    for i in range(4):
        p.insert(key(i), 1)
        p.access(key(i))  # seen twice: T2
    for i in range(100, 150):
        p.insert(key(i), 1)
        if len(p) > 8:
            evict(p)
    assert all(key(i) in p for i in range(4))


def test_arc_ghost_hits_move_the_t1_target() -> None:
    p = ARCPolicy()
    p.insert(key(0), 1)
    for i in range(4, 8):
        p.insert(key(i), 1)
        p.access(key(i))  # T1 = [0], T2 = [4, 5, 6, 7], target 0
    assert evict(p) == key(0)  # T1 over its target: T1's least recent goes, to B1
    p.insert(key(0), 1)  # a B1 hit: T1 deserved more room, the target grows to 1 byte
    p.insert(key(8), 1)
    assert evict(p) == key(4)  # T1 (just key 8) is within its target: T2 gives up one
    p.insert(key(4), 1)  # a B2 hit: T2 deserved more room, the target falls back to 0
    assert evict(p) == key(8)


# -- every policy ---------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_victim_does_not_remove_and_all_skipped_means_none(name: str) -> None:
    p = make_policy(name)
    for i in range(4):
        p.insert(key(i), 1)
    v = p.victim()
    assert v is not None and v in p and len(p) == 4
    assert p.victim(lambda k: True) is None
    assert len(p) == 4 and all(key(i) in p for i in range(4))


@pytest.mark.parametrize("name", NAMES)
def test_unknown_keys_are_ignored(name: str) -> None:
    p = make_policy(name)
    p.access(key(1))
    p.remove(key(1))
    assert len(p) == 0 and key(1) not in p and p.victim() is None


@pytest.mark.parametrize("name", NAMES)
def test_many_pinned_keys(name: str) -> None:
    """Most keys pinned: victims are always unpinned, the state stays whole, each call ends."""
    p = make_policy(name)
    pinned = {key(i) for i in range(2000) if i % 10}
    for i in range(2000):
        p.insert(key(i), 1 + i % 3)
        if i % 3 == 0:
            p.access(key(i))
    victims = {evict(p, pinned) for _ in range(200)}
    assert victims == {key(i) for i in range(0, 2000, 10)}
    assert p.victim(lambda k: k in pinned) is None
    assert len(p) == len(pinned) and all(k in p for k in pinned)
    # Unpinned again, every one of them can go, each exactly once.
    assert {evict(p) for _ in range(len(pinned))} == pinned and len(p) == 0


# -- properties -----------------------------------------------------------------------

N_KEYS = 12
OPS = st.lists(
    st.tuples(
        st.sampled_from(["insert", "insert", "access", "access", "remove", "victim", "victim"]),
        st.integers(0, N_KEYS - 1),
        st.integers(0, (1 << N_KEYS) - 1),  # the nbytes, or the skip mask of a victim call
    ),
    max_size=150,
)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(NAMES), OPS)
def test_policy_matches_reference_set(name: str, ops: list[tuple[str, int, int]]) -> None:
    """Contents equal a plain set; victim never skipped, None only when all are skipped."""
    p = make_policy(name)
    live: set[ChunkKey] = set()
    for op, i, arg in ops:
        k = key(i)
        if op == "insert":
            p.insert(k, 1 + arg % 1000)
            live.add(k)
        elif op == "access":
            p.access(k)
        elif op == "remove":
            p.remove(k)
            live.discard(k)
        else:
            skipped = {key(j) for j in range(N_KEYS) if arg >> j & 1}
            v = p.victim(lambda c: c in skipped)
            if v is None:
                assert live <= skipped
            else:
                assert v in live and v not in skipped
                if i % 4:  # usually the store removes it; sometimes it changes its mind
                    p.remove(v)
                    live.discard(v)
        assert len(p) == len(live)
        assert all((key(j) in p) == (key(j) in live) for j in range(N_KEYS))
    drained = [evict(p) for _ in range(len(live))]
    assert set(drained) == live and len(p) == 0 and p.victim() is None


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_lru_and_lfu_match_reference_models(ops: list[tuple[str, int, int]]) -> None:
    """LRU: least recently touched; LFU: least (count, time it reached that count)."""
    lru, lfu = LRUPolicy(), LFUPolicy()
    touched: dict[ChunkKey, int] = {}
    counts: dict[ChunkKey, tuple[int, int]] = {}
    for t, (op, i, arg) in enumerate(ops):
        k = key(i)
        if op == "insert":
            lru.insert(k, 1)
            lfu.insert(k, 1)
        elif op == "access":
            lru.access(k)
            lfu.access(k)
        elif op == "remove":
            lru.remove(k)
            lfu.remove(k)
        if op == "insert" or (op == "access" and k in touched):
            touched[k] = t
            counts[k] = (counts[k][0] + 1 if k in counts else 1, t)
        elif op == "remove":
            touched.pop(k, None)
            counts.pop(k, None)
        elif op == "victim":
            skipped = {key(j) for j in range(N_KEYS) if arg >> j & 1}
            free = [c for c in touched if c not in skipped]
            assert lru.victim(lambda c: c in skipped) == min(free, key=touched.__getitem__, default=None)
            assert lfu.victim(lambda c: c in skipped) == min(free, key=counts.__getitem__, default=None)
