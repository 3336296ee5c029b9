"""The daemon process's memory as the kernel counts it, and freed heap memory
handed back to the kernel: what the memory bound (kvstore/server/limits.py)
reads, and does under pressure.

Resident memory is the kernel's count of the process's pages, anonymous,
file-backed and shared (``RssAnon + RssFile + RssShmem`` in
``/proc/self/status``; the CPU tier's arena is shared memory when local
clients may read it, kvstore/tiers/shared_arena.py), less the shared-memory
segments that clients create and the daemon maps: they belong to the client
(the kernel charges a shared page to the cgroup that first touched it, the
client, which writes it first).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from typing import cast

import psutil


def resident_bytes(pid: int | None = None, *, not_ours: int = 0) -> int:
    """Resident memory (RssAnon + RssFile + RssShmem), in bytes, of this process
    or of ``pid``, less ``not_ours`` bytes of shared memory mapped from others."""
    try:
        with open(f"/proc/{'self' if pid is None else pid}/status", "rb") as f:
            text = f.read()
    except OSError:
        return int(psutil.Process(pid).memory_info().rss)
    total = shared = 0
    for line in text.splitlines():
        if line.startswith((b"RssAnon:", b"RssFile:")):
            total += int(line.split()[1]) * 1024
        elif line.startswith(b"RssShmem:"):
            shared = int(line.split()[1]) * 1024
    return total + max(0, shared - not_ours)


@functools.cache
def _libc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up once (finding libc runs a subprocess)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to trim
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return cast(Callable[[int], int], fn)


def malloc_trim() -> None:
    """Hand freed heap memory back to the kernel, wherever it is in the heap (glibc keeps it otherwise)."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)
