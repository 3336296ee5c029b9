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
    and the xxh3 of the payload, and returns a view of that buffer: no copy
    after the kernel's.  Anything that fails a check is deleted and counted.

Threads
    Every blocking call runs in the tier's own thread pool.  The index is a
    dict touched by those threads and by the event loop: mutations hold
    ``_lock``; changes that pair a file operation with an index change
    (rename + install, unlink + forget) also hold the key's *stripe* lock, so
    the index always describes the file that is on disk under that name.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import itertools
import os
import re
import threading
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from kvstore.chunk import Chunk, ChunkMeta
from kvstore.errors import (
    CapacityError,
    Closed,
    ConfigError,
    CorruptChunk,
    InvalidArgument,
    KVStoreError,
)
from kvstore.keys import ChunkKey
from kvstore.tiers.base import Tier
from kvstore.tiers.disk_format import (
    FIRST_READ,
    HEADER_BOUND,
    aligned_view,
    decode_header,
    encode_header,
    key_hash,
    read_whole,
    write_all,
)

__all__ = ["HEADER_BOUND", "DiskTier", "DiskTierConfig", "decode_header", "encode_header", "key_hash"]

_SUFFIX = ".kvc"
_TMP_SUFFIX = ".tmp"
_NAME_RE = re.compile(r"^[0-9a-f]{62}\.kvc$")
_LOCK_NAME = ".lock"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True, slots=True)
class DiskTierConfig:
    """Where and how much the disk tier stores.

    ``capacity_bytes`` counts on-disk bytes (headers included).  ``fsync``
    makes every put durable before it returns; turn it off only for scratch
    data.  ``io_threads`` is the number of blocking file operations in flight
    at once; SSDs want several for full bandwidth.  ``direct_reads`` reads
    with ``O_DIRECT`` where the file system allows it: the tier sits below a
    memory tier, so a second copy in the page cache only wastes memory, and
    cold reads measured faster that way (docs/benchmarks/disk.md).
    """

    path: Path
    capacity_bytes: int
    fsync: bool = True
    io_threads: int = 4
    direct_reads: bool = True

    def __post_init__(self) -> None:
        path: object = self.path
        if isinstance(path, str) and path:
            object.__setattr__(self, "path", Path(path))
        elif not isinstance(path, Path):
            raise ConfigError(f"disk.path must be a directory path (str or Path), got {path!r}")
        cap: object = self.capacity_bytes
        if isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0:
            raise ConfigError(f"disk.capacity_bytes must be a positive integer (bytes), got {cap!r}")
        if not isinstance(self.fsync, bool):
            raise ConfigError(f"disk.fsync must be true or false, got {self.fsync!r}")
        threads: object = self.io_threads
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 256:
            raise ConfigError(f"disk.io_threads must be an integer in [1, 256], got {threads!r}")
        if not isinstance(self.direct_reads, bool):
            raise ConfigError(f"disk.direct_reads must be true or false, got {self.direct_reads!r}")


@dataclass(slots=True)
class _Entry:
    nbytes: int  # payload, what the store tracks
    disk_bytes: int  # header + payload, what capacity counts
    gen: int  # which put installed it, so a late rollback never removes a newer value


class _PutJob:
    """One put crossing from the event loop to a worker thread.

    ``cancelled`` and ``committed`` change only under the key's stripe lock,
    which is what makes "cancel" and "rename" mutually exclusive.
    """

    __slots__ = ("key", "h", "header", "payload", "size", "gen", "cancelled", "committed", "ident")

    def __init__(self, key: ChunkKey, h: str, header: bytes, payload: memoryview, gen: int) -> None:
        self.key = key
        self.h = h
        self.header = header
        self.payload = payload
        self.size = len(header) + payload.nbytes
        self.gen = gen
        self.cancelled = False
        self.committed = False
        self.ident: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the file it wrote


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _io_error(tier: str, op: str, exc: OSError) -> KVStoreError:
    if exc.errno in _NO_SPACE:
        return CapacityError(f"disk tier {tier!r}: {op} failed, the file system is full: {exc}")
    return KVStoreError(f"disk tier {tier!r}: {op} failed: {exc}")


def _consume(fut: asyncio.Future[None]) -> None:
    # The put's caller is gone (cancelled); mark the outcome as seen so that
    # asyncio does not log "exception was never retrieved" for it.
    if not fut.cancelled():
        fut.exception()


