"""``zstd``: lossless, zstandard over byte-shuffled values.

Floating-point KV compresses poorly byte by byte because each element mixes a
low-entropy byte (sign, exponent) with a near-random one (low mantissa).
Shuffling puts all first bytes together, then all second bytes, so zstd sees
long runs of similar exponent bytes; on SmolLM2 KV that is what makes zstd
worth anything at all (see docs/codecs.md).  Levels trade speed for size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from kvstore.codecs import format as fmt
from kvstore.codecs.base import Codec
from kvstore.codecs.tensor_bytes import as_numpy_bits
from kvstore.errors import CodecError


@dataclass(frozen=True)
class ZstdLevel:
    zstd_level: int
    shuffle: bool


LEVELS: dict[int, ZstdLevel] = {0: ZstdLevel(1, True), 1: ZstdLevel(3, True), 2: ZstdLevel(3, False)}

# A zstd frame cannot expand by more than this: an RLE block is 4 bytes for
# up to 128 KiB of output.  Used only to refuse absurd headers early.
_MAX_RATIO = 1 << 15


_UINT = {2: np.uint16, 4: np.uint32}


def shuffle(bits: np.ndarray) -> np.ndarray:
    """Byte planes: all first (least significant) bytes, then all second bytes, ...

    Done with shifts and masks over contiguous arrays: a strided transpose of
    the byte matrix runs at well under 1 GB/s, these at memory speed.
    """
    width = bits.dtype.itemsize
    u = bits.reshape(-1).view(_UINT[width])
    out = np.empty((width, u.size), np.uint8)
    for k in range(width):
        np.bitwise_and(u >> (8 * k) if k else u, 0xFF, out=out[k], casting="unsafe")
    return out


def unshuffle(planes: np.ndarray, width: int) -> np.ndarray:
    """Inverse of :func:`shuffle`: the values' bytes, in native (little-endian) order."""
    p = planes.reshape(width, -1)
    out = p[width - 1].astype(_UINT[width])
    for k in range(width - 2, -1, -1):
        out <<= 8
        out |= p[k]
    planes_out: np.ndarray = out.view(np.uint8)
    return planes_out


class ZstdCodec(Codec):
    """zstandard, optionally over byte planes; one section: the zstd frame."""

    name = "zstd"
    codec_id = 2
    levels = tuple(LEVELS)
    default_level = 0
    lossless = True

    def max_expansion(self, header: fmt.Header) -> float:
        return float(_MAX_RATIO)

    def _encode_sections(self, kv: torch.Tensor, level: int) -> list[bytes]:
        lv = LEVELS[level]
        bits = as_numpy_bits(kv)
        data = shuffle(bits) if lv.shuffle else bits
        # threads=-1: zstd splits large inputs into jobs on every core.
        cctx = zstandard.ZstdCompressor(level=lv.zstd_level, threads=-1, write_content_size=True)
        return [cctx.compress(data.data.cast("B"))]

    def _decode_sections(
        self, header: fmt.Header, sections: list[memoryview], device: torch.device
    ) -> torch.Tensor:
        if len(sections) != 1:
            raise CodecError("zstd payload must have exactly one section")
        try:
            raw = zstandard.ZstdDecompressor().decompress(sections[0], max_output_size=header.nbytes)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd frame is corrupt: {exc}") from exc
        if len(raw) != header.nbytes:
            raise CodecError(f"zstd frame holds {len(raw)} bytes, header needs {header.nbytes}")
        width = header.dtype.itemsize
        flat = np.frombuffer(raw, dtype=np.uint8)
        if LEVELS[header.level].shuffle:
            flat = unshuffle(flat, width).reshape(-1)
        else:
            flat = flat.copy()  # frombuffer over bytes is read-only; torch wants writable memory
        out = torch.from_numpy(flat).view(header.dtype).reshape(header.shape)
        return out.to(device) if device.type != "cpu" else out
