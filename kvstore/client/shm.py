"""The client side of the shared-memory fast path.

A :class:`ClientSegment` is a file under /dev/shm that this process maps and
the daemon maps too (after checking a nonce the client wrote at its start).
Space in it is handed out with the same free-list allocator the memory tiers
use; :meth:`ClientSegment.buffer` gives callers tensors that live in the
segment, so a put from them or a get into them costs the daemon one copy and
the client none.  :class:`ControlChannel` carries the ShmPut/ShmGet
requests over the daemon's Unix socket, skipping gRPC's per-call cost;
kvstore/client/blocking_channel.py does the same from the sync client's
calling thread, and reads from and writes into the daemon's shared arena.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import secrets
from pathlib import Path

import torch

from kvstore.chunk import ChunkMeta
from kvstore.errors import CapacityError, InvalidArgument, error_for_status
from kvstore.server.messages import meta_to_pb
from kvstore.server.shm_channel import (
    HEADER,
    HELLO,
    KIND_ERROR,
    KIND_HELLO,
    KIND_OK,
    MAX_BODY,
    encode,
)
from kvstore.tiers.allocator import FreeListAllocator
from kvstore.v1 import kvstore_pb2 as pb

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
        self.control_socket = ""  # the daemon's control channel, if it offers one

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


class ControlChannel:
    """The client's end of the daemon's shared-memory control channel.

    ShmPut/ShmGet requests over a Unix socket instead of gRPC (see
    kvstore/server/shm_channel.py for why and for the wire format).  One
    request at a time: :attr:`busy` tells a caller to use gRPC meanwhile.
    A call cancelled or failed half-way leaves the connection's framing
    unknown, so the channel is then :attr:`broken` and must be dropped.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()
        self.broken = False

    @classmethod
    async def open(cls, path: str, segment_id: int, nonce: bytes) -> ControlChannel:
        """Connect and say hello (raises OSError or a typed KVStoreError)."""
        reader, writer = await asyncio.open_unix_connection(path, limit=MAX_BODY + HEADER.size)
        ch = cls(reader, writer)
        try:
            await ch.call(KIND_HELLO, HELLO.pack(segment_id, nonce))
        except BaseException:
            ch.close()
            raise
        return ch

    @property
    def busy(self) -> bool:
        return self._lock.locked() or self.broken

    async def call(self, kind: int, body: bytes) -> bytes:
        """Send one request; the reply's body, or the daemon's error as a typed KVStoreError."""
        async with self._lock:
            try:
                self._writer.write(encode(kind, body))
                await self._writer.drain()
                head = await self._reader.readexactly(HEADER.size)
                length, reply_kind = HEADER.unpack(head)
                if not 1 <= length <= MAX_BODY + 1:
                    raise ConnectionError(f"daemon sent a control message of {length} bytes")
                reply = await self._reader.readexactly(length - 1)
            except BaseException:
                self.broken = True
                self.close()
                raise
        if reply_kind not in (KIND_OK, KIND_ERROR):
            self.broken = True
            self.close()
        return reply_body(reply_kind, reply)

    def close(self) -> None:
        self.broken = True
        with contextlib.suppress(RuntimeError):  # the loop may be closed already
            self._writer.close()



def reply_body(kind: int, body: bytes) -> bytes:
    """The body of a control-channel reply of ``kind``; a typed error for an error
    reply, ConnectionError for a kind this client does not know."""
    if kind == KIND_OK:
        return body
    if kind == KIND_ERROR:
        status, _, message = body.decode("utf-8", "replace").partition("\n")
        raise error_for_status(status, message)
    raise ConnectionError(f"daemon sent a control message of unknown kind {kind}")


def put_item(seg: ClientSegment, key: str, meta: ChunkMeta, offset: int) -> pb.ShmPutItem:
    """A ShmPut item for ``meta.nbytes`` bytes at ``offset`` of ``seg`` (the daemon checksums them)."""
    return pb.ShmPutItem(
        key=key,
        meta=meta_to_pb(meta),
        slice=pb.ShmSlice(segment_id=seg.segment_id, offset=offset, length=meta.nbytes),
        daemon_checksum=True,
    )


def get_item(seg: ClientSegment, key: str, offset: int, length: int) -> pb.ShmGetItem:
    """A ShmGet item: copy ``key``'s bytes to ``offset`` of ``seg``, if they fit in ``length``."""
    return pb.ShmGetItem(key=key, slice=pb.ShmSlice(segment_id=seg.segment_id, offset=offset, length=length))
