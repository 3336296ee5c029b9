"""Limits and backpressure of the daemon: what it refuses, and when.

A daemon shared by many clients must answer overload with a clear error the
client can act on (RESOURCE_EXHAUSTED, retry later), never with unbounded
queues or an out-of-memory kill.  :class:`Limits` holds the daemon-wide
state; the service calls it at the entry of its handlers:

* :meth:`Limits.stream` when a Put or Get stream starts: at most
  ``max_streams_per_client`` streams per client connection (refused at once
  past it: one client must not starve the others), and at most
  ``max_concurrent_streams`` in all (a new stream waits up to
  ``stream_wait_s`` for a slot, then is refused);
* :meth:`Limits.take_buffer` when a put's header arrives, for its receive
  buffer: the buffers of puts being received must stay under
  ``max_inflight_bytes``, and the daemon's resident memory must stay under
  ``max_memory_bytes`` whatever arrives next (see "Memory accounting");
* :meth:`Limits.hold_read` when a get reads a chunk from a tier that hands
  out copies (disk, Redis, a peer, device memory): the copy is charged
  against ``max_memory_bytes`` while the get holds it, and a get that could
  pass the bound is refused;
* ``Limits.quotas`` (:class:`~kvstore.server.tenant_quotas.TenantQuotas`):
  ``make_room_for_tenant`` before a chunk is admitted: a tenant with a quota
  evicts its own chunks (all its models together) to make room, and is
  refused only when what is left is pinned.

Resident memory is the kernel's count of the process's pages less the
shared-memory segments that clients create and the daemon maps, as
:func:`~kvstore.server.resident.resident_bytes` reads it
(kvstore/server/resident.py says which pages, and why).

Memory accounting
-----------------
A put, and a new Put stream, are admitted only if resident memory stays
under the bound even when everything already admitted grows to its worst
case.  The daemon charges:

* ``resident``: the kernel's figure, read at most every
  :data:`RSS_REFRESH_S` (on the event loop, where receive buffers are
  written); the pages written into receive buffers since that reading, and
  the allowances of streams closed since (their memory may sit in the heap),
  are charged on top until the next one;
* each receive buffer in use, for what it may still make resident: the
  pages of its put not yet written, less those it already had from an
  earlier put (buffers.py);
* every open Put or Get stream, from the moment its handler starts (before
  a header is read, and while it waits for a stream slot), for what the
  gRPC transport may hold for it: the HTTP/2 receive window
  (:data:`STREAM_WINDOW`, which the daemon sets when bounded) plus twice
  the largest message it accepts (gRPC core assembles a message, the Python
  layer copies it into a ``bytes``);
* a fixed :data:`SAFETY_MARGIN` for what is not counted one by one: Python
  objects of requests, unary requests (at most one message each), streams
  the transport has opened but whose handler has not started yet (a window
  each, for a moment), allocator slack.

Idle pooled buffers are part of ``resident``; before refusing a put the
daemon hands them back to the kernel (``munmap``), then freed heap memory
(``malloc_trim``, at most every :data:`TRIM_EVERY_S`), and measures again.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from kvstore.config import LimitsConfig, format_size
from kvstore.errors import CapacityError
from kvstore.server.buffers import BufferPool, RecvBuffer
from kvstore.server.resident import malloc_trim, resident_bytes
from kvstore.server.tenant_quotas import TenantQuotas
from kvstore.store import TieredStore

#: Resident memory is read at most this often (reading /proc costs ~20 us).
RSS_REFRESH_S = 0.005
#: HTTP/2 receive window per stream when a memory bound is set (HTTP/2's
#: default): what a client may push on a stream before the daemon asks for a
#: message.  A stream that waits for a slot, or that is refused, holds no more
#: than this in the transport; one being read opens the window by the message
#: it asks for (gRPC does this).  A flood of 32 clients retrying refused
#: 24 MiB puts took resident memory 12 MiB past the bound with a 2 MiB window
#: (each refused stream held 2 MiB until it closed), none with this one.  Put
#: throughput of one client was the same with 64 KiB, 256 KiB and 2 MiB
#: windows (24 MiB chunks, 1 MiB frames, loopback).
STREAM_WINDOW = 64 << 10
#: Largest message (data frame) accepted when a memory bound is set is
#: ``max(server.frame_bytes, BOUNDED_MIN_MESSAGE)`` plus this, for the framing.
MESSAGE_SLACK = 64 << 10
#: Floor of that largest message: the kvstore clients' default put frame, and
#: room for a Lookup of some 11,000 keys.
BOUNDED_MIN_MESSAGE = 1 << 20
#: Part of the bound kept free for what is not counted one by one (see above).
SAFETY_MARGIN = 16 << 20
#: Freed heap memory is handed back to the kernel at most this often.
TRIM_EVERY_S = 0.02


def bounded_message_bytes(frame_bytes: int) -> int:
    """Largest message a daemon with a memory bound accepts."""
    return max(frame_bytes, BOUNDED_MIN_MESSAGE) + MESSAGE_SLACK


def stream_allowance(frame_bytes: int) -> int:
    """Bytes charged for each open stream of a daemon with a memory bound."""
    return STREAM_WINDOW + 2 * bounded_message_bytes(frame_bytes)


def server_options(options: list[tuple[str, Any]], config: LimitsConfig, frame_bytes: int) -> list[tuple[str, Any]]:
    """The daemon's gRPC options; when ``config`` bounds memory, with the
    transport's receive window fixed at :data:`STREAM_WINDOW` (no BDP probing,
    which grows it) and messages capped at :func:`bounded_message_bytes`, so
    that what an open stream may hold in the transport is known."""
    if not config.max_memory_bytes:
        return options
    capped = {"grpc.http2.lookahead_bytes", "grpc.http2.bdp_probe", "grpc.max_receive_message_length"}
    kept = [(k, v) for k, v in options if k not in capped]
    return [
        *kept,
        ("grpc.http2.lookahead_bytes", STREAM_WINDOW),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.max_receive_message_length", bounded_message_bytes(frame_bytes)),
    ]


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class Limits:
    """Daemon-wide limit state; see the module docstring."""

    def __init__(
        self,
        config: LimitsConfig,
        store: TieredStore,
        *,
        max_concurrent_streams: int = 256,
        frame_bytes: int = 4 << 20,
        buffers: BufferPool | None = None,
        client_mapped: Callable[[], int] = lambda: 0,
    ) -> None:
        self.config = config
        #: Bytes of clients' shared-memory segments the daemon maps (not its memory).
        self._client_mapped = client_mapped
        self._max_streams = max_concurrent_streams
        self._slots = asyncio.Semaphore(max_concurrent_streams)
        self._per_client: Counter[str] = Counter()
        #: Receive buffers of puts (pooled; idle ones are handed back under pressure).
        self.buffers = buffers if buffers is not None else BufferPool()
        #: Charged for each open stream when memory is bounded (see the module docstring).
        self.stream_allowance = stream_allowance(frame_bytes)
        self._inflight = 0  # bytes of receive buffers in use
        self._growth = 0  # what those buffers may still make resident
        self._unseen = 0  # what they made resident since resident memory was last read
        self._rss = 0
        self._rss_at = -1.0
        self._trimmed_at = -1.0
        #: Refusals by reason, for tests and operators.
        self.refused: Counter[str] = Counter()
        #: Tenant quotas (tenant_quotas.py); their refusals count in ``refused`` too.
        self.quotas = TenantQuotas(config, store, self.refused)

    # -- streams ---------------------------------------------------------------
    def stream_window(self, most: int) -> int:
        """The receive window of a Put stream on the HTTP/2 listener (what it holds
        received and not yet taken): ``most``, or with a memory bound what each Put
        stream is charged if that is less (:attr:`stream_allowance`)."""
        return min(most, self.stream_allowance) if self.config.max_memory_bytes else most

    @property
    def streams(self) -> int:
        """Streams open now."""
        return sum(self._per_client.values())

    async def stream(self, client: str, *, put: bool = False) -> _StreamSlot:
        """A slot for one stream of ``client`` (its connection); release it with ``with``.
        A Put stream is refused at once when its transport allowance would not fit
        under the memory bound (a Get stream is counted here; what it reads is
        charged by :meth:`hold_read`)."""
        cfg = self.config
        if put and cfg.max_memory_bytes:
            self._check_memory(self.stream_allowance, what="a new Put stream")
        if self._per_client[client] >= cfg.max_streams_per_client:
            self.refused["client_streams"] += 1
            raise CapacityError(
                f"this client has {self._per_client[client]} streams open already; at most "
                f"{cfg.max_streams_per_client} per client (server.limits.max_streams_per_client): "
                "wait for one to finish"
            )
        # Counted before waiting, so a client cannot queue more than its share.
        self._per_client[client] += 1
        try:
            if self._slots.locked():
                await asyncio.wait_for(self._slots.acquire(), cfg.stream_wait_s)
            else:  # free: taken at once, without wait_for's task (tens of microseconds)
                await self._slots.acquire()
        except TimeoutError:
            self._release_client(client)
            self.refused["streams"] += 1
            raise CapacityError(
                f"the daemon serves {self._max_streams} streams at once "
                f"(server.max_concurrent_streams) and none freed up in {cfg.stream_wait_s:g} s; retry later"
            ) from None
        except BaseException:
            self._release_client(client)
            raise
        return _StreamSlot(self, client)

    def _release_client(self, client: str) -> None:
        if self.config.max_memory_bytes:
            # What the stream's transport held may stay resident (freed to the heap, not
            # to the kernel): still charged until the next reading shows what is left.
            self._unseen += self.stream_allowance
        self._per_client[client] -= 1
        if self._per_client[client] <= 0:
            del self._per_client[client]

    def _release(self, client: str) -> None:
        self._slots.release()
        self._release_client(client)

    # -- memory ------------------------------------------------------------------
    @property
    def inflight(self) -> int:
        """Bytes of receive buffers in use by puts being received."""
        return self._inflight

    def resident(self, *, fresh: bool = False) -> int:
        """Resident memory, read at most every RSS_REFRESH_S unless ``fresh``."""
        now = time.monotonic()
        if fresh or now - self._rss_at > RSS_REFRESH_S:
            # Read on the event loop, where buffers are filled: every byte written
            # into them before this point is in the figure.
            self._rss, self._rss_at, self._unseen = resident_bytes(not_ours=self._client_mapped()), now, 0
        return self._rss

    def committed(self) -> int:
        """Resident memory plus what everything admitted may still add (module docstring)."""
        return (
            self.resident() + self._unseen + self._growth + self.streams * self.stream_allowance + SAFETY_MARGIN
        )

    def take_buffer(self, n: int) -> RecvBuffer:
        """A receive buffer for a put of ``n`` bytes, or CapacityError (RESOURCE_EXHAUSTED)
        when it would pass ``max_inflight_bytes`` or could take resident memory past
        ``max_memory_bytes``.  Give it back with :meth:`give_buffer` exactly once."""
        cfg = self.config
        size = self.buffers.size_class(n)
        if self._inflight + size > cfg.max_inflight_bytes:
            self.refused["inflight"] += 1
            raise CapacityError(
                f"the daemon is receiving {self._inflight} bytes already and may buffer at most "
                f"{cfg.max_inflight_bytes} (server.limits.max_inflight); retry later or use smaller chunks"
            )
        buf = self.buffers.take(n)
        if cfg.max_memory_bytes:
            try:
                self._check_memory(buf.growth, what=f"a put of {n} bytes")
            except CapacityError:
                self.buffers.give(buf)
                raise
        self._inflight += buf.size
        self._growth += buf.growth
        return buf

    def wrote(self, buf: RecvBuffer, end: int) -> None:
        """Bytes ``[0, end)`` of ``buf`` are written: what that made resident is
        charged as such until the next reading of resident memory, not twice."""
        used = buf.advance(end)
        self._growth -= used
        self._unseen += used
        if self.config.max_memory_bytes and time.monotonic() - self._rss_at > RSS_REFRESH_S:
            self._relieve()

    def give_buffer(self, buf: RecvBuffer, written: int) -> None:
        """Release a buffer from :meth:`take_buffer` after ``written`` bytes went into it."""
        self.wrote(buf, written)
        self._inflight -= buf.size
        self._growth -= buf.growth
        self.buffers.give(buf)

    def _relieve(self, growth: int = 0) -> bool:
        """Whether ``growth`` more bytes fit under the bound; when they do not, first
        hand idle buffers and freed heap memory back to the kernel and measure again.
        Also run while puts are being received (every RSS_REFRESH_S), since memory
        freed to the heap (gRPC's frames, allocator fragmentation) stays resident
        but is free for the taking."""
        bound = self.config.max_memory_bytes
        if self.committed() + growth <= bound:
            return True
        self.buffers.trim()
        now = time.monotonic()
        if now - self._trimmed_at > TRIM_EVERY_S:
            self._trimmed_at = now
            malloc_trim()
        self.resident(fresh=True)
        return self.committed() + growth <= bound

    def _check_memory(self, growth: int, *, what: str) -> None:
        """Refuse ``what`` unless ``growth`` more bytes fit under the bound with all else committed."""
        if self._relieve(growth):
            return
        bound, rss = self.config.max_memory_bytes, self._rss
        self.refused["memory"] += 1
        raise CapacityError(
            f"{what} could take the daemon past its memory bound "
            f"(server.limits.max_memory = {format_size(bound)}): {_mib(rss)} resident, "
            f"{_mib(self._growth)} more to come for puts being received, {self.streams} streams open "
            f"at {_mib(self.stream_allowance)} each, {_mib(SAFETY_MARGIN)} margin; "
            "retry later, or raise server.limits.max_memory"
        )

    def hold_read(self, n: int, *, what: str) -> _ReadHold:
        """Charge the copy of a chunk (``n`` bytes) that a get holds while serving
        it (read from disk, Redis, a peer, device memory), refusing it with
        CapacityError (RESOURCE_EXHAUSTED) when it could take resident memory past
        the bound; release the charge with ``with`` once the copy is dropped."""
        if self.config.max_memory_bytes and n:
            self._check_memory(n, what=what)
        self._growth += n
        return _ReadHold(self, n)


class _ReadHold:
    """A get's charge for the chunk copy it holds; released on exit exactly once."""

    __slots__ = ("_limits", "_n")

    def __init__(self, limits: Limits, n: int) -> None:
        self._limits, self._n = limits, n

    def __enter__(self) -> _ReadHold:
        return self

    def __exit__(self, *exc: object) -> None:
        n, self._n = self._n, 0
        if n:
            limits = self._limits
            limits._growth -= n  # noqa: SLF001 - the charge taken in hold_read
            # Freed to the heap, it may stay resident: charged until the next reading.
            limits._unseen += n  # noqa: SLF001


class _StreamSlot:
    """One open stream's slot; released on exit (of ``with``) exactly once."""

    __slots__ = ("_limits", "_client", "_open")

    def __init__(self, limits: Limits, client: str) -> None:
        self._limits, self._client, self._open = limits, client, True

    def __enter__(self) -> _StreamSlot:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._open:
            self._open = False
            self._limits._release(self._client)
