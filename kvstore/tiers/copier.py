"""Copies of large chunks in host memory, split over threads.

One core copies 10-13 GB/s between buffers that are not in its caches on the
2-core benchmark VM; two cores copy 16-32 MiB 5-20 % faster, 4 MiB slower
(waking a pool thread costs about what the second core saves:
``python benchmarks/bench_copier.py``).  The daemon's copies are the body of
every shared-memory put and get, and while one runs the client is blocked
waiting for it, so the copy may use every thread the copier was given.

A :class:`Copier` splits a copy of at least ``split_min`` bytes (8 MiB by
default) into one part per thread (at 4 KiB boundaries).  Up to ``inline_max`` bytes the calling
thread (the event loop's, in the daemon) copies the first part itself while
the pool copies the others, and takes back any part the pool has not started
yet (a pool busy with another chunk never makes the caller wait for it):
handing the whole copy to a thread and waking the loop afterwards costs
0.05-0.1 ms, the time of copying about 1 MiB.  Larger copies run entirely in
the pool, so the event loop keeps serving.  Copies to or from a device run as
one ``copy_`` (the device's engine does the work).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch
import xxhash

from kvstore.chunk import SUM_LEAF, byte_view, checksummer, sum_leaves

T = TypeVar("T")
#: Parts are cut at multiples of this (pages: neither side shares a page between threads).
PART_ALIGN = 4096


#: A flat uint8 tensor (host or device), or a byte memoryview of host memory.
Buffer = torch.Tensor | memoryview


class Copier:
    """Copies ``src`` into ``dst`` (two buffers of one length); see the module docstring."""

    def __init__(
        self,
        pool: ThreadPoolExecutor | None,
        threads: int,
        *,
        inline_max: int = 8 << 20,
        split_min: int = 8 << 20,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self._pool = pool
        self._threads = threads
        self._inline_max = inline_max
        self._split_min = split_min

    def parts(self, dst: Buffer, src: Buffer) -> list[tuple[Buffer, Buffer]]:
        """The (dst, src) pieces a copy of these two is cut into (tensors when cut:
        torch copies without the GIL, a memoryview assignment holds it)."""
        n = _size(dst)
        if _size(src) != n:
            raise ValueError(f"copy of {_size(src)} bytes into {n}")
        if not self._splits(dst, src):
            return [(dst, src)]
        d, s = _tensor(dst), _tensor(src)
        per_thread = -(-n // self._threads)  # ceil
        step = -(-per_thread // PART_ALIGN) * PART_ALIGN
        return [(d[o : o + step], s[o : o + step]) for o in range(0, n, step)]

    def _splits(self, dst: Buffer, src: Buffer) -> bool:
        return (
            self._pool is not None
            and self._threads > 1
            and _size(dst) >= self._split_min
            and _on_host(dst)
            and _on_host(src)
        )

    def copy_now(self, dst: Buffer, src: Buffer, *, each: Callable[[Buffer], object] | None = None) -> None:
        """Copy on the calling thread, helped by the pool; returns when done.
        ``each`` is called with every copied part of ``dst``, in order, on the
        calling thread, as soon as that part is copied (its own part first,
        while the pool still copies the others)."""
        parts = self.parts(dst, src)
        if len(parts) == 1 or self._pool is None:
            _copy_part(dst, src)
            if each is not None:
                each(dst)
            return
        helpers = [self._pool.submit(_copy_part, d, s) for d, s in parts[1:]]
        _copy_part(*parts[0])
        if each is not None:
            each(parts[0][0])
        for fut, (d, s) in zip(helpers, parts[1:], strict=True):
            if fut.cancel():  # the pool had not started it: do it here
                _copy_part(d, s)
            else:
                fut.result()
            if each is not None:
                each(d)

    def start(self, dst: Buffer, src: Buffer) -> asyncio.Future[None]:
        """Start the copy; the future is done when all of it is.

        Small and medium copies are done before this returns (see the module
        docstring).  Cancelling the returned future does not stop a copy that
        is running: a caller that frees ``dst`` on cancellation must do it from
        :func:`when_done`.
        """
        loop = asyncio.get_running_loop()
        if _size(dst) <= self._inline_max or self._pool is None:
            self.copy_now(dst, src)
            done: asyncio.Future[None] = loop.create_future()
            done.set_result(None)
            return done
        pieces = [self._pool.submit(_copy_part, _tensor(d), _tensor(s)) for d, s in self.parts(dst, src)]
        return _all_done(loop, pieces)

    def start_summed(self, dst: memoryview, src: Buffer) -> asyncio.Future[int]:
        """:meth:`start`, then the checksum of ``dst`` as written, computed by
        the thread that copied (one trip through the pool for both)."""
        loop = asyncio.get_running_loop()
        if dst.nbytes <= self._inline_max or self._pool is None:
            summed: asyncio.Future[int] = loop.create_future()
            summed.set_result(self._copy_and_sum(dst, src))
            return summed
        return asyncio.wrap_future(self._pool.submit(self._copy_and_sum, dst, src), loop=loop)

    def _copy_and_sum(self, dst: memoryview, src: Buffer) -> int:
        if not _on_host(src):
            summed = checksummer()
            self.copy_now(dst, src, each=lambda part: summed.update(_view(part)))
            return summed.intdigest()
        return copy_summed(_tensor(dst), _tensor(src).reshape(-1).view(torch.uint8), self._pool if self._splits(dst, src) else None)

    async def copy(self, dst: Buffer, src: Buffer) -> None:
        """Copy ``src`` into ``dst``; if cancelled, the copy is still finished in the background."""
        await finish(self.start(dst, src))


#: :func:`copy_summed` checksums each piece of this size right after copying it,
#: while it is still in the core's L2 cache.
SUM_PIECE = 256 << 10


def copy_summed(dst: torch.Tensor, src: torch.Tensor, pool: ThreadPoolExecutor | None = None) -> int:
    """Copy ``src`` into ``dst`` (flat uint8 CPU tensors of one length) and return
    the checksum of ``dst`` as written (:func:`kvstore.chunk.checksum`).

    Each leaf of the checksum (:data:`~kvstore.chunk.SUM_LEAF` bytes) is
    copied and summed by one thread, :data:`SUM_PIECE` at a time, so the
    checksum reads each piece from the cache instead of memory: about the
    time of the copy alone.  From :data:`SPLIT_SUMMED` bytes, with a
    ``pool``, one of its threads takes leaves from the end while the calling
    thread takes them from the start, until they meet (the calling thread
    does them all when a busy pool never starts its thread).  The copies are
    ``memmove`` and the sums xxh3, both without the GIL.
    """
    n = dst.numel()
    if src.numel() != n:
        raise ValueError(f"copy of {src.numel()} bytes into {n}")
    return copy_summed_at(dst.data_ptr(), _view(dst), src.data_ptr(), n, pool)


def copy_summed_at(d: int, out: memoryview, s: int, n: int, pool: ThreadPoolExecutor | None = None) -> int:
    """:func:`copy_summed` by address: copy ``n`` bytes from address ``s`` to
    address ``d``, whose bytes ``out`` is (a byte view, ``n`` long); the
    checksum of ``out`` as written.  No torch call: the caller has checked
    that both ranges are ``n`` bytes of memory it holds."""

    def copy_leaf(at: int, end: int) -> xxhash.xxh3_64:
        summed = xxhash.xxh3_64()
        for piece in range(at, end, SUM_PIECE):
            k = min(SUM_PIECE, end - piece)
            ctypes.memmove(d + piece, s + piece, k)
            summed.update(out[piece : piece + k])
        return summed

    if n <= SUM_LEAF:
        return copy_leaf(0, n).intdigest()
    return sum_leaves(n, lambda at, end: copy_leaf(at, end).digest(), pool if n >= SPLIT_SUMMED else None)


#: :func:`copy_summed` shares copies of at least this many bytes with a pool
#: thread.  Below, waking it costs what it saves: at 4 MiB the copy took 0.40-0.51
#: ms alone and 0.41-0.62 ms shared, at 8 MiB 0.79-0.81 alone and 0.60-0.76 shared
#: (``python benchmarks/bench_copier.py``, direct-write rows).
SPLIT_SUMMED = 8 << 20


def _size(b: Buffer) -> int:
    return b.nbytes if isinstance(b, memoryview) else b.numel() * b.element_size()


def _on_host(b: Buffer) -> bool:
    return isinstance(b, memoryview) or b.device.type == "cpu"


def _tensor(b: Buffer) -> torch.Tensor:
    if isinstance(b, torch.Tensor):
        return b
    if not b.nbytes:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(byte_view(b), dtype=torch.uint8)


def _view(b: Buffer) -> memoryview:
    """The bytes of a host buffer (a part of a copy's destination)."""
    return byte_view(b) if isinstance(b, memoryview) else memoryview(b.numpy())  # type: ignore[arg-type]


def _copy_part(dst: Buffer, src: Buffer) -> None:
    if isinstance(dst, memoryview) and isinstance(src, memoryview):
        # memcpy, with no tensors to make: 1-5 us less than torch for small copies.
        byte_view(dst)[:] = byte_view(src)
    else:
        _tensor(dst).copy_(_tensor(src))


async def finish(fut: asyncio.Future[T]) -> T:
    """Wait for ``fut`` (from :meth:`Copier.start`) without cancelling it if the
    caller is cancelled; one that is done already costs no trip through the loop."""
    if fut.done():
        return fut.result()
    return await asyncio.shield(fut)


def when_done(fut: asyncio.Future[T], fn: Callable[[], object]) -> None:
    """Run ``fn`` once ``fut`` (from :meth:`Copier.start`) is done, however it ends."""
    fut.add_done_callback(lambda _f: fn())


def _all_done(loop: asyncio.AbstractEventLoop, pieces: list[Future[None]]) -> asyncio.Future[None]:
    """One asyncio future for several pool futures: done when the last is, failed if any failed."""
    done: asyncio.Future[None] = loop.create_future()
    left = [len(pieces)]
    error: list[BaseException] = []
    lock = threading.Lock()  # the callbacks run on the pool's threads

    def finished(fut: Future[None]) -> None:
        exc = fut.exception()
        with lock:
            if exc is not None:
                error.append(exc)
            left[0] -= 1
            last = left[0] == 0
        if last:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, done, error)

    for p in pieces:
        p.add_done_callback(finished)
    return done


def _settle(done: asyncio.Future[None], error: list[BaseException]) -> None:
    if done.done():
        return
    if error:
        done.set_exception(error[0])
    else:
        done.set_result(None)
