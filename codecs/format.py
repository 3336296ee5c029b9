"""The one binary format of every encoded KV tensor: self-describing and versioned.

Layout (little-endian)::

    offset  size         field
    0       4            magic b"KVCX"
    4       2            format version (FORMAT_VERSION)
    6       1            codec id (see kvstore.codecs registry)
    7       1            level
    8       1            dtype code (DTYPE_CODES)
    9       1            ndim (0..8)
    10      1            number of sections (0..16)
    11      1            length of the layout string (0..16)
    12      4 * ndim     shape, u32 each
    ..      layout       ASCII, e.g. "LKTHD"
    ..      4 * nsec     section lengths, u32 each
    ..                   the sections, back to back
    end-8   8            xxh3-64 of everything before it

Parsing checks every length against the bytes actually present before
slicing, and the checksum before any codec looks at a section, so a truncated
or corrupted payload fails with :class:`CodecError` up front.  Hostile bytes
with a valid checksum still go through each codec's own checks; the size of
the tensor a header may ask for is bounded by :func:`check_output_size`.
No pickle, no JSON: fixed fields only.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import xxhash

from kvstore.errors import CodecError

MAGIC = b"KVCX"
FORMAT_VERSION = 1
MAX_NDIM = 8
MAX_SECTIONS = 16
MAX_LAYOUT = 16
MAX_DECODED_BYTES = 1 << 34  # 16 GiB: no single chunk is ever that large
_FIXED = struct.Struct("<4sHBBBBBB")
_TRAILER = 8

DTYPE_CODES: dict[torch.dtype, int] = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
DTYPES: dict[int, torch.dtype] = {v: k for k, v in DTYPE_CODES.items()}
DTYPE_NAMES: dict[torch.dtype, str] = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed fields of an encoded tensor."""

    codec_id: int
    level: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    layout: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the decoded tensor."""
        return self.numel * self.dtype.itemsize


def dtype_code(dtype: torch.dtype) -> int:
    """Wire code of a supported floating dtype."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise CodecError(f"dtype {dtype} is not supported; use float16, bfloat16 or float32") from None


def pack(header: Header, sections: Sequence[bytes | bytearray | memoryview]) -> bytes:
    """Serialize a header and its sections, checksum included."""
    if len(header.shape) > MAX_NDIM or any(not 0 <= d < 2**32 for d in header.shape):
        raise CodecError(f"shape {header.shape} cannot be encoded (at most {MAX_NDIM} dims < 2**32)")
    layout = header.layout.encode("ascii")
    if len(layout) > MAX_LAYOUT or len(sections) > MAX_SECTIONS:
        raise CodecError("layout or section count too large")
    if not (0 <= header.codec_id < 256 and 0 <= header.level < 256):
        raise CodecError("codec id and level must fit in one byte")
    lengths = [memoryview(s).nbytes for s in sections]
    if any(n >= 2**32 for n in lengths):
        raise CodecError("a section exceeds 4 GiB")
    head = (
        _FIXED.pack(
            MAGIC,
            FORMAT_VERSION,
            header.codec_id,
            header.level,
            dtype_code(header.dtype),
            len(header.shape),
            len(sections),
            len(layout),
        )
        + struct.pack(f"<{len(header.shape)}I", *header.shape)
        + layout
        + struct.pack(f"<{len(lengths)}I", *lengths)
    )
    body = b"".join([head, *(bytes(s) if not isinstance(s, bytes) else s for s in sections)])
    return body + xxhash.xxh3_64_digest(body)[::-1]  # stored little-endian like the other fields


def unpack(data: bytes | bytearray | memoryview) -> tuple[Header, list[memoryview]]:
    """Parse and verify; sections are zero-copy views into ``data``."""
    view = memoryview(data).cast("B")
    n = view.nbytes
    if n < _FIXED.size + _TRAILER:
        raise CodecError(f"encoded tensor truncated: {n} bytes")
    magic, version, codec_id, level, dcode, ndim, nsec, nlayout = _FIXED.unpack_from(view, 0)
    if magic != MAGIC:
        raise CodecError("not an encoded KV tensor (bad magic)")
    if version != FORMAT_VERSION:
        raise CodecError(f"format version {version} is not supported (this build reads {FORMAT_VERSION})")
    if ndim > MAX_NDIM or nsec > MAX_SECTIONS or nlayout > MAX_LAYOUT or dcode not in DTYPES:
        raise CodecError("header fields out of range")
    pos = _FIXED.size
    head_end = pos + 4 * ndim + nlayout + 4 * nsec
    if n < head_end + _TRAILER:
        raise CodecError("encoded tensor truncated inside its header")
    if xxhash.xxh3_64_digest(view[: n - _TRAILER])[::-1] != view[n - _TRAILER :].tobytes():
        raise CodecError("encoded tensor fails its checksum")
    shape = struct.unpack_from(f"<{ndim}I", view, pos)
    pos += 4 * ndim
    try:
        layout = view[pos : pos + nlayout].tobytes().decode("ascii")
    except UnicodeDecodeError:
        raise CodecError("layout is not ASCII") from None
    pos += nlayout
    lengths = struct.unpack_from(f"<{nsec}I", view, pos)
    pos += 4 * nsec
    if pos + sum(lengths) != n - _TRAILER:
        raise CodecError("section lengths do not add up to the payload size")
    sections = []
    for length in lengths:
        sections.append(view[pos : pos + length])
        pos += length
    return Header(codec_id, level, DTYPES[dcode], tuple(shape), layout), sections


def reseal(data: bytes | bytearray) -> bytes:
    """Recompute the checksum of (possibly modified) bytes.

    For tests: a fuzzer that reseals its mutations reaches the codecs' own
    checks instead of stopping at the checksum.
    """
    body = bytes(data[:-_TRAILER]) if len(data) >= _TRAILER else b""
    return body + xxhash.xxh3_64_digest(body)[::-1]


def check_output_size(header: Header, input_bytes: int, max_per_input_byte: float) -> None:
    """Refuse a header whose tensor is larger than its encoding could possibly hold.

    ``max_per_input_byte`` is the codec's proven bound on decoded bytes per
    encoded byte; together with :data:`MAX_DECODED_BYTES` it caps what a
    decoder allocates before it reads any payload.
    """
    if header.nbytes > MAX_DECODED_BYTES:
        raise CodecError(f"decoded size {header.nbytes} exceeds the {MAX_DECODED_BYTES} byte limit")
    if header.nbytes > max_per_input_byte * input_bytes + 4096:
        raise CodecError(
            f"header claims {header.nbytes} decoded bytes from {input_bytes} encoded bytes: not possible"
        )
