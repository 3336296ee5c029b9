"""Chunk metadata: validation and its binary form."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.chunk import Chunk, ChunkMeta
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
