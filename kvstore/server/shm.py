"""Shared-memory segments registered by clients on the daemon's host.

A client creates ``/dev/shm/kvstore-<random>``, writes a 16-byte nonce at its
start and registers it.  The daemon maps the file only if the name is one of
ours (no path parts), the size matches, and it reads back the same nonce: a
daemon on another host (or in another IPC namespace) cannot, so registration
fails there with FAILED_PRECONDITION and the client uses the byte stream.

Segments belong to the principal (tenant and role) that registered them; a
slice names a segment id plus offset and length, bounds-checked here on every
use.  The id and the nonce together are the segment's secret: the control
channel (shm_channel.py) accepts a connection that presents both as acting
for the segment's principal.
"""

from __future__ import annotations

import contextlib
import hmac
import mmap
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from kvstore.errors import InvalidArgument, KVStoreError, NotFound, PermissionDenied
from kvstore.server.auth import Principal

SHM_DIR = Path("/dev/shm")
NONCE_BYTES = 16
_NAME_RE = re.compile(r"^kvstore-[A-Za-z0-9_-]{8,64}$")


class FailedPrecondition(KVStoreError):
    status = "FAILED_PRECONDITION"


@dataclass(eq=False)
class Segment:
    id: int
    name: str
    tenant: str | None
    size: int
    map: mmap.mmap
    nonce: bytes
    principal: Principal

    def view(self, offset: int, length: int) -> memoryview:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(
                f"slice [{offset}, {offset + length}) is outside segment {self.id} of {self.size} bytes"
            )
        return memoryview(self.map)[offset : offset + length]


class SegmentTable:
    """Segments mapped by the daemon, by id."""

    def __init__(self, *, max_segments: int = 1024, max_bytes: int = 1 << 40) -> None:
        self._segments: dict[int, Segment] = {}
        self._max_segments = max_segments
        self._max_bytes = max_bytes

    @property
    def mapped_bytes(self) -> int:
        return sum(s.size for s in self._segments.values())

    def register(self, name: str, size: int, nonce: bytes, principal: Principal) -> int:
        if not _NAME_RE.match(name):
            raise InvalidArgument("segment name must be 'kvstore-' followed by 8-64 characters [A-Za-z0-9_-]")
        if len(nonce) != NONCE_BYTES:
            raise InvalidArgument(f"segment nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")
        if size <= NONCE_BYTES:
            raise InvalidArgument(f"segment size must be more than {NONCE_BYTES} bytes, got {size}")
        if len(self._segments) >= self._max_segments or self.mapped_bytes + size > self._max_bytes:
            raise FailedPrecondition("too many shared-memory segments registered; release some or use the stream")
        path = SHM_DIR / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as exc:
            raise FailedPrecondition(f"cannot open {path} on the daemon's host ({exc.strerror}): not a local client?") from None
        try:
            st = os.fstat(fd)
            if st.st_size != size:
                raise FailedPrecondition(f"segment {name} is {st.st_size} bytes here, the client said {size}")
            # MAP_POPULATE: map the client's (already committed) pages now, not
            # one fault per 4 KiB page during the first copies.
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        finally:
            os.close(fd)
        if not hmac.compare_digest(mm[:NONCE_BYTES], nonce):
            mm.close()
            raise FailedPrecondition("segment nonce mismatch: the daemon sees a different file than the client")
        seg_id = secrets.randbits(62) + 1
        self._segments[seg_id] = Segment(seg_id, name, principal.tenant, size, mm, bytes(nonce), principal)
        return seg_id

    def authenticate(self, seg_id: int, nonce: bytes) -> Segment:
        """The segment whose id and nonce these are (the control channel's hello)."""
        seg = self._segments.get(seg_id)
        if seg is None or not hmac.compare_digest(seg.nonce, nonce):
            raise PermissionDenied("unknown segment id or wrong nonce")
        return seg

    def get(self, seg_id: int, tenant: str | None) -> Segment:
        seg = self._segments.get(seg_id)
        if seg is None:
            raise NotFound(f"no shared-memory segment {seg_id}; register it first")
        if seg.tenant is not None and seg.tenant != tenant:
            raise PermissionDenied("segment belongs to another tenant")
        return seg

    def release(self, seg_id: int, tenant: str | None) -> None:
        seg = self.get(seg_id, tenant)
        del self._segments[seg_id]
        # A view may still be exported (a copy in flight): then the map closes
        # when the last view is collected instead of now.
        with contextlib.suppress(BufferError):
            seg.map.close()

    def close(self) -> None:
        for seg_id in list(self._segments):
            self.release(seg_id, self._segments[seg_id].tenant)
