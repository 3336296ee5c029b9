"""How a chunk is laid out in Redis: key names and the manifest.

Keys
    With ``P`` the deployment's ``key_prefix`` and ``W`` the key's wire form
    (``tenant/model/fingerprint/digest``)::

        P m:{W}                 the manifest
        P p:W:<nonce>:<i>       part i of the write tagged <nonce> (spread)
        P p:{W}:<nonce>:<i>     the same, parts kept with their manifest

    Each write draws a fresh 8-byte nonce that names its parts, so a reader
    never mixes parts of two writes to the same key: it reads the manifest,
    then exactly the parts that manifest names.

Manifest (versioned binary, no pickle)::

    "KVRM" | u8 version | u8 flags | u16 0 | 8-byte nonce | u32 part count |
    u32 part size | ChunkMeta.encode() | u32 crc32 of all before | [inline payload]

    A chunk of at most ``inline_bytes`` rides inside its manifest (one key,
    one round trip each way).  Larger ones are split into parts of
    ``part_bytes``.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from kvstore.chunk import SUM_LEAF, ChunkMeta
from kvstore.errors import CorruptChunk
from kvstore.keys import ChunkKey

__all__ = ["DISCARD_LUA", "HEAD_SIZE", "Manifest", "manifest_key", "part_keys"]

_MAGIC = b"KVRM"
#: 2 since the leaf checksum (kvstore.chunk.checksum).  A manifest of version 1 is
#: read when its chunk is at most SUM_LEAF bytes, whose checksum is the same under both.
_VERSION = 2
_HEAD = struct.Struct("<4sBBH8sII")  # magic, version, flags, reserved, nonce, part count, part size
_CRC = struct.Struct("<I")
_INLINE = 0x01
_TOGETHER = 0x02
_MAX_PARTS = 1 << 20
HEAD_SIZE = _HEAD.size
# Deletes the manifest only if it still starts with the header that was read:
# a concurrent writer's newer manifest (new nonce) must survive a reader that
# found the older one incomplete.
DISCARD_LUA = (
    "if redis.call('GETRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1) == ARGV[1] "
    "then return redis.call('DEL', KEYS[1]) else return 0 end"
)


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a reader needs to find and check a chunk's parts."""

    meta: ChunkMeta
    nonce: bytes
    part_count: int
    part_bytes: int
    inline: bool
    together: bool
    #: Length of the encoded header (the inline payload follows it).
    header_len: int = 0

    def encode(self) -> bytes:
        flags = (_INLINE if self.inline else 0) | (_TOGETHER if self.together else 0)
        head = _HEAD.pack(_MAGIC, _VERSION, flags, 0, self.nonce, self.part_count, self.part_bytes) + self.meta.encode()
        return head + _CRC.pack(zlib.crc32(head))

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Manifest:
        """Parse a stored manifest (and check it); :class:`CorruptChunk` if malformed."""
        view = memoryview(data)
        if len(view) < _HEAD.size + _CRC.size:
            raise CorruptChunk("redis manifest truncated")
        magic, version, flags, _, nonce, count, part_bytes = _HEAD.unpack_from(view, 0)
        if magic != _MAGIC:
            raise CorruptChunk("redis manifest has a bad magic")
        if version not in (1, _VERSION):
            raise CorruptChunk(f"redis manifest version {version} is not supported (this build reads 1 and {_VERSION})")
        meta, used = ChunkMeta.decode(view[_HEAD.size :])
        if version == 1 and meta.nbytes > SUM_LEAF:
            raise CorruptChunk(
                f"redis manifest of version 1 for a chunk over {SUM_LEAF} bytes: its checksum predates the leaf checksum"
            )
        end = _HEAD.size + used
        if len(view) < end + _CRC.size:
            raise CorruptChunk("redis manifest truncated")
        (crc,) = _CRC.unpack_from(view, end)
        if zlib.crc32(view[:end]) != crc:
            raise CorruptChunk("redis manifest fails its crc32")
        inline = bool(flags & _INLINE)
        header_len = end + _CRC.size
        if inline:
            if count != 0 or len(view) - header_len != meta.nbytes:
                raise CorruptChunk("redis manifest: inline payload has the wrong size")
        elif part_bytes <= 0 or count != -(-meta.nbytes // part_bytes) or count > _MAX_PARTS:
            raise CorruptChunk("redis manifest: part count does not match the chunk size")
        return cls(meta, bytes(nonce), count, part_bytes, inline, bool(flags & _TOGETHER), header_len)


def manifest_key(prefix: str, key: ChunkKey) -> str:
    """The manifest's key: hash-tagged by the chunk key (parts may share its slot)."""
    return f"{prefix}m:{{{key}}}"


def part_keys(prefix: str, key: ChunkKey, manifest: Manifest) -> list[str]:
    """The keys of the parts ``manifest`` names, in payload order."""
    nonce = manifest.nonce.hex()
    base = f"{prefix}p:{{{key}}}:{nonce}:" if manifest.together else f"{prefix}p:{key}:{nonce}:"
    return [f"{base}{i}" for i in range(manifest.part_count)]
