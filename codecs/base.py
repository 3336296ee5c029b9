"""The codec interface.

A codec turns a KV tensor into bytes and back.  Two primitives:

* :meth:`Codec.encode` is called by whoever stores a chunk (a connector's put,
  a tier that recompresses); it may assume a contiguous floating tensor in the
  layout it is told, on any device;
* :meth:`Codec.decode` is called by whoever loads a chunk; it may assume
  nothing about its input, which may be truncated, corrupted or hostile, and
  must raise :class:`~kvstore.errors.CodecError` for anything it cannot decode,
  without crashing, hanging or allocating more than the header allows.

Subclasses implement :meth:`_encode_sections` and :meth:`_decode_sections`;
this base class owns the container (:mod:`kvstore.codecs.format`), so every
codec shares the same header, checksum and size checks.  Encoded bytes are
portable: whatever device encoded them, any host can decode them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from kvstore.chunk import CANONICAL_LAYOUT
from kvstore.codecs import format as fmt
from kvstore.errors import CodecError, InvalidArgument


class Codec(ABC):
    """Encode a KV tensor to bytes; decode bytes to a tensor on a chosen device."""

    name: ClassVar[str]
    codec_id: ClassVar[int]
    levels: ClassVar[tuple[int, ...]] = (0,)
    default_level: ClassVar[int] = 0
    lossless: ClassVar[bool] = False
    needs_kv_layout: ClassVar[bool] = False
    """True when the codec interprets the dimensions (needs ``LKTHD``)."""

    def level_or_default(self, level: int | None) -> int:
        """Validate a level (``None`` means the default)."""
        lv = self.default_level if level is None else level
        if lv not in self.levels:
            raise InvalidArgument(f"codec {self.name!r} has no level {lv}; levels are {list(self.levels)}")
        return lv

    def encode(self, kv: torch.Tensor, layout: str = CANONICAL_LAYOUT, level: int | None = None) -> bytes:
        """Encode ``kv`` (float16, bfloat16 or float32) with its layout at ``level``."""
        lv = self.level_or_default(level)
        if kv.dtype not in fmt.DTYPE_CODES:
            raise InvalidArgument(f"cannot encode dtype {kv.dtype}; use float16, bfloat16 or float32")
        if self.needs_kv_layout:
            if layout != CANONICAL_LAYOUT or kv.dim() != 5 or kv.shape[1] != 2:
                raise InvalidArgument(
                    f"codec {self.name!r} needs the canonical {CANONICAL_LAYOUT} layout "
                    f"[layers, 2, tokens, kv_heads, head_dim], got {layout} {tuple(kv.shape)}"
                )
        header = fmt.Header(self.codec_id, lv, kv.dtype, tuple(int(d) for d in kv.shape), layout)
        sections = self._encode_sections(kv.contiguous(), lv)
        return fmt.pack(header, sections)

    def decode(self, data: bytes | bytearray | memoryview, device: str | torch.device = "cpu") -> torch.Tensor:
        """Decode bytes produced by :meth:`encode` (on any host) into a tensor on ``device``."""
        header, sections = fmt.unpack(data)
        if header.codec_id != self.codec_id:
            raise CodecError(f"payload was encoded with codec id {header.codec_id}, not {self.name!r}")
        if header.level not in self.levels:
            raise CodecError(f"codec {self.name!r} has no level {header.level}")
        if self.needs_kv_layout and (
            len(header.shape) != 5 or header.shape[1] != 2 or header.layout != CANONICAL_LAYOUT
        ):
            raise CodecError(f"codec {self.name!r} payload has shape {header.shape}, layout {header.layout}")
        fmt.check_output_size(header, memoryview(data).nbytes, self.max_expansion(header))
        return self._decode_sections(header, sections, torch.device(device))

    @abstractmethod
    def max_expansion(self, header: fmt.Header) -> float:
        """Largest possible decoded bytes per encoded byte (a proven bound, used before allocating)."""

    @abstractmethod
    def _encode_sections(self, kv: torch.Tensor, level: int) -> list[bytes]:
        """The codec's sections for a contiguous tensor."""

    @abstractmethod
    def _decode_sections(
        self, header: fmt.Header, sections: list[memoryview], device: torch.device
    ) -> torch.Tensor:
        """Rebuild the tensor; raise CodecError on anything inconsistent."""
