"""Chunk metadata: validation and its binary form; the payload checksum."""

from __future__ import annotations

import random

import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from kvstore.chunk import SUM_LEAF, Chunk, ChunkMeta, checksum, checksummer
from kvstore.errors import CorruptChunk, InvalidArgument


def test_meta_round_trip() -> None:
    c = Chunk.from_bytes(bytes(range(256)) * 4, dtype="float16", shape=(2, 256))
    enc = c.meta.encode()
    meta, used = ChunkMeta.decode(enc + b"payload")
    assert meta == c.meta and used == len(enc)
    c.verify()


def test_meta_inconsistent_raw_shape() -> None:
    with pytest.raises(InvalidArgument, match="needs 8 bytes"):
        ChunkMeta(nbytes=10, checksum=0, dtype="float32", shape=(2,))


def test_verify_detects_corruption() -> None:
    data = bytearray(b"x" * 100)
    c = Chunk.from_bytes(data)
    data[5] ^= 1
    with pytest.raises(CorruptChunk):
        c.verify()


@given(st.binary(max_size=300))
def test_decode_never_crashes(blob: bytes) -> None:
    try:
        ChunkMeta.decode(blob)
    except CorruptChunk:
        pass


@given(st.integers(0, 200), st.integers(0, 7))
def test_decode_rejects_bit_flips(pos: int, bit: int) -> None:
    enc = bytearray(ChunkMeta(nbytes=4, checksum=7, dtype="float32", shape=(1,)).encode())
    pos %= len(enc)
    enc[pos] ^= 1 << bit
    with pytest.raises(CorruptChunk):
        ChunkMeta.decode(bytes(enc))


def test_release_runs_once() -> None:
    calls = []
    c = Chunk(ChunkMeta(nbytes=0, checksum=0), memoryview(b""), lambda: calls.append(1))
    with c:
        pass
    c.release()
    assert calls == [1]


# -- the checksum: xxh3-64 up to a leaf, the xxh3-64 of the leaves' digests above ----------
def _leaf_checksum(data: bytes) -> int:
    """The format, computed with xxhash alone: what every producer and verifier must agree on."""
    if len(data) <= 1 << 20:
        return xxhash.xxh3_64_intdigest(data)
    leaves = [data[at : at + (1 << 20)] for at in range(0, len(data), 1 << 20)]
    return xxhash.xxh3_64_intdigest(b"".join(xxhash.xxh3_64_digest(leaf) for leaf in leaves))


SIZES = [0, 1, SUM_LEAF - 1, SUM_LEAF, SUM_LEAF + 1, 2 * SUM_LEAF, 3 * SUM_LEAF + 17]


def test_the_leaf_is_one_mib() -> None:
    # Part of the format: every stored chunk's checksum depends on it.
    assert SUM_LEAF == 1 << 20


@pytest.mark.parametrize("n", SIZES)
def test_checksum_is_xxh3_up_to_a_leaf_and_over_leaf_digests_above(n: int) -> None:
    data = random.Random(n).randbytes(n)
    assert checksum(data) == _leaf_checksum(data)
    if n <= SUM_LEAF:
        assert checksum(data) == xxhash.xxh3_64_intdigest(data)
    else:
        assert checksum(data) != xxhash.xxh3_64_intdigest(data)


@pytest.mark.parametrize("n", SIZES)
def test_checksummer_equals_checksum_over_any_split(n: int) -> None:
    rng = random.Random(n + 1)
    data = rng.randbytes(n)
    for _ in range(4):
        summed = checksummer()
        at = 0
        while at < n:
            k = rng.choice([1, 4095, 64 << 10, SUM_LEAF - 3, SUM_LEAF, SUM_LEAF + 5])
            summed.update(memoryview(data)[at : at + k])
            at += k
        assert summed.intdigest() == checksum(data)
    whole = checksummer()
    whole.update(data)
    assert whole.intdigest() == checksum(data)


def test_checksum_takes_any_contiguous_buffer() -> None:
    values = np.arange(SUM_LEAF // 2 + 7, dtype=np.float32)  # 2 MiB and more: three leaves
    raw = values.tobytes()
    assert checksum(memoryview(values)) == checksum(raw) == checksum(bytearray(raw))
    summed = checksummer()
    summed.update(memoryview(values)[:10])
    summed.update(memoryview(values)[10:])
    assert summed.intdigest() == checksum(raw)


def test_checksum_sees_a_changed_byte_and_leaves_swapped() -> None:
    data = bytearray(random.Random(5).randbytes(2 * SUM_LEAF))
    before = checksum(data)
    swapped = data[SUM_LEAF:] + data[:SUM_LEAF]
    assert checksum(swapped) != before
    data[-1] ^= 1
    assert checksum(data) != before
