"""Chunk values: payload bytes plus metadata.

The canonical in-memory KV layout of a chunk is ``LKTHD``::

    [num_layers, 2 (K then V), tokens, num_kv_heads, head_dim]

Connectors gather an engine's paged KV into this layout before a put and
scatter it back after a get; codecs encode this layout.  The payload of a chunk
is whatever the codec named in its metadata produced (``raw`` = the tensor's
bytes, C order).

:class:`ChunkMeta` has a compact, versioned binary encoding (used by the disk
tier and the wire) — no pickle anywhere.
"""

from __future__ import annotations

import collections
import json
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import xxhash

from kvstore.errors import CorruptChunk, InvalidArgument

CANONICAL_LAYOUT = "LKTHD"
MAX_DIMS = 8
_META_MAGIC = b"KVM1"
_META_HEAD = struct.Struct("<4sI")  # magic, length of the JSON body
_META_TAIL = struct.Struct("<I")  # crc32 of head+body

DTYPE_SIZES: dict[str, int] = {
    "uint8": 1,
    "int8": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float16": 2,
    "bfloat16": 2,
    "int16": 2,
    "float32": 4,
    "int32": 4,
    "float64": 8,
    "int64": 8,
}


#: Payloads longer than this are checksummed leaf by leaf (see :func:`checksum`).
SUM_LEAF = 1 << 20


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The checksum of a payload (``ChunkMeta.checksum``): its xxh3-64 when it
    is at most :data:`SUM_LEAF` bytes long; else the xxh3-64 of the xxh3-64
    digests (8 bytes each, big-endian) of its leaves, :data:`SUM_LEAF` bytes
    each but the last.

    The leaves make a long payload's checksum parallel: two threads copying
    and summing halves of a 32 MiB chunk finish together, where xxh3 over
    the whole (sequential) kept one thread summing after the copies were
    done (:func:`sum_leaves`, ``copy_summed`` in kvstore/tiers/copier.py).
    xxh3 runs at about 25 GB/s here."""
    view = byte_view(data)
    n = view.nbytes
    if n <= SUM_LEAF:
        return xxhash.xxh3_64_intdigest(view)
    return combine_leaves([xxhash.xxh3_64_digest(view[at : at + SUM_LEAF]) for at in range(0, n, SUM_LEAF)])


def sum_leaves(n: int, leaf: Callable[[int, int], bytes], pool: Executor | None = None) -> int:
    """The checksum of ``n`` (> :data:`SUM_LEAF`) bytes from ``leaf(start, end)``,
    which returns the xxh3-64 digest of the leaf ``[start, end)`` (and may do more
    with it: copy it first).  The calling thread takes leaves from the start and,
    with a ``pool``, one of its threads takes them from the end, until they meet;
    the calling thread does them all when a busy pool never starts its thread."""
    starts = range(0, n, SUM_LEAF)
    digests = [b""] * len(starts)
    todo = collections.deque(range(len(starts)))  # pop and popleft are atomic: each leaf is done once

    def take_leaves(take: Callable[[], int]) -> None:
        while True:
            try:
                i = take()
            except IndexError:
                return
            digests[i] = leaf(starts[i], min(starts[i] + SUM_LEAF, n))

    helper = pool.submit(take_leaves, todo.pop) if pool is not None else None
    try:
        take_leaves(todo.popleft)
    finally:
        todo.clear()  # raised: the helper stops after its current leaf
        if helper is not None and not helper.cancel():
            helper.result()  # never return while a thread still works on the payload
    return combine_leaves(digests)


def combine_leaves(digests: list[bytes]) -> int:
    """The checksum of a payload longer than :data:`SUM_LEAF` from its leaves' digests, in order."""
    return xxhash.xxh3_64_intdigest(b"".join(digests))


def byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat byte view of a contiguous buffer."""
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class Checksummer:
    """:func:`checksum` piece by piece: ``update`` with consecutive parts of a
    payload (any sizes), then ``intdigest()`` equals ``checksum`` of the whole."""

    __slots__ = ("_leaf", "_left", "_digests")

    def __init__(self) -> None:
        self._leaf = xxhash.xxh3_64()
        self._left = SUM_LEAF  # bytes the current leaf still takes
        self._digests: list[bytes] = []  # of the leaves before the current one

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = byte_view(data)
        while view.nbytes:
            if not self._left:  # the current leaf is full and more follows: a leaf of its own
                self._digests.append(self._leaf.digest())
                self._leaf.reset()
                self._left = SUM_LEAF
            k = min(self._left, view.nbytes)
            self._leaf.update(view[:k] if k < view.nbytes else view)
            self._left -= k
            view = view[k:]

    def intdigest(self) -> int:
        if not self._digests:
            return self._leaf.intdigest()
        return combine_leaves([*self._digests, self._leaf.digest()])


def checksummer() -> Checksummer:
    """A :class:`Checksummer`."""
    return Checksummer()


@dataclass(frozen=True, slots=True)
class ChunkMeta:
    """What a reader needs to interpret a chunk's payload.

    ``nbytes`` and ``checksum`` describe the payload as stored (after the
    codec); ``dtype``/``shape`` describe the decoded tensor.
    """

    nbytes: int
    checksum: int
    codec: str = "raw"
    codec_version: int = 1
    dtype: str = "uint8"
    shape: tuple[int, ...] = ()
    layout: str = CANONICAL_LAYOUT

    def __post_init__(self) -> None:
        if not isinstance(self.nbytes, int) or self.nbytes < 0:
            raise InvalidArgument(f"meta.nbytes must be a non-negative integer, got {self.nbytes!r}")
        if not isinstance(self.checksum, int) or not 0 <= self.checksum < 2**64:
            raise InvalidArgument("meta.checksum must be an unsigned 64-bit integer")
        if not self.codec or len(self.codec) > 32 or not self.codec.replace("-", "").replace("_", "").isalnum():
            raise InvalidArgument(f"meta.codec {self.codec!r} is invalid: 1-32 characters [A-Za-z0-9_-]")
        if not isinstance(self.codec_version, int) or not 0 <= self.codec_version < 2**16:
            raise InvalidArgument("meta.codec_version must be in [0, 65536)")
        if self.dtype not in DTYPE_SIZES:
            raise InvalidArgument(
                f"meta.dtype {self.dtype!r} is not supported; use one of {sorted(DTYPE_SIZES)}"
            )
        if len(self.shape) > MAX_DIMS or any(not isinstance(d, int) or d < 0 for d in self.shape):
            raise InvalidArgument(f"meta.shape {self.shape!r} is invalid: at most {MAX_DIMS} non-negative ints")
        if len(self.layout) > 16:
            raise InvalidArgument("meta.layout must be at most 16 characters")
        if self.codec == "raw" and self.shape:
            want = DTYPE_SIZES[self.dtype]
            for d in self.shape:
                want *= d
            if want != self.nbytes:
                raise InvalidArgument(
                    f"meta is inconsistent: raw payload of dtype {self.dtype} and shape "
                    f"{list(self.shape)} needs {want} bytes, nbytes says {self.nbytes}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "nbytes": self.nbytes,
            "checksum": self.checksum,
            "codec": self.codec,
            "codec_version": self.codec_version,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "layout": self.layout,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChunkMeta:
        try:
            return cls(
                nbytes=int(d["nbytes"]),
                checksum=int(d["checksum"]),
                codec=str(d.get("codec", "raw")),
                codec_version=int(d.get("codec_version", 1)),
                dtype=str(d.get("dtype", "uint8")),
                shape=tuple(int(x) for x in d.get("shape", ())),
                layout=str(d.get("layout", CANONICAL_LAYOUT)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"chunk metadata is malformed: {exc}") from exc

    def encode(self) -> bytes:
        """Versioned binary form: magic, length, JSON body, crc32."""
        body = json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True).encode()
        head = _META_HEAD.pack(_META_MAGIC, len(body)) + body
        return head + _META_TAIL.pack(zlib.crc32(head))

    @classmethod
    def decode(cls, data: bytes | memoryview) -> tuple[ChunkMeta, int]:
        """Parse :meth:`encode` output at the start of ``data``; returns (meta, bytes used)."""
        if len(data) < _META_HEAD.size + _META_TAIL.size:
            raise CorruptChunk("chunk metadata truncated")
        magic, length = _META_HEAD.unpack_from(data, 0)
        if magic != _META_MAGIC or length > 4096:
            raise CorruptChunk("chunk metadata has a bad magic or length")
        end = _META_HEAD.size + length
        if len(data) < end + _META_TAIL.size:
            raise CorruptChunk("chunk metadata truncated")
        (crc,) = _META_TAIL.unpack_from(data, end)
        if zlib.crc32(bytes(data[:end])) != crc:
            raise CorruptChunk("chunk metadata fails its crc32")
        try:
            d = json.loads(bytes(data[_META_HEAD.size : end]))
        except ValueError as exc:
            raise CorruptChunk(f"chunk metadata is not valid JSON: {exc}") from exc
        if not isinstance(d, dict):
            raise CorruptChunk("chunk metadata is not an object")
        try:
            return cls.from_dict(d), end + _META_TAIL.size
        except InvalidArgument as exc:
            raise CorruptChunk(str(exc)) from exc


@dataclass(slots=True, eq=False)
class Chunk:
    """Metadata plus payload.

    ``payload`` may be a view into a tier's memory: it stays valid until
    :meth:`release` (or the end of a ``with`` block).  Tiers that hand out
    copies pass no release callback.
    """

    meta: ChunkMeta
    payload: memoryview
    _release: Callable[[], None] | None = field(default=None, repr=False)

    @classmethod
    def from_bytes(
        cls,
        data: bytes | bytearray | memoryview,
        *,
        codec: str = "raw",
        dtype: str = "uint8",
        shape: tuple[int, ...] = (),
        layout: str = CANONICAL_LAYOUT,
        codec_version: int = 1,
    ) -> Chunk:
        view = memoryview(data).cast("B")
        meta = ChunkMeta(
            nbytes=view.nbytes,
            checksum=checksum(view),
            codec=codec,
            codec_version=codec_version,
            dtype=dtype,
            shape=shape,
            layout=layout,
        )
        return cls(meta, view)

    @property
    def nbytes(self) -> int:
        return self.meta.nbytes

    def verify(self) -> None:
        """Raise :class:`CorruptChunk` unless the payload matches its metadata."""
        if self.payload.nbytes != self.meta.nbytes:
            raise CorruptChunk(
                f"payload is {self.payload.nbytes} bytes, metadata says {self.meta.nbytes}"
            )
        if checksum(self.payload) != self.meta.checksum:
            raise CorruptChunk("payload fails its checksum")

    def release(self) -> None:
        cb, self._release = self._release, None
        if cb is not None:
            cb()

    def __enter__(self) -> Chunk:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        # A leaked view must not pin tier memory forever.
        if self._release is not None:
            self.release()
