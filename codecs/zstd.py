"""``zstd``: lossless, zstandard over byte-shuffled values.

Floating-point KV compresses poorly byte by byte because each element mixes a
low-entropy byte (sign, exponent) with a near-random one (low mantissa).
Shuffling puts all first bytes together, then all second bytes, so zstd sees
long runs of similar exponent bytes; on SmolLM2 KV that is what makes zstd
worth anything at all (see docs/codecs.md).  The low mantissa bytes stay
near-random even then: levels 0 and 1 test a sample of each plane and store
such a plane as it is, which halves the work at a cost of ~0.2 % in size;
level 2 runs zstd over every plane.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    skip_incompressible: bool  # store near-random byte planes as they are instead of running zstd over them


LEVELS: dict[int, ZstdLevel] = {0: ZstdLevel(1, True), 1: ZstdLevel(3, True), 2: ZstdLevel(3, False)}

# A zstd frame cannot expand by more than this: an RLE block is 4 bytes for
# up to 128 KiB of output.  Used only to refuse absurd headers early.
_MAX_RATIO = 1 << 15

# A byte plane whose first _SAMPLE bytes shrink by less than this is stored raw
# (the low mantissa bytes of fp16/bf16 KV: zstd takes time and saves ~0.2 %).
_SAMPLE = 64 << 10
_WORTH = 0.97

_RAW, _ZSTD = 0, 1

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


def unshuffle(planes: Sequence[np.ndarray] | np.ndarray, width: int) -> np.ndarray:
    """Inverse of :func:`shuffle` (``planes``: ``width`` byte planes, or one array of them): the
    values' bytes, in native (little-endian) order."""
    p = planes.reshape(width, -1) if isinstance(planes, np.ndarray) else planes
    out = p[width - 1].astype(_UINT[width])
    for k in range(width - 2, -1, -1):
        out <<= 8
        out |= p[k]
    planes_out: np.ndarray = out.view(np.uint8)
    return planes_out


class ZstdCodec(Codec):
    """zstandard over byte planes.

    Sections: one byte per plane saying how it is stored (0 raw, 1 zstd frame), then
    the planes, least significant first.  Payloads of an earlier version have a single
    section (one zstd frame of all planes; at level 2 of the unshuffled bytes) and still
    decode.
    """

    name = "zstd"
    codec_id = 2
    levels = tuple(LEVELS)
    default_level = 0
    lossless = True

    def max_expansion(self, header: fmt.Header) -> float:
        return float(_MAX_RATIO)

    def _encode_sections(self, kv: torch.Tensor, level: int) -> list[bytes]:
        lv = LEVELS[level]
        planes = shuffle(as_numpy_bits(kv))
        # threads=-1: zstd splits large inputs into jobs on every core.
        cctx = zstandard.ZstdCompressor(level=lv.zstd_level, threads=-1, write_content_size=True)
        flags = bytearray()
        out: list[bytes] = [b""]
        for plane in planes:
            data = plane.data.cast("B")
            if lv.skip_incompressible and not _worth_compressing(cctx, data):
                flags.append(_RAW)
                out.append(bytes(data))
                continue
            frame = cctx.compress(data)
            if len(frame) >= data.nbytes:
                flags.append(_RAW)
                out.append(bytes(data))
            else:
                flags.append(_ZSTD)
                out.append(frame)
        out[0] = bytes(flags)
        return out

    def _decode_sections(
        self, header: fmt.Header, sections: list[memoryview], device: torch.device
    ) -> torch.Tensor:
        width = header.dtype.itemsize
        if len(sections) == 1:
            flat = _decode_legacy(header, sections[0], width)
        else:
            flat = _decode_planes(header, sections, width)
        out = torch.from_numpy(flat).view(header.dtype).reshape(header.shape)
        return out.to(device) if device.type != "cpu" else out


def _worth_compressing(cctx: zstandard.ZstdCompressor, data: memoryview) -> bool:
    """Whether zstd shrinks a sample of ``data`` enough to be worth running over all of it."""
    if data.nbytes <= _SAMPLE:
        return True
    return len(cctx.compress(data[:_SAMPLE])) < _WORTH * _SAMPLE


def _decompress(frame: memoryview, size: int, what: str) -> bytes:
    try:
        raw = zstandard.ZstdDecompressor().decompress(frame, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd frame of {what} is corrupt: {exc}") from exc
    if len(raw) != size:
        raise CodecError(f"zstd frame of {what} holds {len(raw)} bytes, header needs {size}")
    return raw


def _decode_planes(header: fmt.Header, sections: list[memoryview], width: int) -> np.ndarray:
    flags = bytes(sections[0])
    if len(sections) != width + 1 or len(flags) != width or any(f not in (_RAW, _ZSTD) for f in flags):
        raise CodecError(
            f"zstd payload of {header.dtype} must have {width + 1} sections (plane flags, then {width} planes), "
            f"got {len(sections)} with flags {flags[:8].hex()}"
        )
    size = header.nbytes // width
    planes: list[np.ndarray] = []
    for k, (flag, section) in enumerate(zip(flags, sections[1:], strict=True)):
        if flag == _RAW:
            if section.nbytes != size:
                raise CodecError(f"raw byte plane {k} holds {section.nbytes} bytes, header needs {size}")
            planes.append(np.frombuffer(section, dtype=np.uint8))
        else:
            planes.append(np.frombuffer(_decompress(section, size, f"byte plane {k}"), dtype=np.uint8))
    return unshuffle(planes, width).reshape(-1)


def _decode_legacy(header: fmt.Header, frame: memoryview, width: int) -> np.ndarray:
    """A payload of the first version: one zstd frame, byte planes at levels 0-1, plain bytes at level 2."""
    flat = np.frombuffer(_decompress(frame, header.nbytes, "the payload"), dtype=np.uint8)
    if header.level != 2:
        return unshuffle(flat, width).reshape(-1)
    return flat.copy()  # frombuffer over bytes is read-only; torch wants writable memory
