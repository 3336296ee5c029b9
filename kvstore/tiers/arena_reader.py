"""The client's side of a daemon's shared arena (kvstore/tiers/shared_arena.py):
finds a key in the index the daemon writes, copies its bytes out of the arena
and checks, by the slot's seqlock, that the entry held still meanwhile.  The
arena is mapped writable when the daemon offers direct writes
(kvstore/client/arena_writes.py writes into it)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from kvstore.chunk import ChunkMeta
from kvstore.errors import InvalidArgument
from kvstore.tiers.copier import Copier
from kvstore.tiers.shared_arena import (
    DESCRIPTION,
    FIELDS,
    FIELDS_AT,
    HEADER,
    HEADER_BYTES,
    MAGIC,
    META_AT,
    META_MAX,
    SEQ,
    SLOT_BYTES,
    STATE_OFFSET,
    SUMS_FOLLOW,
    WAYS,
    WRITABLE,
    key_digest,
    unpack_meta,
)

# A client's view of the arena is read-only; torch warns once about such buffers.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

#: Reads this large are copied by two threads (kvstore/tiers/copier.py).
SPLIT_MIN = 8 << 20
_MADV_POPULATE_READ = 22  # linux/mman.h, Linux 5.14
_SLOT_CACHE = 1 << 16


def _madvise(addr: int, length: int, advice: int) -> int:
    """madvise(2) through ctypes, which lets go of the GIL meanwhile (mmap.madvise does not)."""
    fn = _libc().madvise
    return int(fn(ctypes.c_void_p(addr), ctypes.c_size_t(length), ctypes.c_int(advice)))


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


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
        return not self._index.closed and SEQ.unpack_from(self._index, STATE_OFFSET)[0] == 1

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
                if isinstance(exc, InvalidArgument) and SEQ.unpack_from(self._index, at)[0] == seq:
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
                (seq,) = SEQ.unpack_from(index, at)
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
        _digest, offset, nbytes, meta_len = FIELDS.unpack_from(self._index, at + FIELDS_AT)
        meta_raw = self._index[at + META_AT : at + META_AT + min(meta_len, META_MAX)]
        if SEQ.unpack_from(self._index, at)[0] != seq or offset + nbytes > self.arena_bytes:
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
        if SEQ.unpack_from(self._index, at)[0] != seq:
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
