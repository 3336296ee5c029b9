"""The client side of the shared-memory fast path.

A :class:`ClientSegment` is a file under /dev/shm that this process maps and
the daemon maps too (after checking a nonce the client wrote at its start).
Space in it is handed out with the same free-list allocator the memory tiers
use; :meth:`ClientSegment.buffer` gives callers tensors that live in the
segment, so a put from them or a get into them costs the daemon one copy and
the client none.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from pathlib import Path

import torch

from kvstore.errors import CapacityError, InvalidArgument
from kvstore.tiers.allocator import FreeListAllocator

SHM_DIR = Path("/dev/shm")
NONCE_BYTES = 16
_DATA_START = 4096  # the nonce page is never handed out


class ClientSegment:
    def __init__(self, size: int) -> None:
        if size < 2 * _DATA_START:
            raise InvalidArgument(f"shared-memory segment size must be at least {2 * _DATA_START} bytes")
        self.name = "kvstore-" + secrets.token_hex(12)
        self.path = SHM_DIR / self.name
        self.size = size
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        except OSError:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self._map[:NONCE_BYTES] = self.nonce
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        # Commit the pages now: copies into fresh pages are ~3x slower.
        self.tensor[_DATA_START:].zero_()
        self._alloc = FreeListAllocator(size - _DATA_START, align=4096)
        self.segment_id = 0  # set once the daemon registered it

    def alloc(self, nbytes: int) -> int | None:
        off = self._alloc.alloc(nbytes)
        return None if off is None else off + _DATA_START

    def free(self, offset: int) -> None:
        self._alloc.free(offset - _DATA_START)

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.tensor[offset : offset + nbytes]

    def offset_of(self, t: torch.Tensor) -> int | None:
        """Offset of ``t``'s bytes inside this segment, or None if it lives elsewhere."""
        if t.device.type != "cpu" or not t.is_contiguous():
            return None
        base = self.tensor.data_ptr()
        ptr = t.data_ptr()
        n = t.numel() * t.element_size()
        if base + _DATA_START <= ptr and ptr + n <= base + self.size:
            return ptr - base
        return None

    def buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` inside the segment (free with :meth:`free_buffer`)."""
        off = self.alloc(nbytes)
        if off is None:
            raise CapacityError(f"shared-memory segment has no free block of {nbytes} bytes")
        return self.view(off, nbytes)

    def free_buffer(self, t: torch.Tensor) -> None:
        off = self.offset_of(t)
        if off is None:
            raise InvalidArgument("tensor does not live in this shared-memory segment")
        self.free(off)

    def close(self) -> None:
        self.unlink()
        del self.tensor
        # Views still exported by callers keep the mapping alive until collected.
        with contextlib.suppress(BufferError):
            self._map.close()

    def unlink(self) -> None:
        """Remove the name; the mappings stay.  Done once the daemon has mapped it,
        so a crashed client leaves nothing behind in /dev/shm."""
        self.path.unlink(missing_ok=True)
