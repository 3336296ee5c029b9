"""Memory tiers: chunks in one arena of host or device memory.

The arena is one tensor of ``capacity_bytes`` allocated when the tier opens
(and, for host memory, touched so that its pages are committed then rather
than faulted in during puts: copying into fresh pages runs at a third of the
speed of copying into mapped ones).  A :class:`FreeListAllocator` places
chunks in it, so puts never allocate and the tier cannot grow.

Reads hand out views into the arena.  A view stays valid until the reader
releases its :class:`Chunk`: a chunk deleted or evicted while readers hold it
leaves the index at once but its bytes are freed only when the last reader
releases it (those bytes still count as used, so the capacity holds).

A host tier made with ``shared=True`` keeps its arena in a memfd and
publishes where each chunk is in an index that clients on the same host read
(kvstore/tiers/shared_arena.py): every change to the tier's index is
published before the call returns, and a key is withdrawn before its bytes
may be reused.

Copies of host memory of 8 MiB and more are split over ``copy_threads``
threads (kvstore/tiers/copier.py; torch releases the GIL while copying), and
those over ``inline_copy_max`` run in the pool entirely, so a 32 MiB put does
not stall the event loop; a put cancelled mid-copy frees its block only after
the copy threads have finished with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from kvstore.chunk import Chunk, ChunkMeta
from kvstore.errors import CapacityError, Closed, InvalidArgument
from kvstore.keys import ChunkKey
from kvstore.tiers.allocator import FreeListAllocator
from kvstore.tiers.base import Tier
from kvstore.tiers.copier import Copier, finish, when_done
from kvstore.tiers.shared_arena import SUPPORTED as SHARING_SUPPORTED
from kvstore.tiers.shared_arena import SharedArena

T = TypeVar("T")

# torch.frombuffer warns once about read-only buffers; we only ever read them.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


@dataclass(slots=True)
class _Entry:
    offset: int
    meta: ChunkMeta
    readers: int = 0
    dead: bool = False  # removed from the index; free when readers reach 0


def as_uint8_tensor(data: memoryview | bytes | bytearray | torch.Tensor) -> torch.Tensor:
    """A flat uint8 tensor sharing memory with ``data`` (no copy)."""
    if isinstance(data, torch.Tensor):
        return data.reshape(-1).view(torch.uint8) if data.is_contiguous() else data.contiguous().reshape(-1).view(torch.uint8)
    view = memoryview(data).cast("B")
    if view.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(view, dtype=torch.uint8)


def tensor_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (no copy)."""
    flat = t.reshape(-1).view(torch.uint8)
    if flat.numel() == 0:
        return memoryview(bytearray(0))
    return memoryview(flat.numpy())  # type: ignore[arg-type]  # ndarray is a Buffer


