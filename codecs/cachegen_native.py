"""The compiled CacheGen kernels (codecs/_cachegen.c), driven from a thread pool.

Streams are independent: every worker (the calling thread plus a small pool)
runs the same kernel call, which releases the GIL and claims streams one at a
time from a shared counter, so the workers run in parallel and balance
themselves.  :func:`available` is False when the extension was not built (then
:mod:`kvstore.codecs.cachegen` falls back to the torch implementation, which
produces the same bytes, much more slowly).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import numpy as np

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


def run_parallel(nstreams: int, fn: Callable[[np.ndarray], None]) -> None:
    """Call ``fn(counter)`` on every worker at once; the kernels claim streams
    from the shared ``counter`` (int64[1]) one at a time, so a worker whose core
    is busy with other work takes fewer streams instead of holding up the rest."""
    counter = np.zeros(1, dtype=np.int64)
    workers = min(threads(), nstreams)
    if workers <= 1:
        fn(counter)
        return
    pool = _executor()
    futures = [pool.submit(fn, counter) for _ in range(workers - 1)]
    try:
        fn(counter)  # the calling thread works too
    finally:
        errors = [f.exception() for f in futures]
    for exc in errors:
        if exc is not None:
            raise exc
