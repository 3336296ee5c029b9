"""The container format: round trip, and rejection of truncated or corrupted bytes."""

from __future__ import annotations

import struct

import pytest
import torch

from kvstore.codecs import format as fmt
from kvstore.errors import CodecError


def _sample() -> bytes:
    header = fmt.Header(codec_id=1, level=0, dtype=torch.float16, shape=(2, 2, 3, 1, 4), layout="LKTHD")
    return fmt.pack(header, [b"\x00" * 96, b"abc"])


def test_round_trip_keeps_every_field() -> None:
    header, sections = fmt.unpack(_sample())
    assert header == fmt.Header(1, 0, torch.float16, (2, 2, 3, 1, 4), "LKTHD")
    assert [bytes(s) for s in sections] == [b"\x00" * 96, b"abc"]
    assert header.nbytes == 2 * 2 * 3 * 4 * 2


def test_every_truncation_is_rejected() -> None:
    data = _sample()
    for n in range(len(data)):
        with pytest.raises(CodecError):
            fmt.unpack(data[:n])


def test_every_single_bit_flip_is_rejected() -> None:
    data = _sample()
    for i in range(len(data)):
        for bit in (0, 7):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            with pytest.raises(CodecError):
                fmt.unpack(bytes(bad))


def test_resealed_header_fields_are_checked() -> None:
    data = bytearray(_sample())
    data[4:6] = struct.pack("<H", 99)  # version
    with pytest.raises(CodecError, match="version"):
        fmt.unpack(fmt.reseal(data))
    data = bytearray(_sample())
    data[9] = 200  # ndim
    with pytest.raises(CodecError):
        fmt.unpack(fmt.reseal(data))
    data = bytearray(_sample())
    data[8] = 9  # dtype code
    with pytest.raises(CodecError):
        fmt.unpack(fmt.reseal(data))


def test_output_size_is_bounded_by_input_size() -> None:
    header = fmt.Header(4, 0, torch.float16, (1 << 20, 2, 1024, 8, 128), "LKTHD")
    with pytest.raises(CodecError, match="limit"):
        fmt.check_output_size(header, 1000, 1000.0)
    header = fmt.Header(4, 0, torch.float16, (30, 2, 256, 3, 64), "LKTHD")
    with pytest.raises(CodecError, match="not possible"):
        fmt.check_output_size(header, 100, 2.0)
    fmt.check_output_size(header, header.nbytes, 1.0)


def test_unsupported_dtype_is_refused() -> None:
    with pytest.raises(CodecError):
        fmt.dtype_code(torch.int32)
