"""The disk tier's file format and its low-level I/O helpers.

Each chunk file is a small header, then the payload::

    "KVD1" | u16 version | u16 key length | u32 meta length |
    key (utf-8 wire form) | ChunkMeta.encode() | u32 crc32 of all before

File names are the blake3 of the key's wire form (:func:`key_hash`), so no
key can name a path outside the tier's root.  Reads use buffers aligned for
``O_DIRECT`` (:func:`aligned_view`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import zlib

import blake3

from kvstore.chunk import SUM_LEAF, ChunkMeta
from kvstore.errors import CorruptChunk, InvalidArgument
from kvstore.keys import ChunkKey

__all__ = ["ALIGN", "FIRST_READ", "HEADER_BOUND", "aligned_view", "decode_header", "encode_header", "key_hash",
           "read_whole", "write_all"]

_MAGIC = b"KVD1"
#: 2 since the leaf checksum (kvstore.chunk.checksum).  A file of version 1 is read
#: when its chunk is at most SUM_LEAF bytes, whose checksum is the same under both.
_VERSION = 2
_FIXED = struct.Struct("<4sHHI")  # magic, version, key length, meta length
_CRC = struct.Struct("<I")
_MAX_KEY = 1024
_MAX_META = 4096 + 12  # ChunkMeta.decode accepts a 4096-byte body plus its framing
#: What fits() adds to a payload for its header before the exact header is
#: known: 16 bytes of framing, a key of at most 512 characters (ChunkKey.parse's
#: limit) and a meta of a few hundred bytes.
HEADER_BOUND = 1536
FIRST_READ = 4096  # one page: holds any real header
ALIGN = 4096  # O_DIRECT buffer, offset and length alignment (any block size up to a page)


def key_hash(key: ChunkKey) -> str:
    """blake3 hex digest of the key's wire form: the only source of file names."""
    return blake3.blake3(str(key).encode()).hexdigest()


def encode_header(key: ChunkKey, meta: ChunkMeta) -> bytes:
    """The header written before a chunk's payload (see the module docstring)."""
    k = str(key).encode()
    m = meta.encode()
    if len(k) > _MAX_KEY:
        raise InvalidArgument(f"key is {len(k)} bytes long; the disk tier stores keys of at most {_MAX_KEY}")
    body = _FIXED.pack(_MAGIC, _VERSION, len(k), len(m)) + k + m
    return body + _CRC.pack(zlib.crc32(body))


def decode_header(data: bytes | memoryview) -> tuple[str, ChunkMeta, int]:
    """Parse a header at the start of ``data``: (key wire form, meta, header length).

    Raises :class:`CorruptChunk` when the bytes are not a whole, intact header.
    """
    if len(data) < _FIXED.size:
        raise CorruptChunk("disk header truncated")
    magic, version, klen, mlen = _FIXED.unpack_from(data, 0)
    if magic != _MAGIC or version not in (1, _VERSION):
        raise CorruptChunk("disk header has a bad magic or version")
    if klen > _MAX_KEY or mlen > _MAX_META:
        raise CorruptChunk("disk header has impossible lengths")
    end = _FIXED.size + klen + mlen
    if len(data) < end + _CRC.size:
        raise CorruptChunk("disk header truncated")
    (crc,) = _CRC.unpack_from(data, end)
    if zlib.crc32(data[:end]) != crc:
        raise CorruptChunk("disk header fails its crc32")
    try:
        key = bytes(data[_FIXED.size : _FIXED.size + klen]).decode()
    except UnicodeDecodeError as exc:
        raise CorruptChunk("disk header key is not utf-8") from exc
    meta, used = ChunkMeta.decode(data[_FIXED.size + klen : end])
    if used != mlen:
        raise CorruptChunk("disk header meta length disagrees with its content")
    if version == 1 and meta.nbytes > SUM_LEAF:
        raise CorruptChunk(f"disk file of version 1 with a chunk over {SUM_LEAF} bytes: its checksum predates the leaf checksum")
    return key, meta, end + _CRC.size


def write_all(fd: int, parts: list[memoryview]) -> None:
    # writev may write less than asked (signals, the 2 GiB per-call cap).
    while parts:
        n = os.writev(fd, parts)
        if n == 0:
            raise OSError(errno.EIO, "write made no progress")
        while parts and n >= parts[0].nbytes:
            n -= parts[0].nbytes
            parts.pop(0)
        if n:
            parts[0] = parts[0][n:]


def aligned_view(size: int) -> memoryview:
    """A fresh buffer for a whole file, as O_DIRECT wants it.

    The view starts on a 4 KiB boundary and is a multiple of 4 KiB long (at
    least ``size``); it is a slice of one bytearray, so views of it keep the
    memory alive without a release callback.
    """
    length = -(-size // ALIGN) * ALIGN
    buf = bytearray(length + ALIGN)
    probe = ctypes.c_char.from_buffer(buf)
    start = -ctypes.addressof(probe) % ALIGN
    del probe  # drop the buffer export at once
    return memoryview(buf)[start : start + length]


def read_whole(fd: int, view: memoryview, size: int, direct: bool) -> int:
    """Read the first ``size`` bytes of the file into ``view``; returns bytes read."""
    got = 0
    while got < size:
        n = os.preadv(fd, [view[got:]], got)
        if n == 0:
            break
        got += n
        if direct and got % ALIGN:
            break  # O_DIRECT stops short of a block boundary only at end of file
    return got
