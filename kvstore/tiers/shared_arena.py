"""A host-memory tier's arena shared read-only with clients on the daemon's host.

A shared-memory get through the daemon costs a request: 0.15-0.25 ms of
socket hops and Python on the 2-core benchmark VM, more than copying a 1 MiB
chunk (0.07-0.1 ms).  So a client on the daemon's host may instead read a
chunk straight from the CPU tier's memory: the tier's arena lives in a memfd,
and next to it the daemon keeps an *index* (a second memfd) of where each
chunk is.  Both are handed to a client over the shared-memory control channel
as read-only file descriptors (kvstore/server/shm_channel.py); the client
(:class:`~kvstore.tiers.arena_reader.ArenaReader`, kvstore/tiers/arena_reader.py)
looks a key up, copies the bytes out and checks that the entry did not change
meanwhile.  This module holds the format and the daemon's side.  Only the daemon writes, and only from its event loop's thread.

Index layout (little-endian): a 64-byte header, then ``buckets x WAYS`` slots
of :data:`SLOT_BYTES`::

    header: magic "KVSARN01" | u32 buckets | u32 ways | u32 slot bytes | u32 pad
            | u64 arena bytes | u64 state (1 open, 0 closed) | u64 reserved
    slot:   u64 seq | 16-byte key digest | u64 offset | u64 nbytes
            | u16 meta length | 6 pad | meta (see :func:`pack_meta`)

A key's slot is one of the ``WAYS`` slots of bucket ``digest mod buckets``
(digest: xxh3-128 of the key's text); a key that finds its bucket full is not
published and clients ask the daemon instead.  Each slot is a seqlock: the
daemon makes ``seq`` odd, rewrites the slot, makes it even again; it withdraws
a key (delete, eviction, replacement) *before* the tier may reuse the key's
bytes.  A reader reads ``seq``, the slot, copies the bytes, reads ``seq``
again: the copy is good only if ``seq`` was even and did not change.  This
relies on x86-64's store and load ordering (stores are seen in the order they
were made, loads are not reordered with loads), so sharing is offered only on
x86-64; elsewhere clients ask the daemon.

What the daemon does not see, it is told: a client sends the keys it read
(``T`` messages, no reply) so that the tier's eviction order and the read
metrics follow direct reads too, within a few milliseconds.

Security: the files are read-only for clients (re-opened ``O_RDONLY`` before
they are passed: a client cannot map them writable), but they hold every
tenant's chunks, so the daemon offers them only when it has no token file.
With direct writes (kvstore/server/direct_writes.py) the arena's descriptor
is re-opened ``O_RDWR`` instead, and the client writes chunks into blocks the
daemon reserved for it; the index stays read-only, written by the daemon alone.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import platform
import struct

import xxhash

from kvstore.chunk import ChunkMeta
from kvstore.errors import InvalidArgument

MAGIC = b"KVSARN01"
HEADER = struct.Struct("<8sIIIIQQQ")
HEADER_BYTES = 64
WAYS = 8
SLOT_BYTES = 256
SEQ = struct.Struct("<Q")
FIELDS = struct.Struct("<16sQQH6x")  # digest, offset, nbytes, meta length
FIELDS_AT = SEQ.size
META_AT = SEQ.size + FIELDS.size
META_MAX = SLOT_BYTES - META_AT
_EMPTY = bytes(16)
#: An attach reply's body: arena bytes, index bytes, flags.
DESCRIPTION = struct.Struct("<QQQ")
#: Flag: the arena's descriptor is writable (direct writes).
WRITABLE = 1
#: Flag: the daemon takes a direct write's checksums after its request
#: (``ArenaPutRequest.checksums_follow``, kvstore/server/shm_channel.py).
SUMS_FOLLOW = 2

STATE_OFFSET = 8 + 4 * 4 + 8  # the header's u64 state

#: Only here do plain loads and stores give the seqlock the ordering it needs.
SUPPORTED = platform.machine().lower() in ("x86_64", "amd64")


def key_digest(key_text: str) -> bytes:
    """The 16-byte digest a key is indexed under (never all zeros: that marks a free slot)."""
    d = xxhash.xxh3_128_digest(key_text.encode())
    return d if d != _EMPTY else b"\x01" + d[1:]


# -- metadata in a slot --------------------------------------------------------
_META_HEAD = struct.Struct("<QQHB")  # nbytes, checksum, codec version, number of dims


def pack_meta(meta: ChunkMeta) -> bytes | None:
    """``meta`` in at most :data:`META_MAX` bytes, or None if it does not fit."""
    parts = [_META_HEAD.pack(meta.nbytes, meta.checksum, meta.codec_version, len(meta.shape))]
    parts.append(struct.pack(f"<{len(meta.shape)}Q", *meta.shape))
    for text in (meta.codec, meta.dtype, meta.layout):
        raw = text.encode()
        if len(raw) > 255:
            return None
        parts.append(bytes([len(raw)]) + raw)
    out = b"".join(parts)
    return out if len(out) <= META_MAX else None


def unpack_meta(raw: bytes) -> ChunkMeta:
    """The inverse of :func:`pack_meta` (raises InvalidArgument or struct.error on garbage)."""
    nbytes, check, version, ndims = _META_HEAD.unpack_from(raw)
    at = _META_HEAD.size
    shape = struct.unpack_from(f"<{ndims}Q", raw, at)
    at += 8 * ndims
    texts = []
    for _ in range(3):
        n = raw[at]
        texts.append(raw[at + 1 : at + 1 + n].decode())
        at += 1 + n
    return ChunkMeta(nbytes, check, texts[0], version, texts[1], tuple(shape), texts[2])


def index_buckets(arena_bytes: int, *, bytes_per_key: int = 64 << 10) -> int:
    """Buckets for an arena: room for one key per ``bytes_per_key`` of arena
    (at half load), a power of two in [64, 2**17]."""
    want = max(64, 2 * arena_bytes // (bytes_per_key * WAYS))
    return min(1 << 17, 1 << (want - 1).bit_length())


class SharedArena:
    """The daemon's side: the arena memfd, and the index it writes."""

    def __init__(self, arena_bytes: int, *, name: str = "kvstore", buckets: int | None = None) -> None:
        if arena_bytes <= 0:
            raise InvalidArgument(f"arena size must be positive, got {arena_bytes}")
        self.arena_bytes = arena_bytes
        self.buckets = buckets or index_buckets(arena_bytes)
        self.index_bytes = HEADER_BYTES + self.buckets * WAYS * SLOT_BYTES
        self._arena_fd = os.memfd_create(f"{name}-arena", os.MFD_CLOEXEC)
        self._index_fd = os.memfd_create(f"{name}-index", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._arena_fd, arena_bytes)
            os.ftruncate(self._index_fd, self.index_bytes)
            self.arena = mmap.mmap(self._arena_fd, arena_bytes)
            self._index = mmap.mmap(self._index_fd, self.index_bytes)
        except BaseException:
            self._close_fds()
            raise
        HEADER.pack_into(self._index, 0, MAGIC, self.buckets, WAYS, SLOT_BYTES, 0, arena_bytes, 1, 0)
        #: digest -> slot number, of every published key (the daemon's own map of the index).
        self._slots: dict[bytes, int] = {}
        self._free = bytearray(b"\x01" * (self.buckets * WAYS))
        #: Keys not published: bucket full, or metadata too long (clients ask the daemon for those).
        self.overflows = 0

    def __len__(self) -> int:
        return len(self._slots)

    def publish(self, key_text: str, offset: int, meta: ChunkMeta) -> bool:
        """Make ``key_text`` readable at ``offset``; False (and any old entry
        withdrawn) if its bucket is full or its metadata too long."""
        digest = key_digest(key_text)
        packed = pack_meta(meta)
        if packed is None:
            self.withdraw(key_text)
            self.overflows += 1
            return False
        slot = self._slots.get(digest)
        if slot is None:
            slot = self._free_slot(digest)
            if slot is None:
                self.overflows += 1
                return False
            self._free[slot] = 0
            self._slots[digest] = slot
        self._write(slot, digest, offset, meta.nbytes, packed)
        return True

    def withdraw(self, key_text: str) -> None:
        """Unpublish ``key_text`` (no-op if it is not published); readers that
        started before see their copy fail its check."""
        slot = self._slots.pop(key_digest(key_text), None)
        if slot is not None:
            self._write(slot, _EMPTY, 0, 0, b"")
            self._free[slot] = 1

    def _free_slot(self, digest: bytes) -> int | None:
        first = (int.from_bytes(digest[:8], "little") % self.buckets) * WAYS
        for slot in range(first, first + WAYS):
            if self._free[slot]:
                return slot
        return None

    def _write(self, slot: int, digest: bytes, offset: int, nbytes: int, meta: bytes) -> None:
        at = HEADER_BYTES + slot * SLOT_BYTES
        (seq,) = SEQ.unpack_from(self._index, at)
        SEQ.pack_into(self._index, at, seq + 1)  # odd: being rewritten
        FIELDS.pack_into(self._index, at + FIELDS_AT, digest, offset, nbytes, len(meta))
        self._index[at + META_AT : at + META_AT + len(meta)] = meta
        SEQ.pack_into(self._index, at, seq + 2)

    def client_fds(self, *, writable: bool = False) -> tuple[int, int]:
        """Fresh descriptors of (arena, index), for passing to a client: read-only,
        but the arena's writable with ``writable`` (direct writes,
        kvstore/server/direct_writes.py); the caller closes them once sent."""
        arena = _reopen(self._arena_fd, os.O_RDWR if writable else os.O_RDONLY)
        return arena, _reopen(self._index_fd, os.O_RDONLY)

    def describe(self, *, writable: bool = False) -> bytes:
        """What a client needs besides the descriptors: the two sizes, and flags
        (:data:`WRITABLE`: the arena's descriptor is writable, with
        :data:`SUMS_FOLLOW`)."""
        return DESCRIPTION.pack(self.arena_bytes, self.index_bytes, WRITABLE | SUMS_FOLLOW if writable else 0)

    def close(self) -> None:
        """Mark the index closed (clients stop reading) and drop the daemon's mappings."""
        if self._index.closed:
            return
        SEQ.pack_into(self._index, STATE_OFFSET, 0)
        with contextlib.suppress(BufferError):  # views of the arena may live on until collected
            self.arena.close()
        self._index.close()
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._arena_fd, self._index_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _reopen(fd: int, mode: int) -> int:
    return os.open(f"/proc/self/fd/{fd}", mode | os.O_CLOEXEC)