class DiskTier(Tier):
    """Chunks as files on local disk; survives restarts and ``kill -9``.

    Use ``async with DiskTier(name, config) as tier`` or call :meth:`open`
    and :meth:`close`.  :meth:`entries` and :meth:`delete` report payload
    bytes (``meta.nbytes``), like the other tiers and what the store tracks;
    :attr:`used_bytes` and ``capacity_bytes`` count on-disk bytes (header +
    payload).
    """

    kind: ClassVar[str] = "disk"

    def __init__(self, name: str, config: DiskTierConfig) -> None:
        super().__init__(name)
        self.config = config
        self._root = str(config.path)
        self._index: dict[ChunkKey, _Entry] = {}
        self._lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(256)]
        self._used = 0
        self._reserved = 0
        self._gens = itertools.count(1)
        self._pool: ThreadPoolExecutor | None = None
        self._lock_fd: int | None = None
        self._closed = False
        self._direct = config.direct_reads

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
            raise _io_error(self.name, f"open of {self._root}", exc) from exc
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
        job = _PutJob(key, key_hash(key), encode_header(key, chunk.meta), payload, next(self._gens))
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

    # -- worker-thread side -------------------------------------------------

    def _put_sync(self, job: _PutJob) -> None:
        d = self._dir(job.h)
        tmp = os.path.join(d, f".{job.h[2:]}.{uuid.uuid4().hex}{_TMP_SUFFIX}")
        try:
            if job.cancelled:  # cancelled while queued: skip the I/O
                return
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                write_all(fd, [memoryview(job.header), job.payload])
                if self.config.fsync:
                    # fdatasync also persists the new size, all a reader needs.
                    os.fdatasync(fd)
                st = os.fstat(fd)
                job.ident = (st.st_dev, st.st_ino)
            finally:
                os.close(fd)
            with self._stripes[int(job.h[:2], 16)]:
                if job.cancelled:
                    return
                os.rename(tmp, self._final(job.h))
                self._install(job)
            if self.config.fsync:
                try:
                    self._fsync_dir(d)
                except OSError:
                    # Not durable, so not acknowledged: take the value back.
                    self._rollback(job)
                    raise
        except OSError as exc:
            raise _io_error(self.name, "put", exc) from exc
        finally:
            if not job.committed:
                self._release(job.size)
                try:
                    _unlink_quiet(tmp)
                except OSError:
                    # Nothing more can be done now; the next open() removes it.
                    pass

    def _get_sync(self, key: ChunkKey, h: str) -> tuple[ChunkMeta, memoryview] | None:
        path = self._final(h)
        try:
            fd, direct = self._open_for_read(path)
        except FileNotFoundError:
            self._forget_if_missing(key, h)
            return None
        except OSError as exc:
            raise _io_error(self.name, "get", exc) from exc
        try:
            st = os.fstat(fd)
            size = st.st_size
            # One buffer for the whole file and one read: the payload is a
            # view into it, so nothing is copied after the kernel's copy.
            view = aligned_view(size)
            if not direct:
                os.posix_fadvise(fd, 0, size, os.POSIX_FADV_SEQUENTIAL)
            try:
                got = read_whole(fd, view, size, direct)
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
                # O_DIRECT accepted at open but not at read (some FUSE file
                # systems): read through the page cache from now on.
                self._direct = False
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                got = read_whole(fd, view, size, False)
            try:
                key_str, meta, hlen = decode_header(view[:got])
                if key_str != str(key):
                    raise CorruptChunk("file holds another key")
                if got != size or size != hlen + meta.nbytes:
                    raise CorruptChunk("file is truncated")
                chunk = Chunk(meta, view[hlen:size])
                chunk.verify()
            except CorruptChunk:
                self._drop_corrupt(key, h, (st.st_dev, st.st_ino))
                return None
            return meta, chunk.payload
        except OSError as exc:
            raise _io_error(self.name, "get", exc) from exc
        finally:
            os.close(fd)

    def _open_for_read(self, path: str) -> tuple[int, bool]:
        """(fd, whether it is O_DIRECT)."""
        flags = os.O_RDONLY | os.O_CLOEXEC
        if self._direct:
            try:
                return os.open(path, flags | os.O_DIRECT), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct = False  # tmpfs and a few others refuse O_DIRECT
        return os.open(path, flags), False

    def _delete_sync(self, key: ChunkKey, h: str) -> int:
        try:
            with self._stripes[int(h[:2], 16)]:
                if key not in self._index:
                    return 0
                # Unlink first: if it fails the index still matches the disk.
                _unlink_quiet(self._final(h))
                return self._forget(key)
        except OSError as exc:
            raise _io_error(self.name, "delete", exc) from exc

    def _install(self, job: _PutJob) -> None:
        # Caller holds the stripe lock and has just renamed the file in place.
        with self._lock:
            old = self._index.get(job.key)
            self._index[job.key] = _Entry(job.payload.nbytes, job.size, job.gen)
            self._used += job.size - (old.disk_bytes if old is not None else 0)
            self._reserved -= job.size
            job.committed = True

    def _rollback(self, job: _PutJob) -> None:
        """Remove what ``job`` committed, unless a newer put replaced it already."""
        with self._stripes[int(job.h[:2], 16)]:
            self._rollback_locked(job)

    def _rollback_locked(self, job: _PutJob) -> None:
        entry = self._index.get(job.key)
        if entry is None or entry.gen != job.gen:
            return
        path = self._final(job.h)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            pass
        else:
            if (st.st_dev, st.st_ino) == job.ident:
                os.unlink(path)
        self._forget(job.key)

    def _cancel_put(self, job: _PutJob) -> None:
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

    def _unlink_if_same(self, h: str, ident: tuple[int, int]) -> None:
        # Nobody waits for this job: if the unlink fails the file stays
        # invisible and unaccounted until the next open() indexes it again.
        path = self._final(h)
        with self._stripes[int(h[:2], 16)]:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return
            if (st.st_dev, st.st_ino) == ident:
                os.unlink(path)

    def _forget(self, key: ChunkKey) -> int:
        with self._lock:
            entry = self._index.pop(key, None)
            if entry is None:
                return 0
            self._used -= entry.disk_bytes
            return entry.nbytes

    def _forget_if_missing(self, key: ChunkKey, h: str) -> None:
        # The index said present but the file is gone: a delete won the race,
        # or someone removed it from outside.  Make the index agree.
        with self._stripes[int(h[:2], 16)]:
            if not os.path.exists(self._final(h)):
                self._forget(key)

    def _drop_corrupt(self, key: ChunkKey, h: str, ident: tuple[int, int]) -> None:
        with self._stripes[int(h[:2], 16)]:
            try:
                st = os.stat(self._final(h))
            except FileNotFoundError:
                pass
            else:
                # Only if the name still refers to the bad file: a put may have
                # replaced it since it was opened.
                if (st.st_dev, st.st_ino) == ident:
                    _unlink_quiet(self._final(h))
                    self._forget(key)
        self._count_corrupt(1)

    def _count_corrupt(self, n: int) -> None:
        if n:
            with self._lock:
                self.counters.corrupt += n

    def _release(self, size: int) -> None:
        with self._lock:
            self._reserved -= size

    def _prepare_root(self) -> int:
        try:
            os.makedirs(self._root, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise ConfigError(f"disk.path {self._root!r} is not a directory") from exc
        fd = os.open(os.path.join(self._root, _LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise ConfigError(
                    f"disk.path {self._root!r} is in use by another open disk tier; "
                    "give each tier its own directory"
                ) from exc
            created = False
            for i in range(256):
                sub = os.path.join(self._root, f"{i:02x}")
                if not os.path.isdir(sub):
                    os.mkdir(sub)
                    created = True
            if created and self.config.fsync:
                self._fsync_dir(self._root)
        except BaseException:
            os.close(fd)  # nobody else will: close() only knows a returned fd
            raise
        return fd

    def _scan_dir(self, sub: str) -> tuple[list[tuple[ChunkKey, _Entry]], int]:
        """Index one subdirectory from headers; remove temp files and bad files."""
        d = os.path.join(self._root, sub)
        found: list[tuple[ChunkKey, _Entry]] = []
        corrupt = 0
        with os.scandir(d) as it:
            names = [e.name for e in it]
        for name in names:
            path = os.path.join(d, name)
            if name.endswith(_TMP_SUFFIX):
                _unlink_quiet(path)  # a put that never committed
            elif _NAME_RE.match(name):
                loaded = self._load(path, sub + name[:62])
                if loaded is None:
                    _unlink_quiet(path)
                    corrupt += 1
                else:
                    found.append(loaded)
            # Anything else is not ours: leave it alone.
        return found, corrupt

    def _load(self, path: str, h: str) -> tuple[ChunkKey, _Entry] | None:
        """(key, index entry) from a file's header, or None if it is bad."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            head = os.pread(fd, FIRST_READ, 0)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        try:
            key_str, meta, hlen = decode_header(head)
            key = ChunkKey.parse(key_str)
        except (CorruptChunk, InvalidArgument):
            return None
        if key_hash(key) != h or size != hlen + meta.nbytes:
            return None  # renamed from elsewhere, or truncated
        return key, _Entry(meta.nbytes, size, 0)

    # -- helpers ------------------------------------------------------------

    def _require_open(self) -> ThreadPoolExecutor:
        if self._pool is None or self._closed:
            raise Closed(f"disk tier {self.name!r} is not open")
        return self._pool

    def _dir(self, h: str) -> str:
        return os.path.join(self._root, h[:2])

    def _final(self, h: str) -> str:
        return os.path.join(self._root, h[:2], h[2:] + _SUFFIX)

    @staticmethod
    def _fsync_dir(d: str) -> None:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

