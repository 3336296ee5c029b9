"""Local-disk tier: one file per chunk in a directory on local SSD.

Layout
    ``<root>/<h[:2]>/<h[2:]>.kvc`` with ``h = blake3(str(key)).hexdigest()``.
    File names come only from a hash, so no key (whatever its tenant or model
    says) can name a path outside ``root``.  ``<root>/.lock`` is held with
    ``flock`` while a tier has the directory open.

File format
    A small header, then the payload::

        "KVD1" | u16 version | u16 key length | u32 meta length |
        key (utf-8 wire form) | ChunkMeta.encode() | u32 crc32 of all before

    Version 2 since the leaf checksum (:func:`kvstore.chunk.checksum`); a file
    of version 1 is read when its chunk is at most ``SUM_LEAF`` bytes (the
    checksum is the same), and dropped at open above.

    :meth:`DiskTier.open` rebuilds the index from headers alone (one 4 KiB
    read per file, payloads are never read); a file whose size is not
    header + ``meta.nbytes`` is truncated, and is dropped and counted.

Crash safety
    A put writes a hidden temp file next to the final name, fsyncs it, renames
    it over the final name and fsyncs the directory before it returns.  Readers
    open by name, and a rename swaps the inode atomically, so they see the old
    file or the new one, whole.  A kill at any point leaves at worst a temp
    file, which the next :meth:`~DiskTier.open` removes.

Reads
    A get opens the file (``O_DIRECT`` where allowed), reads it whole with one
    ``preadv`` into one fresh, aligned bytearray, checks the header, the size
    and the checksum of the payload, and returns a view of that buffer: no copy
    after the kernel's.  Anything that fails a check is deleted and counted.

Threads
    Every blocking call runs in the tier's own thread pool.  The index is a
    dict touched by those threads and by the event loop: mutations hold
    ``_lock``; changes that pair a file operation with an index change
    (rename + install, unlink + forget) also hold the key's *stripe* lock, so
    the index always describes the file that is on disk under that name.

The parts of the tier, one module each:

* :mod:`kvstore.tiers.disk_config`: :class:`DiskTierConfig`;
* :mod:`kvstore.tiers.disk_format`: the file format and low-level I/O helpers;
* :mod:`kvstore.tiers.disk_files`: the files and their index, every blocking
  operation (run in the tier's threads), and the recovery scan at open;
* this module: the tier (lifecycle, sizes, put, get, delete, cancellation).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from kvstore.chunk import Chunk
from kvstore.errors import CapacityError, Closed, InvalidArgument, KVStoreError
from kvstore.keys import ChunkKey
from kvstore.tiers.disk_config import DiskTierConfig
from kvstore.tiers.disk_files import DiskFiles, PutJob, io_error
from kvstore.tiers.disk_format import HEADER_BOUND, decode_header, encode_header, key_hash

__all__ = ["HEADER_BOUND", "DiskTier", "decode_header", "encode_header", "key_hash"]


def _consume(fut: asyncio.Future[None]) -> None:
    # The put's caller is gone (cancelled); mark the outcome as seen so that
    # asyncio does not log "exception was never retrieved" for it.
    if not fut.cancelled():
        fut.exception()


class DiskTier(DiskFiles):
    """Chunks as files on local disk; survives restarts and ``kill -9``.

    Use ``async with DiskTier(name, config) as tier`` or call :meth:`open`
    and :meth:`close`.  :meth:`entries` and :meth:`delete` report payload
    bytes (``meta.nbytes``), like the other tiers and what the store tracks;
    :attr:`used_bytes` and ``capacity_bytes`` count on-disk bytes (header +
    payload).
    """

    kind: ClassVar[str] = "disk"

    def __init__(self, name: str, config: DiskTierConfig) -> None:
        super().__init__(name, config)
        self._pool: ThreadPoolExecutor | None = None
        self._lock_fd: int | None = None
        self._closed = False

    # -- lifecycle ----------------------------------------------------------

    async def open(self) -> None:
        """Lock the directory, remove leftover temp files and rebuild the index from headers."""
        if self._pool is not None or self._closed:
            raise Closed(f"disk tier {self.name!r} can be opened only once")
        pool = self._pool = ThreadPoolExecutor(
            self.config.io_threads, thread_name_prefix=f"kvstore-disk-{self.name}"
        )
        loop = asyncio.get_running_loop()
        try:
            self._lock_fd = await loop.run_in_executor(pool, self._prepare_root)
            scans = await asyncio.gather(
                *(loop.run_in_executor(pool, self._scan_dir, f"{i:02x}") for i in range(256))
            )
        except OSError as exc:
            await self.close()
            raise io_error(self.name, f"open of {self._root}", exc) from exc
        except BaseException:
            await self.close()
            raise
        for found, corrupt in scans:
            for key, entry in found:
                self._index[key] = entry
                self._used += entry.disk_bytes
            self._count_corrupt(corrupt)

    async def close(self) -> None:
        """Wait for operations in flight, stop the threads and unlock the directory."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            # shutdown(wait=True) blocks, so it waits in a helper thread.
            await asyncio.to_thread(pool.shutdown, True)
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    async def __aenter__(self) -> DiskTier:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- sizes and index ----------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self.config.capacity_bytes

    @property
    def used_bytes(self) -> int:
        """On-disk bytes of the chunks held (puts in flight not included)."""
        return self._used

    def __len__(self) -> int:
        return len(self._index)

    def fits(self, nbytes: int) -> bool:
        """Whether a put of an ``nbytes`` payload fits now, counting puts in flight.

        The header is not known yet, so :data:`HEADER_BOUND` stands for it.
        """
        with self._lock:
            return self._used + self._reserved + nbytes + HEADER_BOUND <= self.config.capacity_bytes

    def contains(self, key: ChunkKey) -> bool:
        return key in self._index

    def entries(self) -> Iterable[tuple[ChunkKey, int]]:
        """A snapshot of (key, payload bytes) of every chunk held."""
        with self._lock:
            return [(k, e.nbytes) for k, e in self._index.items()]

    def path_for(self, key: ChunkKey) -> Path:
        """The file that holds (or would hold) ``key``: always under the root."""
        return Path(self._final(key_hash(key)))

    # -- operations ---------------------------------------------------------

    async def put(self, key: ChunkKey, chunk: Chunk) -> None:
        """Store ``chunk`` durably under ``key``, replacing any previous value.

        Raises :class:`CapacityError` when it does not fit (or the disk is
        full), :class:`KVStoreError` on other I/O errors; a failed or
        cancelled put leaves neither the value nor a temp file behind.
        """
        pool = self._require_open()
        payload = chunk.payload
        if not payload.c_contiguous:
            raise InvalidArgument("chunk payload must be a contiguous buffer")
        payload = payload.cast("B") if payload.format != "B" or payload.ndim != 1 else payload
        if payload.nbytes != chunk.meta.nbytes:
            raise InvalidArgument(
                f"chunk payload is {payload.nbytes} bytes but its metadata says {chunk.meta.nbytes}"
            )
        job = PutJob(key, key_hash(key), encode_header(key, chunk.meta), payload, next(self._gens))
        with self._lock:
            if self._used + self._reserved + job.size > self.config.capacity_bytes:
                raise CapacityError(
                    f"disk tier {self.name!r}: a put of {job.size} bytes does not fit "
                    f"(used {self._used}, in flight {self._reserved}, "
                    f"capacity {self.config.capacity_bytes})"
                )
            self._reserved += job.size
        try:
            done = asyncio.wrap_future(pool.submit(self._put_sync, job))
        except RuntimeError as exc:  # the pool was shut down by a concurrent close()
            self._release(job.size)
            raise Closed(f"disk tier {self.name!r} is closed") from exc
        try:
            # Shielded: the worker must decide the outcome itself, not be
            # abandoned half-way by a cancelled future.
            await asyncio.shield(done)
        except asyncio.CancelledError:
            done.add_done_callback(_consume)
            self._cancel_put(job)
            raise
        except KVStoreError:
            self.counters.errors += 1
            raise
        self.counters.puts += 1
        self.counters.bytes_written += payload.nbytes

    async def get(self, key: ChunkKey) -> Chunk | None:
        """The chunk (a private copy, checksum verified) or ``None``.

        A corrupt or truncated file is deleted, counted in ``corrupt`` and
        reported as a miss.
        """
        pool = self._require_open()
        if key not in self._index:
            self.counters.misses += 1
            return None
        try:
            found = await asyncio.wrap_future(pool.submit(self._get_sync, key, key_hash(key)))
        except KVStoreError:
            self.counters.errors += 1
            raise
        if found is None:
            self.counters.misses += 1
            return None
        meta, payload = found
        self.counters.hits += 1
        self.counters.bytes_read += payload.nbytes
        return Chunk(meta, payload)

    async def delete(self, key: ChunkKey) -> int:
        """Remove ``key``; returns its payload bytes (0 if absent)."""
        pool = self._require_open()
        if key not in self._index:
            return 0
        try:
            freed = await asyncio.wrap_future(pool.submit(self._delete_sync, key, key_hash(key)))
        except KVStoreError:
            self.counters.errors += 1
            raise
        if freed:
            self.counters.deletes += 1
        return freed

    def _cancel_put(self, job: PutJob) -> None:
        # Runs on the event loop.  Workers hold a stripe lock only around one
        # rename, stat or unlink, so waiting for it here is short.
        with self._stripes[int(job.h[:2], 16)]:
            job.cancelled = True
            if not job.committed:
                return  # the worker sees the flag before it renames, and cleans up
            # Committed already (the cancel arrived while the result was on
            # its way back): hide it at once, remove the file in the pool.
            entry = self._index.get(job.key)
            if entry is None or entry.gen != job.gen:
                return
            self._forget(job.key)
            job.gen = -1  # the index no longer refers to it
        pool = self._pool
        if pool is None:
            # close() raced the cancel: the file stays, invisible until the
            # next open() indexes it again, which is harmless for a cache.
            return
        try:
            pool.submit(self._unlink_if_same, job.h, job.ident)
        except RuntimeError:
            return  # shut down in between: as above

    # -- helpers ------------------------------------------------------------

    def _require_open(self) -> ThreadPoolExecutor:
        if self._pool is None or self._closed:
            raise Closed(f"disk tier {self.name!r} is not open")
        return self._pool
