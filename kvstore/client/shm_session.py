"""The shared-memory side of one :class:`~kvstore.client.aio.AsyncClient`.

Its segment, registered with the daemon once, on first use (``shm="auto"``:
tried once, and the client goes on over the byte stream if it cannot be
made or registered; ``shm=True``: that is an error); the daemon's Unix-socket
control channel for ShmPut/ShmGet (kvstore/server/shm_channel.py), with gRPC
as the way when it is missing, busy or broken; and a blocking control
connection of its own that reads chunks from the daemon's shared CPU arena
(direct reads, kvstore/tiers/shared_arena.py) and writes puts into it
(direct writes, kvstore/client/arena_writes.py).  When the daemon forgets
the segment (it restarted) the session forgets it too, and the next call
registers a new one.

The client owns the RPCs: it hands the session the one that registers a
segment, and for each ShmPut/ShmGet the gRPC call to make when the control
channel cannot carry it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, TypeVar

import torch

from kvstore.chunk import ChunkMeta
from kvstore.client.payload import Value
from kvstore.client.blocking_channel import BlockingControlChannel
from kvstore.client.shm import ClientSegment, ControlChannel
from kvstore.errors import InvalidArgument, KVStoreError, error_for_status
from kvstore.v1 import kvstore_pb2 as pb

T = TypeVar("T")

#: Registers a segment with the daemon (the client's RegisterSegment call, with its retries).
Register = Callable[[ClientSegment], Awaitable[pb.RegisterSegmentReply]]


class ShmSession:
    """See the module docstring.  Used from the client's event loop, except
    :meth:`put_direct`'s copies (a worker thread) and :meth:`read_shared`
    (the calling thread)."""

    def __init__(
        self,
        mode: bool | Literal["auto"],
        nbytes: int,
        *,
        timeout_s: float,
        direct_reads: bool,
        direct_writes: bool,
        register: Register,
    ) -> None:
        self._mode = mode
        self._bytes = nbytes
        self._timeout = timeout_s
        self._direct_reads = direct_reads
        self._direct_writes = direct_writes
        self._register_rpc = register
        #: The registered segment, if any.
        self.segment: ClientSegment | None = None
        #: ShmPut/ShmGet over the daemon's Unix socket, when it offers one.
        self.control: ControlChannel | None = None
        self._tried = False
        self._lock = asyncio.Lock()
        #: Reads from and writes into the daemon's shared arena (a blocking control connection of its own).
        self._reader: BlockingControlChannel | None = None

    async def ready(self) -> ClientSegment | None:
        """The segment, registered on the first call; None without one."""
        if self._mode is False:
            return None
        if self.segment is not None or self._tried:
            return self.segment
        async with self._lock:
            if self.segment is not None or self._tried:
                return self.segment
            try:
                return await self._register()
            finally:
                # Only now: callers that came meanwhile waited on the lock
                # instead of finding "tried" and no segment yet.
                self._tried = True

    async def _register(self) -> ClientSegment | None:
        try:
            seg = ClientSegment(self._bytes)
        except OSError:
            if self._mode is True:
                raise
            return None
        try:
            reply = await self._register_rpc(seg)
        except KVStoreError:
            seg.close()
            if self._mode is True:
                raise
            return None
        seg.segment_id = reply.segment_id
        seg.unlink()
        self.segment = seg
        seg.control_socket = reply.control_socket
        if reply.control_socket:
            try:
                self.control = await ControlChannel.open(reply.control_socket, seg.segment_id, seg.nonce)
            except (OSError, KVStoreError):
                self.control = None  # ShmPut/ShmGet over gRPC then
            if self._direct_reads or self._direct_writes:
                # Connecting and attaching run on the event loop: 5 s at most.  Direct
                # writes (in a worker thread) wait for durable puts: the client's timeout.
                self._reader = _arena_reader(seg, min(5.0, self._timeout), writes=self._direct_writes)
                if self._reader is not None:
                    self._reader.set_timeout(self._timeout)
        return seg

    @property
    def uses_shm(self) -> bool:
        return self.segment is not None

    @property
    def stream_only(self) -> bool:
        """Payloads go through the byte stream: shared memory is off, or was tried and is unavailable."""
        return self._mode is False or (self._tried and self.segment is None)

    def drop_control(self) -> None:
        ctl, self.control = self.control, None
        if ctl is not None:
            ctl.close()

    def _drop_reader(self) -> None:
        """The shared arena goes with the segment it was attached for (not with a
        control connection that broke: the reader has its own)."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def close(self) -> ClientSegment | None:
        """Close the connections; the segment, for the client to release and close."""
        self.drop_control()
        self._drop_reader()
        seg, self.segment = self.segment, None
        return seg

    def forget(self, seg: ClientSegment) -> None:
        """The daemon no longer knows ``seg`` (it restarted; shared-memory calls
        answer NOT_FOUND): this call goes over the stream, the next registers a
        new segment (the old one's name is gone, so it cannot be registered again)."""
        if self.segment is seg:
            self.drop_control()
            self._drop_reader()
            self.segment = None
            self._tried = False
            # Unlink, do not unmap: tensors the caller holds (``buffer()``, the value of
            # this very call) may point into the mapping, which is freed with its last
            # reference.  Unmapping here made the stream fallback read freed memory.
            seg.unlink()

    async def call(
        self, kind: int, request: pb.ShmPutRequest | pb.ShmGetRequest, parse: Callable[[bytes], T],
        over_grpc: Callable[[], Awaitable[T]],
    ) -> T:
        """One ShmPut/ShmGet: over the control channel when it is free, else ``over_grpc()``.

        A broken channel (daemon restarted, connection lost, a call cancelled
        half-way) is dropped and the request goes over gRPC, which reports
        what became of the segment."""
        ctl = self.control
        if ctl is not None and ctl.broken:
            self.drop_control()
        elif ctl is not None and not ctl.busy:
            try:
                async with asyncio.timeout(self._timeout):
                    return parse(await ctl.call(kind, request.SerializeToString()))
            except TimeoutError:
                self.drop_control()
                raise error_for_status("DEADLINE_EXCEEDED", f"no reply within {self._timeout} s") from None
            except (OSError, asyncio.IncompleteReadError):
                self.drop_control()
        return await over_grpc()

    # -- the daemon's shared arena ------------------------------------------------
    @property
    def direct_reads(self) -> int:
        """Gets served from the daemon's shared arena (no request) since the segment was registered."""
        reader = self._reader
        return 0 if reader is None or reader.arena is None else reader.arena.reads

    @property
    def direct_writes(self) -> int:
        """Puts written into the daemon's shared arena since the segment was registered."""
        reader = self._reader
        return 0 if reader is None else reader.direct_writes

    async def direct_reads_ready(self) -> bool:
        """Register the segment (mapping the daemon's shared arena, if offered)
        and map every page of the arena into this process, in a worker thread."""
        await self.ready()
        reader = self._reader
        if reader is None or reader.arena is None:
            return False
        await asyncio.to_thread(reader.arena.populate)
        return True

    def read_shared(self, key: str, out: torch.Tensor | None) -> tuple[ChunkMeta, torch.Tensor] | None:
        """The chunk read from the daemon's shared arena (into ``out``, or a new
        tensor; copied on this thread), or None: ask the daemon."""
        reader = self._reader
        if reader is None or not self._direct_reads:
            return None
        read = reader.read_shared(key, out)
        if read is None and reader.broken:
            self._reader = None
        return read

    async def put_direct(self, texts: Sequence[str], values: Sequence[Value], durable: bool) -> list[str | None] | None:
        """Direct writes, in a worker thread: for each value, the tier it went to
        or None (put it another way); None: put them all another way (off, not
        offered, the connection busy with another call or gone, or values that
        :func:`~kvstore.client.arena_writes.direct_items` turns away)."""
        reader = self._reader
        if reader is None or not self._direct_writes:
            return None
        return await asyncio.to_thread(reader.try_put_many, texts, values, durable)

    # -- buffers in the segment ---------------------------------------------------
    async def buffer(self, nbytes: int) -> torch.Tensor | None:
        seg = await self.ready()
        return None if seg is None else seg.buffer(nbytes)

    def free_buffer(self, t: torch.Tensor) -> None:
        if self.segment is None:
            raise InvalidArgument("no shared-memory segment")
        self.segment.free_buffer(t)


def _arena_reader(seg: ClientSegment, timeout_s: float, *, writes: bool) -> BlockingControlChannel | None:
    """A control connection with the daemon's shared arena attached (asking for it
    writable with ``writes``), or None (not offered: a token file, turned off, no
    tier that can; or no connection)."""
    try:
        ch = BlockingControlChannel(seg.control_socket, seg.segment_id, seg.nonce, timeout_s, writes=writes)
    except (OSError, KVStoreError):
        return None
    try:
        if ch.attach() is not None:
            return ch
    except (OSError, KVStoreError):
        pass
    ch.close()
    return None
