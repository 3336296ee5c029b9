"""raw and zstd: exact round trips of real KV in every dtype, and their failure modes."""

from __future__ import annotations

import pytest
import torch
import zstandard

from kvstore.codecs import format as fmt
from kvstore.codecs import get_codec
from kvstore.codecs.zstd import shuffle
from kvstore.errors import CodecError
from tests.codecs.conftest import RealKV


@pytest.mark.parametrize("name", ["raw", "zstd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bit_exact(real_kv: RealKV, name: str, dtype: torch.dtype) -> None:
    chunk = real_kv.chunk(2, dtype)
    codec = get_codec(name)
    for level in codec.levels:
        out = codec.decode(codec.encode(chunk, level=level))
        assert out.dtype == dtype and out.shape == chunk.shape
        assert torch.equal(out.view(torch.uint8), chunk.view(torch.uint8))


def test_zstd_byte_planes_help_on_real_kv(real_kv: RealKV) -> None:
    chunk = real_kv.chunk(2)
    plain = len(zstandard.ZstdCompressor(level=3).compress(chunk.numpy().tobytes()))
    for level in get_codec("zstd").levels:
        assert len(get_codec("zstd").encode(chunk, level=level)) < plain < chunk.numel() * 2


def test_zstd_stores_the_near_random_plane_raw(real_kv: RealKV) -> None:
    chunk = real_kv.chunk(2)  # fp16: the low byte is mostly mantissa noise
    codec = get_codec("zstd")
    for level, flags in ((0, b"\x00\x01"), (1, b"\x00\x01"), (2, b"\x01\x01")):
        _, sections = fmt.unpack(codec.encode(chunk, level=level))
        assert bytes(sections[0]) == flags, level
        assert len(sections) == 3


@pytest.mark.parametrize("level", [0, 1, 2])
def test_zstd_payloads_of_the_first_version_still_decode(real_kv: RealKV, level: int) -> None:
    chunk = real_kv.chunk(1)
    bits = chunk.numpy().view("uint16")
    data = bits.tobytes() if level == 2 else shuffle(bits).tobytes()
    legacy = fmt.pack(fmt.Header(2, level, chunk.dtype, tuple(chunk.shape), "LKTHD"),
                      [zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data)])
    assert torch.equal(get_codec("zstd").decode(legacy).view(torch.uint8), chunk.view(torch.uint8))


def test_zstd_malformed_planes_are_refused(small_kv: torch.Tensor) -> None:
    codec = get_codec("zstd")
    header, sections = fmt.unpack(codec.encode(small_kv, level=2))
    assert bytes(sections[0])[1] == 1  # the high plane (sign, exponent) is a zstd frame
    bad = [
        [b"\x01\x07", *sections[1:]],  # unknown plane flag
        [sections[0], sections[1]],  # a plane missing
        [bytes(sections[0])[:1] + b"\x00", sections[1], sections[2]],  # a zstd frame declared raw (wrong size)
        [sections[0], sections[1], bytes(sections[2])[:-3]],  # truncated frame
    ]
    for secs in bad:
        with pytest.raises(CodecError):
            codec.decode(fmt.pack(header, secs))


def test_zstd_frame_claiming_more_than_the_header_is_refused(small_kv: torch.Tensor) -> None:
    codec = get_codec("zstd")
    bigger = codec.encode(torch.cat([small_kv, small_kv], 2))
    header, sections = fmt.unpack(bigger)
    forged = fmt.pack(fmt.Header(header.codec_id, 0, header.dtype, tuple(small_kv.shape), "LKTHD"), [sections[0]])
    with pytest.raises(CodecError):
        codec.decode(forged)


def test_raw_size_mismatch_is_refused(small_kv: torch.Tensor) -> None:
    codec = get_codec("raw")
    _, sections = fmt.unpack(codec.encode(small_kv))
    forged = fmt.pack(fmt.Header(codec.codec_id, 0, torch.float16, (1, 2, 33, 3, 64), "LKTHD"), [sections[0]])
    with pytest.raises(CodecError):
        codec.decode(forged)