class MemoryTier(Tier):
    """Chunks in an arena tensor on ``device``; see the module docstring."""

    kind = "memory"

    def __init__(
        self,
        name: str,
        capacity_bytes: int,
        *,
        device: str = "cpu",
        pin: bool = False,
        prefault: bool = True,
        copy_threads: int = 2,
        inline_copy_max: int = 8 << 20,
        align: int = 256,
        shared: bool = False,
    ) -> None:
        super().__init__(name)
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise InvalidArgument(f"{name}.capacity_bytes must be a positive integer, got {capacity_bytes!r}")
        if copy_threads < 1:
            raise InvalidArgument(f"{name}.copy_threads must be >= 1, got {copy_threads}")
        self._alloc = FreeListAllocator(capacity_bytes, align)
        #: Blocks reserved for local clients and not yet a chunk's: offset -> bytes.
        self._reserved: dict[int, int] = {}
        #: Their bytes together.
        self.reserved_bytes = 0
        self._device = torch.device(device)
        self._pin = pin
        self._prefault = prefault
        self._inline_max = inline_copy_max
        self._copy_threads = copy_threads
        self._arena: torch.Tensor | None = None
        self._index: dict[ChunkKey, _Entry] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._copy: Copier | None = None
        #: The arena as bytes, for host arenas: slicing it is cheaper than making a view per get.
        self._bytes: memoryview | None = None
        # Sharing needs a host arena we map ourselves (a pinned one comes from CUDA's allocator).
        self._share = shared and self._device.type == "cpu" and not pin and SHARING_SUPPORTED
        #: The arena and its published index, when shared with local clients.
        self.shared: SharedArena | None = None

    # -- lifecycle -------------------------------------------------------
    async def open(self) -> None:
        if self._arena is not None:
            return
        self._pool = ThreadPoolExecutor(self._copy_threads, thread_name_prefix=f"kvstore-{self.name}")
        self._copy = Copier(self._pool, self._copy_threads, inline_max=self._inline_max)
        loop = asyncio.get_running_loop()
        self._arena = await loop.run_in_executor(self._pool, self._make_arena)
        if self._arena.device.type == "cpu":
            self._bytes = tensor_view(self._arena)

    def _make_arena(self) -> torch.Tensor:
        n = self._alloc.capacity
        if self._share:
            self.shared = SharedArena(n, name=f"kvstore-{self.name}")
            arena = torch.frombuffer(self.shared.arena, dtype=torch.uint8)
            if self._prefault:
                arena.zero_()
        elif self._device.type == "cpu":
            arena = torch.empty(n, dtype=torch.uint8, pin_memory=self._pin)
            if self._prefault and not self._pin:  # pinned pages are already committed
                arena.zero_()
        else:
            arena = torch.empty(n, dtype=torch.uint8, device=self._device)
        return arena

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            self._copy = None
        self._index.clear()
        self._bytes = None
        self._arena = None
        if self.shared is not None:
            self.shared.close()
            self.shared = None

    def _copier(self) -> Copier:
        if self._copy is None:
            raise Closed(f"tier {self.name!r} is not open")
        return self._copy

    def _require_open(self) -> torch.Tensor:
        if self._arena is None:
            raise Closed(f"tier {self.name!r} is not open")
        return self._arena

    @property
    def serves_views(self) -> bool:
        return self._bytes is not None

    # -- size ------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self._alloc.capacity

    @property
    def used_bytes(self) -> int:
        return self._alloc.used

    def __len__(self) -> int:
        return len(self._index)

    def fits(self, nbytes: int) -> bool:
        return self._alloc.fits(nbytes)

    @property
    def fragmentation(self) -> float:
        """1 - largest free block / free bytes (0 = all free space contiguous)."""
        free = self._alloc.capacity - self._alloc.used
        return 0.0 if free == 0 else 1.0 - self._alloc.largest_free / free

    # -- data path -------------------------------------------------------
    async def put(self, key: ChunkKey, chunk: Chunk) -> None:
        off, dst = self._reserve(chunk)
        await self._copy_in(off, lambda: self._copier().start(dst, chunk.payload))
        self._publish(key, off, chunk.meta)

    async def put_summing(self, key: ChunkKey, chunk: Chunk) -> ChunkMeta:
        """The checksum of the copy in the arena, computed by the thread that
        copied it right after: the bytes it describes are the bytes stored."""
        if self._bytes is None:  # device memory
            return await super().put_summing(key, chunk)
        off, dst = self._reserve(chunk)
        assert isinstance(dst, memoryview)  # a host arena's block
        got = await self._copy_in(off, lambda: self._copier().start_summed(dst, chunk.payload))
        meta = dataclasses.replace(chunk.meta, checksum=got)
        self._publish(key, off, meta)
        return meta

    # -- blocks written by local clients (direct writes) ----------------------
    def reserve_block(self, nbytes: int) -> int:
        """A block of ``nbytes`` in the shared arena for a local client to write a
        chunk into (its offset); it counts as used until :meth:`adopt` makes it a
        chunk's or :meth:`release_block` gives it back.  CapacityError when no
        free block is large enough (the store evicts first)."""
        if self.shared is None:
            raise InvalidArgument(f"tier {self.name!r} does not share its arena")
        if nbytes <= 0:
            raise InvalidArgument(f"a reserved block must have at least one byte, got {nbytes}")
        off = self._alloc_block(nbytes)
        self._reserved[off] = nbytes
        self.reserved_bytes += nbytes
        return off

    def release_block(self, offset: int) -> None:
        """Give back a block from :meth:`reserve_block` that holds no chunk."""
        self._unreserve(offset)
        self._alloc.free(offset)

    def adopt(self, key: ChunkKey, offset: int, meta: ChunkMeta) -> None:
        """Make the reserved block at ``offset``, written by a client, ``key``'s
        chunk (replacing any older value), as a put would."""
        self._require_open()
        self._publish(key, offset, meta)
        self._unreserve(offset)

    def _unreserve(self, offset: int) -> None:
        self.reserved_bytes -= self._reserved.pop(offset, 0)

    def _reserve(self, chunk: Chunk) -> tuple[int, torch.Tensor | memoryview]:
        """A block for ``chunk``'s payload: its offset and where to copy it."""
        arena = self._require_open()
        n = chunk.meta.nbytes
        if chunk.payload.nbytes != n:
            raise InvalidArgument(f"payload is {chunk.payload.nbytes} bytes, metadata says {n}")
        off = self._alloc_block(n)
        return off, arena[off : off + n] if self._bytes is None else self._bytes[off : off + n]

    def _alloc_block(self, n: int) -> int:
        off = self._alloc.alloc(n)
        if off is None:
            raise CapacityError(
                f"tier {self.name!r} has no free block of {n} bytes "
                f"(used {self._alloc.used} of {self._alloc.capacity})"
            )
        return off

    async def _copy_in(self, off: int, start: Callable[[], asyncio.Future[T]]) -> T:
        """Run the copy ``start()`` begins into the block at ``off``; on failure or
        cancellation free the block, once no copy thread writes into it any more."""
        try:
            copying = start()
        except BaseException:
            self._alloc.free(off)
            raise
        try:
            return await finish(copying)
        except BaseException:
            when_done(copying, lambda: self._alloc.free(off))
            raise

    def _publish(self, key: ChunkKey, off: int, meta: ChunkMeta) -> None:
        old = self._index.get(key)
        self._index[key] = _Entry(off, meta)
        if self.shared is not None:  # replaces the old entry there before its block is retired
            self.shared.publish(str(key), off, meta)
        if old is not None:
            self._retire(old)
        self.counters.puts += 1
        self.counters.bytes_written += meta.nbytes

    async def get(self, key: ChunkKey) -> Chunk | None:
        arena = self._require_open()
        entry = self._index.get(key)
        if entry is None:
            self.counters.misses += 1
            return None
        self.counters.hits += 1
        self.counters.bytes_read += entry.meta.nbytes
        entry.readers += 1
        end = entry.offset + entry.meta.nbytes
        if self._bytes is not None:
            payload = self._bytes[entry.offset : end]
        else:  # device memory: a host copy
            host = torch.empty(entry.meta.nbytes, dtype=torch.uint8, pin_memory=True)
            host.copy_(arena[entry.offset : end])
            payload = tensor_view(host)
        return Chunk(entry.meta, payload, lambda: self._release(entry))

    def get_view(self, key: ChunkKey) -> Chunk | None:
        """The chunk as a view of the tier's host memory, at once (what :meth:`get`
        returns for a host tier); None when absent or the tier is in device memory."""
        if self._bytes is None or self._arena is None:
            return None
        entry = self._index.get(key)
        if entry is None:
            return None
        self.counters.hits += 1
        self.counters.bytes_read += entry.meta.nbytes
        entry.readers += 1
        payload = self._bytes[entry.offset : entry.offset + entry.meta.nbytes]
        return Chunk(entry.meta, payload, lambda: self._release(entry))

    def get_tensor(self, key: ChunkKey) -> tuple[ChunkMeta, torch.Tensor] | None:
        """Zero-copy access for in-process users: the arena slice (on the tier's
        device) and its metadata.  Valid until the key is deleted or replaced."""
        arena = self._require_open()
        entry = self._index.get(key)
        if entry is None:
            return None
        return entry.meta, arena[entry.offset : entry.offset + entry.meta.nbytes]

    def _release(self, entry: _Entry) -> None:
        entry.readers -= 1
        if entry.dead and entry.readers == 0:
            self._alloc.free(entry.offset)

    def _retire(self, entry: _Entry) -> None:
        entry.dead = True
        if entry.readers == 0:
            self._alloc.free(entry.offset)

    def note_shared_read(self, key: ChunkKey) -> int | None:
        """Count a read a client made from the shared arena; the chunk's size,
        or None if the key is no longer here."""
        entry = self._index.get(key)
        if entry is None:
            return None
        self.counters.hits += 1
        self.counters.bytes_read += entry.meta.nbytes
        return entry.meta.nbytes

    def contains(self, key: ChunkKey) -> bool:
        return key in self._index

    def meta(self, key: ChunkKey) -> ChunkMeta | None:
        entry = self._index.get(key)
        return None if entry is None else entry.meta

    async def delete(self, key: ChunkKey) -> int:
        entry = self._index.pop(key, None)
        if entry is None:
            return 0
        if self.shared is not None:
            self.shared.withdraw(str(key))
        self._retire(entry)
        self.counters.deletes += 1
        return entry.meta.nbytes

    def entries(self) -> Iterable[tuple[ChunkKey, int]]:
        return [(k, e.meta.nbytes) for k, e in self._index.items()]
