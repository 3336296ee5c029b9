"""The disk tier's files and their index: every blocking file operation, run in the tier's threads.

:class:`DiskFiles` is the part of :class:`~kvstore.tiers.disk.DiskTier` that its worker threads
run (see the Layout, Crash safety, Reads and Threads sections of :mod:`kvstore.tiers.disk`):
writing a put's temp file, fsyncing and renaming it into place; reading and checking a
file; unlinking; keeping the index in step with the files under the stripe locks; and, at
open, locking the directory and rebuilding the index from the files' headers (recovery).
The tier itself (:mod:`kvstore.tiers.disk`) is the event-loop side: lifecycle, capacity
accounting, counters, and handing these operations to its thread pool.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import re
import threading
import uuid
from dataclasses import dataclass

from kvstore.chunk import Chunk, ChunkMeta
from kvstore.errors import CapacityError, ConfigError, CorruptChunk, InvalidArgument, KVStoreError
from kvstore.keys import ChunkKey
from kvstore.tiers.base import Tier
from kvstore.tiers.disk_config import DiskTierConfig
from kvstore.tiers.disk_format import FIRST_READ, aligned_view, decode_header, key_hash, read_whole, write_all

__all__ = ["DiskFiles", "PutJob", "io_error"]

_SUFFIX = ".kvc"
_TMP_SUFFIX = ".tmp"
_NAME_RE = re.compile(r"^[0-9a-f]{62}\.kvc$")
_LOCK_NAME = ".lock"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@dataclass(slots=True)
class _Entry:
    nbytes: int  # payload, what the store tracks
    disk_bytes: int  # header + payload, what capacity counts
    gen: int  # which put installed it, so a late rollback never removes a newer value


class PutJob:
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


def io_error(tier: str, op: str, exc: OSError) -> KVStoreError:
    if exc.errno in _NO_SPACE:
        return CapacityError(f"disk tier {tier!r}: {op} failed, the file system is full: {exc}")
    return KVStoreError(f"disk tier {tier!r}: {op} failed: {exc}")


class DiskFiles(Tier):
    """The files of a :class:`~kvstore.tiers.disk.DiskTier` and their index; see the module docstring."""

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
        self._direct = config.direct_reads

    # -- worker-thread side -------------------------------------------------

    def _put_sync(self, job: PutJob) -> None:
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
            raise io_error(self.name, "put", exc) from exc
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
            raise io_error(self.name, "get", exc) from exc
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
            raise io_error(self.name, "get", exc) from exc
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
            raise io_error(self.name, "delete", exc) from exc

    def _install(self, job: PutJob) -> None:
        # Caller holds the stripe lock and has just renamed the file in place.
        with self._lock:
            old = self._index.get(job.key)
            self._index[job.key] = _Entry(job.payload.nbytes, job.size, job.gen)
            self._used += job.size - (old.disk_bytes if old is not None else 0)
            self._reserved -= job.size
            job.committed = True

    def _rollback(self, job: PutJob) -> None:
        """Remove what ``job`` committed, unless a newer put replaced it already."""
        with self._stripes[int(job.h[:2], 16)]:
            self._rollback_locked(job)

    def _rollback_locked(self, job: PutJob) -> None:
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

    # -- at open: the directory, and the index rebuilt from headers ----------

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

