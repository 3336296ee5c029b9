"""glibc malloc settings for the daemon process (``kvstore serve`` applies them).

gRPC's Python layer copies every message into fresh ``bytes`` and slices of
the frame size (1-4 MiB).  With glibc's defaults such a block is either
``mmap``-ed and unmapped on every message, or carved from the top of the
heap, which is handed back to the kernel as soon as it is freed: either way
each message pays for first-touch page faults (zeroing included) on every
page, which cost more than the copies themselves.  Measured on the 2-core
machine, a daemon serving 4 MiB Gets spent 2.1 ms per Get building frames
with the defaults and 0.27 ms with these settings; its whole CPU time per
Get went from ~7 to ~2.5 ms (docs/benchmarks/daemon.md).

The settings: blocks below :data:`MMAP_THRESHOLD` come from the heap, and
the heap keeps up to :data:`TRIM_THRESHOLD` of free space at its top
instead of returning it at once.  The memory bound (limits.py) still calls
``malloc_trim`` under pressure, which returns that space regardless.

They are process-wide, so only the daemon's entry point applies them, never
the library (a client lives in someone else's process).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

#: ``M_TRIM_THRESHOLD`` and ``M_MMAP_THRESHOLD`` from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's documented ceiling of its own dynamic threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX):
#: well above the 1-4 MiB frames, and larger blocks stay mmap-ed (returned at once).
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20


def tune_for_streaming() -> bool:
    """Apply the settings above; False (and nothing changed) when libc is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    if not ok:
        log.warning("mallopt refused the streaming settings; gRPC streams will be slower")
    return ok
