"""A host-memory tier's arena shared read-only with clients on the daemon's host.

A shared-memory get through the daemon costs a request: 0.15-0.25 ms of
socket hops and Python on the 2-core benchmark VM, more than copying a 1 MiB
chunk (0.07-0.1 ms).  So a client on the daemon's host may instead read a
chunk straight from the CPU tier's memory: the tier's arena lives in a memfd,
and next to it the daemon keeps an *index* (a second memfd) of where each
chunk is.  Both are handed to a client over the shared-memory control channel
as read-only file descriptors (kvstore/server/shm_channel.py); the client
looks a key up, copies the bytes out and checks that the entry did not change
meanwhile.  Only the daemon writes, and only from its event loop's thread.

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
import ctypes
import functools
import mmap
import os
import platform
import struct
import warnings

from concurrent.futures import ThreadPoolExecutor

import torch
import xxhash

from kvstore.chunk import ChunkMeta
from kvstore.errors import InvalidArgument
from kvstore.tiers.copier import Copier

# A client's view of the arena is read-only; torch warns once about such buffers.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

MAGIC = b"KVSARN01"
HEADER = struct.Struct("<8sIIIIQQQ")
HEADER_BYTES = 64
WAYS = 8
SLOT_BYTES = 256
_SEQ = struct.Struct("<Q")
_FIELDS = struct.Struct("<16sQQH6x")  # digest, offset, nbytes, meta length
_FIELDS_AT = _SEQ.size
META_AT = _SEQ.size + _FIELDS.size
META_MAX = SLOT_BYTES - META_AT
_EMPTY = bytes(16)
#: Reads this large are copied by two threads (kvstore/tiers/copier.py).
SPLIT_MIN = 8 << 20
_MADV_POPULATE_READ = 22  # linux/mman.h, Linux 5.14
_SLOT_CACHE = 1 << 16
#: An attach reply's body: arena bytes, index bytes, flags.
DESCRIPTION = struct.Struct("<QQQ")
#: Flag: the arena's descriptor is writable (direct writes).
WRITABLE = 1
#: Flag: the daemon takes a direct write's checksums after its request
#: (``ArenaPutRequest.checksums_follow``, kvstore/server/shm_channel.py).
SUMS_FOLLOW = 2


def _madvise(addr: int, length: int, advice: int) -> int:
    """madvise(2) through ctypes, which lets go of the GIL meanwhile (mmap.madvise does not)."""
    fn = _libc().madvise
    return int(fn(ctypes.c_void_p(addr), ctypes.c_size_t(length), ctypes.c_int(advice)))


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
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
        (seq,) = _SEQ.unpack_from(self._index, at)
        _SEQ.pack_into(self._index, at, seq + 1)  # odd: being rewritten
        _FIELDS.pack_into(self._index, at + _FIELDS_AT, digest, offset, nbytes, len(meta))
        self._index[at + META_AT : at + META_AT + len(meta)] = meta
        _SEQ.pack_into(self._index, at, seq + 2)

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
        _SEQ.pack_into(self._index, STATE_OFFSET, 0)
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


class ArenaReader:
    """The client's side: reads chunks from a daemon's shared arena.

    ``read`` returns None when the key is not published (ask the daemon: it
    may hold the key elsewhere, or not at all) and raises nothing for a torn
    read: it retries a few times, then says None.
    """

    def __init__(self, arena_fd: int, index_fd: int, description: bytes) -> None:
        if len(description) != DESCRIPTION.size:
            raise InvalidArgument(f"shared arena description is {len(description)} bytes, expected {DESCRIPTION.size}")
        arena_bytes, index_bytes, flags = DESCRIPTION.unpack(description)
        #: Whether this client may write chunks into the arena (direct writes).
        self.writable = bool(flags & WRITABLE)
        #: Whether a direct write may send its checksums after its request (:data:`SUMS_FOLLOW`).
        self.sums_follow = self.writable and bool(flags & SUMS_FOLLOW)
        for fd, n, what in ((arena_fd, arena_bytes, "arena"), (index_fd, index_bytes, "index")):
            if os.fstat(fd).st_size != n:
                raise InvalidArgument(f"shared {what} is {os.fstat(fd).st_size} bytes, the daemon said {n}")
        self._index = mmap.mmap(index_fd, index_bytes, prot=mmap.PROT_READ)
        magic, buckets, ways, slot_bytes, _, arena_n, _state, _gen = HEADER.unpack_from(self._index, 0)
        if magic != MAGIC or ways != WAYS or slot_bytes != SLOT_BYTES or arena_n != arena_bytes:
            self._index.close()
            raise InvalidArgument("shared arena index has an unknown format")
        if index_bytes != HEADER_BYTES + buckets * WAYS * SLOT_BYTES:
            self._index.close()
            raise InvalidArgument("shared arena index size does not match its bucket count")
        self._buckets = buckets
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
        self._arena_map = mmap.mmap(arena_fd, arena_bytes, prot=prot)
        self.arena = torch.frombuffer(self._arena_map, dtype=torch.uint8)
        #: The arena's bytes, and the address of the first: what direct writes
        #: copy into without a torch call per put.
        self.view = memoryview(self._arena_map)
        self.base = self.arena.data_ptr()
        self.arena_bytes = arena_bytes
        self.reads = 0
        self.torn = 0
        # Copies of SPLIT_MIN bytes and more are split with one helper thread, as the daemon's are.
        self._pool: ThreadPoolExecutor | None = None
        self._copier: Copier | None = None
        self._closed = False
        #: Slot offset -> (seq, (offset, nbytes, meta)) as last decoded: a slot whose seq is
        #: unchanged is unchanged, so a key read again is not decoded again.
        self._slots: dict[int, tuple[int, tuple[int, int, ChunkMeta]]] = {}
        self._populated = False

    def populate(self) -> None:
        """Map every page of the arena in this process, now (on the calling thread,
        without the GIL: 0.15-0.25 s per 4 GiB here).

        The first read of a page through this mapping takes a page fault: 100 us
        per MiB here, more than the copy (70-90 us per MiB), and the daemon
        reuses freed blocks anywhere in the arena, so a new client keeps meeting
        pages it never read.  This pays for all of them at once, and costs the
        page tables (2 MiB per GiB) a client builds anyway as it reads.  Not done
        unasked: a thread doing it in the background held up engines' first
        requests (it competes for the cores, and for the GIL between calls).
        """
        if self._populated:
            return
        if _madvise(self.arena.data_ptr(), self.arena_bytes, _MADV_POPULATE_READ) != 0:  # before Linux 5.14
            self.arena[:: mmap.PAGESIZE].max()
        self._populated = True

    @property
    def open(self) -> bool:
        """False once closed here, or once the daemon closed its tier."""
        return not self._index.closed and _SEQ.unpack_from(self._index, STATE_OFFSET)[0] == 1

    def read(self, key_text: str, out: torch.Tensor | None) -> tuple[ChunkMeta, torch.Tensor] | None:
        """Copy ``key_text``'s bytes into ``out`` (a contiguous CPU tensor with
        room; None: a new uint8 tensor); its metadata and the flat uint8 tensor
        written.  None when it is not published here or kept changing.  Raises
        InvalidArgument if ``out`` has too little room."""
        digest = key_digest(key_text)
        first = HEADER_BYTES + (int.from_bytes(digest[:8], "little") % self._buckets) * WAYS * SLOT_BYTES
        try:
            return self._read(first, digest, out)
        except (ValueError, RuntimeError):  # closed meanwhile (a closed map, a pool shut down)
            if self.open:
                raise
            return None

    def _read(self, first: int, digest: bytes, out: torch.Tensor | None) -> tuple[ChunkMeta, torch.Tensor] | None:
        for _attempt in range(3):
            if not self.open:
                return None
            found = self._find(first, digest)
            if found is None:
                return None
            at, seq = found
            try:
                got = self._copy(at, seq, out)
            except (struct.error, UnicodeDecodeError, IndexError, InvalidArgument) as exc:
                if isinstance(exc, InvalidArgument) and _SEQ.unpack_from(self._index, at)[0] == seq:
                    raise  # the slot held still: the error is the caller's (too little room)
                got = None
            if got is not None:
                self.reads += 1
                return got
            self.torn += 1
        return None

    def _find(self, first: int, digest: bytes) -> tuple[int, int] | None:
        """(slot offset, its even seq) of ``digest``'s slot, or None."""
        index = self._index
        for at in range(first, first + WAYS * SLOT_BYTES, SLOT_BYTES):
            if index[at + 8 : at + 24] == digest:
                (seq,) = _SEQ.unpack_from(index, at)
                if seq & 1:
                    continue  # being rewritten: treat as absent this time round
                if index[at + 8 : at + 24] == digest:
                    return at, seq
        return None

    def _slot(self, at: int, seq: int) -> tuple[int, int, ChunkMeta] | None:
        """(offset, nbytes, meta) of the slot at ``at`` as of ``seq``; None if it
        changed while being read.  Decoded once per version of the slot."""
        known = self._slots.get(at)
        if known is not None and known[0] == seq:
            return known[1]
        _digest, offset, nbytes, meta_len = _FIELDS.unpack_from(self._index, at + _FIELDS_AT)
        meta_raw = self._index[at + META_AT : at + META_AT + min(meta_len, META_MAX)]
        if _SEQ.unpack_from(self._index, at)[0] != seq or offset + nbytes > self.arena_bytes:
            return None
        meta = unpack_meta(meta_raw)
        if meta.nbytes != nbytes:
            return None
        if len(self._slots) >= _SLOT_CACHE:
            self._slots.clear()
        self._slots[at] = (seq, (offset, nbytes, meta))
        return offset, nbytes, meta

    def _copy(self, at: int, seq: int, out: torch.Tensor | None) -> tuple[ChunkMeta, torch.Tensor] | None:
        slot = self._slot(at, seq)
        if slot is None:
            return None
        offset, nbytes, meta = slot
        if out is None:
            # A bytearray, not torch.empty: glibc hands its memory back for reuse, while fresh
            # torch allocations of a few MiB often came as new pages (a fault each) in engines
            # (vLLM loads of 6 MiB chunks: 9 ms a chunk against 4).  A normal tensor even for a
            # caller in inference mode.
            with torch.inference_mode(False):
                buf = bytearray(nbytes)
                dst = torch.frombuffer(buf, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        else:
            dst = out.reshape(-1).view(torch.uint8)
            if dst.numel() < nbytes:
                raise InvalidArgument(f"output has room for {dst.numel()} bytes, the chunk has {nbytes}")
            dst = dst[:nbytes]
        # An inference tensor may be written only in inference mode, which the helper thread is not in.
        if nbytes >= SPLIT_MIN and not dst.is_inference():
            self._split_copier().copy_now(dst, self.arena[offset : offset + nbytes])
        elif nbytes:
            dst.copy_(self.arena[offset : offset + nbytes])
        if _SEQ.unpack_from(self._index, at)[0] != seq:
            return None
        return meta, dst

    def helper(self) -> ThreadPoolExecutor:
        """The one helper thread this client's large copies from and into the arena
        are split with (reads here, direct writes in kvstore/client/arena_writes.py)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvstore-arena-copy")
        return self._pool

    def _split_copier(self) -> Copier:
        if self._copier is None:
            self._copier = Copier(self.helper(), 2, split_min=SPLIT_MIN)
        return self._copier

    def close(self) -> None:
        """Stop reading; the mappings go when the last tensor read from them does."""
        self._closed = True
        with contextlib.suppress(BufferError):
            self._index.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

