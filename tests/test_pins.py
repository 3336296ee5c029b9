"""Pin leases: expire on their own, on the monotonic clock."""

from __future__ import annotations

import math
import time

import pytest

from kvstore.errors import InvalidArgument
from kvstore.keys import ChunkKey, Namespace
from kvstore.pins import MAX_TTL_S, PinTable


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_lease_expires_by_itself() -> None:
    clock = FakeClock(100.0)
    t = PinTable(clock=clock)
    lease = t.pin("k", 5)
    assert lease.key == "k" and lease.expires_at == 105.0
    assert t.is_pinned("k") and len(t) == 1
    clock.now = 104.9
    assert t.is_pinned("k") and t.remaining("k") == pytest.approx(0.1)
    clock.now = 105.0  # the lease ends at its expiry, nobody unpinned
    assert not t.is_pinned("k") and len(t) == 0 and t.remaining("k") == 0.0
    assert t.pinned() == []


def test_repin_extends_and_never_shortens() -> None:
    clock = FakeClock(0.0)
    t = PinTable(clock=clock)
    t.pin("k", 5)
    clock.now = 4.0
    assert t.pin("k", 5).expires_at == 9.0  # extended from 5 to 9
    clock.now = 8.0
    assert t.is_pinned("k")
    # Another client's shorter pin must not cut the lease short.
    assert t.pin("k", 0.5).expires_at == 9.0
    clock.now = 8.9
    assert t.is_pinned("k")
    clock.now = 9.0
    assert not t.is_pinned("k")


def test_unpin_ends_a_live_lease_only() -> None:
    clock = FakeClock(0.0)
    t = PinTable(clock=clock)
    t.pin("a", 5)
    t.pin("b", 5)
    assert t.unpin("a") and not t.is_pinned("a") and not t.unpin("a")
    clock.now = 6.0
    assert not t.unpin("b")  # already expired: nothing live to end
    assert not t.unpin("never-pinned") and len(t) == 0


def test_pinned_lists_live_leases_with_remaining_seconds() -> None:
    clock = FakeClock(0.0)
    t = PinTable(clock=clock)
    for i in range(1, 6):
        t.pin(i, float(i))
    clock.now = 2.5
    assert sorted(t.pinned()) == [(3, 0.5), (4, 1.5), (5, 2.5)]
    assert len(t) == 3


def test_chunk_keys_and_purge_after_many_repins() -> None:
    clock = FakeClock(0.0)
    t = PinTable(clock=clock)
    keys = [ChunkKey(Namespace("t", "m"), "0" * 16, "p" + f"{i:064x}") for i in range(50)]
    for step in range(200):  # many re-pins: stale expiries pile up and must not leak
        clock.now = float(step)
        for k in keys:
            t.pin(k, 10)
    assert len(t) == 50 and len(t._heap) <= 2 * 50 + 64 + 1
    clock.now = 199.0 + 10
    assert t.purge() == 50 and len(t) == 0 and t.pinned() == []


def test_wall_clock_jumps_do_not_matter(monkeypatch: pytest.MonkeyPatch) -> None:
    t = PinTable()  # the real monotonic clock
    t.pin("k", 30)
    monkeypatch.setattr(time, "time", lambda: 0.0)  # the wall clock jumps back to 1970
    assert t.is_pinned("k") and 29 < t.remaining("k") <= 30
    monkeypatch.setattr(time, "time", lambda: 4e9)  # ... and past 2096
    assert t.is_pinned("k") and 29 < t.remaining("k") <= 30


@pytest.mark.parametrize("ttl", [0, -1, math.inf, math.nan, MAX_TTL_S + 1, True, "5", None])
def test_bad_ttl_is_refused_naming_the_argument(ttl: object) -> None:
    t = PinTable()
    with pytest.raises(InvalidArgument, match="ttl_s"):
        t.pin("k", ttl)  # type: ignore[arg-type]
    assert len(t) == 0


def test_max_ttl_is_allowed_and_configurable() -> None:
    assert PinTable(clock=FakeClock()).pin("k", MAX_TTL_S).expires_at == 100.0 + MAX_TTL_S
    t = PinTable(clock=FakeClock(), max_ttl_s=60)
    with pytest.raises(InvalidArgument, match=r"\(0, 60\]"):
        t.pin("k", 61)
    with pytest.raises(InvalidArgument, match="max_ttl_s"):
        PinTable(max_ttl_s=0)
