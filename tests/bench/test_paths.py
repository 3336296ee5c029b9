"""The rounds the client-path benchmarks share (kvstore/bench/paths.py)."""

from __future__ import annotations

import pytest

from kvstore.bench.paths import SLOTS, WARMUP, Rounds
from kvstore.keys import KeyBuilder, LayoutFingerprint, Namespace

KB = KeyBuilder(Namespace("bench", "paths"), LayoutFingerprint("uint8", 1, 1, 1, chunk_size=1))


def test_rounds_alternate_the_clients_over_new_values_and_time_all_but_the_warmup() -> None:
    r = Rounds(["a", "b"], KB, 64, rounds=SLOTS + 1)
    seen = []
    for i, name, key in r.steps():
        seen.append((i, name, key, bytes(r.src.numpy())))
        r.dst.copy_(r.src)  # a client that read back what it put
        r.record(i, name, 1.0, 3.0, 6.0)
    assert [name for _, name, _, _ in seen] == ["a", "b"] * (SLOTS + 1 + WARMUP)
    assert len({value for *_, value in seen}) == len(seen)  # each put a new value
    assert len({key for _, _, key, _ in seen}) == SLOTS
    assert r.times == {name: ([2.0] * (SLOTS + 1), [3.0] * (SLOTS + 1)) for name in "ab"}


def test_a_wrong_read_back_is_an_error() -> None:
    r = Rounds(["only"], KB, 64, rounds=1)
    i, name, _ = next(r.steps())
    r.dst.zero_()
    r.src.fill_(1)
    with pytest.raises(RuntimeError, match="only: wrong bytes back for a 64-byte value"):
        r.record(i, name, 0.0, 0.0, 0.0)
