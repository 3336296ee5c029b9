"""The compiled CacheGen kernels (codecs/_cachegen.c), driven from a thread pool.

Streams are independent, so a chunk's streams are split into one contiguous
range per worker; the C code releases the GIL, so the workers run in
parallel.  :func:`available` is False when the extension was not built (then
:mod:`kvstore.codecs.cachegen` falls back to the torch implementation, which
produces the same bytes, much more slowly).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

from kvstore.codecs.cachegen_library import library

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_mod: ModuleType | None = None
_tried = False


def _load() -> ModuleType | None:
    global _mod, _tried
    with _lock:
        if not _tried:
            _tried = True
            try:
                from kvstore.codecs import _cachegen
            except ImportError:
                _mod = None
            else:
                lib = library()
                _cachegen.set_library(
                    lib.freq.tobytes(), lib.shift.tobytes(), lib.mean.tobytes(), lib.lam.tobytes(), lib.entropy.tobytes()
                )
                _mod = _cachegen
        return _mod


def available() -> bool:
    """True when the C extension is importable (``pip install -e .`` builds it)."""
    return _load() is not None


def module() -> ModuleType:
    mod = _load()
    if mod is None:
        raise RuntimeError("kvstore.codecs._cachegen is not built; run `pip install -e .`")
    return mod


def threads() -> int:
    """Worker count: ``$KVSTORE_CODEC_THREADS`` or the number of CPUs this process may use."""
    env = os.environ.get("KVSTORE_CODEC_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=threads(), thread_name_prefix="kvstore-codec")
        return _pool


def run_split(nstreams: int, fn: Callable[[int, int], None]) -> None:
    """Call ``fn(lo, hi)`` on disjoint stream ranges covering [0, nstreams), in parallel."""
    workers = min(threads(), nstreams)
    if workers <= 1:
        fn(0, nstreams)
        return
    bounds = [nstreams * k // workers for k in range(workers + 1)]
    futures = [_executor().submit(fn, bounds[k], bounds[k + 1]) for k in range(1, workers)]
    fn(bounds[0], bounds[1])  # the calling thread takes the first share
    for f in futures:
        f.result()
