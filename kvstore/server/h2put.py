"""``KVStore/Put`` on the daemon's own HTTP/2 listener (kvstore/server/h2get.py):
the request stream parsed as it arrives, for the same Put handler grpcio runs.

Over grpcio a 1 MiB put cost the client and the daemon together about 2.5
ms of CPU on the 2-core development VM (the client's request-iterator
thread, grpc's event engine threads, the message copies on both sides), more
than Redis takes for a whole SET.  Here each DATA payload piece the socket
delivers is cut into the call's gRPC messages where it lies: a data message
(``PutFrame.data``: tag 0x12, a varint length, the bytes) goes to the handler
as memoryviews of the received bytes, with no copy until the handler's own
into its receive buffer; any other message (a ``PutFrame`` header) is
gathered and parsed whole.  The handler is
:meth:`~kvstore.server.service.KVStoreService.Put`, so keys, tokens, tenant
checks, stream limits, checksums, quotas and metrics are those of the gRPC
port, and a stream cut off stores nothing of its unfinished chunk.

Backpressure is HTTP/2's own: the sink tells the connection what the handler
took (``taken``), and only that grows the stream's receive window
(kvstore/server/h2data.py), so a call's queue holds at most that window, and a
call that does not take its data (one waiting for a stream slot) holds back its
own stream, not the connection's other calls.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable

from kvstore.errors import InvalidArgument, KVStoreError
from kvstore.server.frames import data_prefix
from kvstore.v1 import kvstore_pb2 as pb

#: Data bytes queued that wake the handler before their message is complete (at most
#: half the stream's window: a client whose window is spent waits for the handler).
WAKE_DATA = 2 << 20
#: Largest request message that is not a data frame (a PutFrame header is a few hundred bytes).
MAX_OTHER_MESSAGE = 1 << 20
#: Bytes of a message read before deciding whether it is a data frame: tag and a 10-byte varint.
_HEAD = 11


class Unimplemented(KVStoreError):
    """A request this port does not take (a compressed message)."""

    status = "UNIMPLEMENTED"


class PutSink:
    """One Put stream's request messages, parsed from its DATA payload as it arrives
    (:meth:`feed`, :meth:`end`) and taken by the handler (:meth:`messages`).

    ``taken(n)`` is told each byte fed once it is done with: a data message's
    when the handler takes it, the rest (length prefixes, headers, a malformed
    stream's) as it is fed; ``window`` is the stream's receive window (see the
    module docstring).  Pieces fed must not change afterwards (``bytes``, or
    views of them): data is queued as views, not copied."""

    def __init__(self, taken: Callable[[int], None], window: int) -> None:
        self._taken = taken
        self._wake = min(WAKE_DATA, window // 2)
        self._queue: deque[pb.PutFrame | memoryview | KVStoreError] = deque()
        self._ready = asyncio.Event()
        self._queued = 0  # data bytes in the queue
        self._ended = False  # END_STREAM seen (or the call is over)
        self._failed = False  # a malformed message: what follows is dropped
        # The message being parsed.
        self._prefix = bytearray()  # its 5-byte length prefix, while incomplete
        self._left = -1  # its bytes still to come; -1: between messages
        self._head = bytearray()  # its first bytes, until it is known to be a data frame or not
        self._data = False  # it is a data frame: its payload goes to the handler as it comes
        self._whole = bytearray()  # another message, gathered whole

    # -- the connection's side ---------------------------------------------------------
    def feed(self, piece: memoryview) -> None:
        """DATA payload bytes of the stream, in order."""
        fed, queued = len(piece), self._queued
        try:
            self._parse(piece)
        finally:
            done = fed - (self._queued - queued)  # all but the data bytes it queued
            if done:
                self._taken(done)

    def _parse(self, piece: memoryview) -> None:
        while piece and not self._failed and not self._ended:
            if self._left < 0:
                k = min(5 - len(self._prefix), len(piece))
                self._prefix += piece[:k]
                piece = piece[k:]
                if len(self._prefix) == 5:
                    flag, size = struct.unpack(">BI", self._prefix)
                    self._prefix.clear()
                    if flag:
                        self._fail(Unimplemented("compressed message: this port takes uncompressed messages"))
                        return
                    self._left, self._data = size, False
                    self._head.clear()
                    self._whole.clear()
                    if size == 0:
                        self._push(pb.PutFrame())
                        self._left = -1
                continue
            if self._data:
                k = min(self._left, len(piece))
                self._left -= k
                self._push(piece[:k])
                piece = piece[k:]
                if not self._left:
                    self._ready.set()  # the message is complete
            elif self._whole:  # not a data frame: gathered whole
                k = min(self._left, len(piece))
                self._whole += piece[:k]
                piece = piece[k:]
                self._left -= k
            else:
                k = min(_HEAD - len(self._head), self._left, len(piece))
                self._head += piece[:k]
                piece = piece[k:]
                self._left -= k
                size = len(self._head) + self._left
                if len(self._head) < min(_HEAD, size):
                    continue
                length, used = data_prefix(self._head)
                if length is not None and used + length == size:  # one data field filling the message
                    self._data = True
                    if len(self._head) > used or not self._left:  # (an empty one too, as grpcio's port hands it on)
                        self._push(memoryview(bytes(self._head[used:])))
                    if not self._left:
                        self._ready.set()  # the message is complete
                elif size > MAX_OTHER_MESSAGE:
                    self._fail(InvalidArgument(f"a PutFrame of {size} bytes that is not one data field; at most {MAX_OTHER_MESSAGE}"))
                    return
                else:
                    self._whole += self._head
            if self._left == 0:
                if not self._data:
                    self._push_message(bytes(self._whole or self._head))
                self._left = -1

    def end(self) -> None:
        """END_STREAM: no more messages."""
        if self._ended:
            return
        if not self._failed and (self._prefix or self._left >= 0):
            self._fail(InvalidArgument("the request stream ended inside a message"))
        self._ended = True
        self._ready.set()

    def close(self) -> None:
        """The call is over: drop what is queued, let the connection read again."""
        self._ended = True
        self._queue.clear()
        self._queued = 0
        self._ready.set()

    @property
    def ended(self) -> bool:
        """The request stream ended (END_STREAM), or the call is over."""
        return self._ended

    # -- the handler's side ------------------------------------------------------------
    async def messages(self) -> AsyncIterator[pb.PutFrame | memoryview]:
        """The request messages (headers as PutFrame, data as memoryviews of payload
        pieces), until END_STREAM; a malformed stream raises its error."""
        while True:
            while self._queue:
                item = self._queue.popleft()
                if isinstance(item, KVStoreError):
                    raise item
                if isinstance(item, memoryview):
                    self._queued -= len(item)
                    self._taken(len(item))
                yield item
            if self._ended:
                return
            self._ready.clear()
            await self._ready.wait()

    # -- inside --------------------------------------------------------------------------
    def _push(self, item: pb.PutFrame | memoryview | KVStoreError) -> None:
        self._queue.append(item)
        if isinstance(item, memoryview):
            self._queued += len(item)
            # Data wakes the handler once there is a batch of it (each wake-up is a turn of
            # the event loop), or when its message is complete (see feed).
            if self._queued < self._wake:
                return
        self._ready.set()

    def _push_message(self, raw: bytes) -> None:
        try:
            self._push(pb.PutFrame.FromString(raw))
        except Exception as exc:  # DecodeError
            self._fail(InvalidArgument(f"malformed PutFrame: {exc}"))

    def _fail(self, exc: KVStoreError) -> None:
        self._failed = True
        self._push(exc)
