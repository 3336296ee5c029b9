"""Client: the blocking client, a thin shell over :class:`AsyncClient`.

It runs one private event loop in a daemon thread and submits each call to
it, so both clients share one implementation of the protocol (retries,
deadlines, shared memory, validation).  Safe to use from several threads.

Two shortcuts go straight from the calling thread to the daemon over a
blocking socket, skipping the hop to the event loop's thread (0.1-0.3 ms a
call on a loaded machine):

* ``put`` of a CPU tensor or bytes written by this process straight into
  the daemon's CPU tier memory, which the daemon maps writable into clients on
  its host when it has no token file (direct writes,
  kvstore/client/arena_writes.py): one copy and one request, over the
  daemon's control channel (``BlockingControlChannel``).
  ``direct_writes=False`` turns it off;
* ``put`` of a tensor that lives in the shared-memory segment
  (:meth:`Client.buffer`) and ``get_into`` such a tensor, over the same
  channel;
* every get and put over the byte stream (no shared memory: ``shm=False``, or
  a daemon on another host), over the client's own HTTP/2 connection
  (:mod:`kvstore.client.h2calls`; the :class:`AsyncClient`'s, which uses it
  from a worker thread): the same gRPC calls, a get's payload read from the
  socket straight into the result (one copy instead of five).
  ``http2_get=False`` and ``http2_put=False`` turn them off.

* gets of chunks in the daemon's CPU tier, read by this process straight
  from the tier's memory, which the daemon shares read-only with clients on
  its host when it has no token file (kvstore/tiers/shared_arena.py): no
  request at all, one copy.  The client tells the daemon what it read (no
  reply awaited) every ``TELL_EVERY_S`` seconds or ``TELL_BATCH`` reads
  (kvstore/client/shm.py), at its next read, so eviction order and metrics count them.
  ``direct_reads=False`` turns it off.

Anything else, or a shortcut that is busy (another thread's call), broken or
absent, takes the ordinary path.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import torch

from kvstore.chunk import ChunkMeta
from kvstore.client.aio import AsyncClient, LookupResult
from kvstore.client.arena_writes import filled, not_written
from kvstore.client import h2calls
from kvstore.client.h2channel import H2GetChannel
from kvstore.client.payload import Fetched, KeyLike, Value, key_text, to_payload
from kvstore.client.blocking_channel import BlockingControlChannel
from kvstore.client.shm import ClientSegment, get_item, put_item
from kvstore.errors import Closed, InvalidArgument, KVStoreError, NotFound, error_for_status
from kvstore.server.messages import meta_from_pb
from kvstore.tiers.memory import tensor_view
from kvstore.server.shm_channel import KIND_GET, KIND_PUT
from kvstore.v1 import kvstore_pb2 as pb

T = TypeVar("T")


class Client:
    """Blocking client of the kvstore daemon; same arguments as :class:`AsyncClient`, and
    ``http2_get`` (default True): gets over the byte stream use the client's own
    HTTP/2 connection, ``direct_reads`` (default True): with shared memory,
    chunks in the daemon's CPU tier are read from its memory, and
    ``direct_writes`` (default True): puts are written into it (see the module
    docstring)."""

    def __init__(
        self, address: str = "127.0.0.1:51061", *, http2_get: bool = True, http2_put: bool = True,
        direct_reads: bool = True, direct_writes: bool = True, **kwargs: Any,
    ) -> None:
        flags = (("http2_get", http2_get), ("http2_put", http2_put), ("direct_reads", direct_reads),
                 ("direct_writes", direct_writes))
        for name, flag in flags:
            if not isinstance(flag, bool):
                raise InvalidArgument(f"{name} must be True or False, got {flag!r}")
        self._http2_get = http2_get
        self._http2_put = http2_put
        self._direct_reads = direct_reads
        self._direct_writes = direct_writes
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvstore-client", daemon=True)
        self._thread.start()
        self._aio: AsyncClient = self._run(self._make(address, kwargs))
        self._closed = False
        self._blocking: BlockingControlChannel | None = None
        self._blocking_refused = 0  # segment id whose channel could not be opened here
        self._blocking_lock = threading.Lock()
        #: The HTTP/2 shortcut, the AsyncClient's connection used from the calling thread;
        #: None: turned off, or a target it cannot parse (dns:///, unix:, ...).
        self._h2: H2GetChannel | None = self._aio.h2

    async def _make(self, address: str, kwargs: dict[str, Any]) -> AsyncClient:
        # This client reads and writes the shared arena itself (over its own blocking channel).
        return AsyncClient(
            address, **kwargs, direct_reads=False, direct_writes=False, http2_get=self._http2_get,
            http2_put=self._http2_put,
        )

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()
            raise Closed("the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._blocking_lock:
            if self._blocking is not None:
                self._blocking.close()
        self._run(self._aio.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def uses_shm(self) -> bool:
        return self._aio.uses_shm

    @property
    def direct_reads(self) -> int:
        """Gets served from the daemon's shared arena (no request) by the current control channel."""
        ch = self._blocking
        return 0 if ch is None or ch.arena is None else ch.arena.reads

    @property
    def http2_get_port(self) -> int | None:
        """The daemon port the HTTP/2 connection for gets uses: its gRPC port, or its own
        Get listener once the daemon named it (kvstore/server/h2get.py); None when off."""
        return None if self._h2 is None else self._h2.port

    @property
    def http2_gets(self) -> int:
        """Gets served over the HTTP/2 connection (it is the AsyncClient's: its counts)."""
        return self._aio.http2_gets

    @property
    def http2_puts(self) -> int:
        """Put calls (``put`` or ``put_many``) made over the HTTP/2 connection to the daemon's listener."""
        return self._aio.http2_puts

    def put(self, key: KeyLike, value: Value, *, durable: bool = False) -> str:
        tier = self._arena_put(key, value, durable)
        if tier is not None:
            return tier
        if isinstance(value, torch.Tensor):
            tier = self._direct_put(key, value, durable)
            if tier is not None:
                return tier
        tiers = self._h2_put([(key, value)], durable)
        if tiers is not None:
            return tiers[0]
        return self._run(self._aio.put(key, value, durable=durable))

    def put_many(self, items: Sequence[tuple[KeyLike, Value]], *, durable: bool = False) -> list[str]:
        """As :meth:`AsyncClient.put_many`; direct writes from the calling thread."""
        out = self._arena_put_many(items, durable)
        if out is None:
            tiers = self._h2_put(items, durable) if items else None
            return tiers if tiers is not None else self._run(self._aio.put_many(items, durable=durable))
        rest = not_written(out)
        tiers = self._run(self._aio.put_many([items[i] for i in rest], durable=durable)) if rest else []
        return filled(out, rest, tiers)

    def _h2_put(self, items: Sequence[tuple[KeyLike, Value]], durable: bool) -> list[str] | None:
        """The tiers, or None: use the ordinary path (shared memory in use or not tried
        yet, no listener, the connection busy or failing: grpcio then retries and reports)."""
        if self._h2 is None or not self._http2_put or self._closed or not self._aio.stream_only:
            return None
        prepared = [(key_text(k), *to_payload(v)) for k, v in items]
        return self._h2.put(prepared, durable=durable, metadata=self._aio.metadata, timeout_s=self._aio.timeout_s)

    def get(self, key: KeyLike) -> Fetched | None:
        return self.get_many([key])[0]

    def get_bytes(self, key: KeyLike) -> bytes | None:
        got = self.get(key)
        return None if got is None else bytes(got.data)

    def get_tensor(self, key: KeyLike, device: str | torch.device = "cpu") -> torch.Tensor | None:
        got = self.get(key)
        return None if got is None else got.tensor(device)

    def get_many(self, keys: Iterable[KeyLike]) -> list[Fetched | None]:
        keys = list(keys)
        texts = [key_text(k) for k in keys]
        out: list[Fetched | None] = [None] * len(texts)
        rest = list(range(len(texts)))
        if texts and self._direct_reads:
            rest = []
            for i, text in enumerate(texts):
                read = self._shared_read(text, None)
                if read is None:
                    rest.append(i)
                else:
                    out[i] = Fetched(read[0], tensor_view(read[1]))
            if not rest:
                return out
        texts_left = [texts[i] for i in rest]
        got = self._h2_get(texts_left, None) if texts_left else None
        if got is None:
            got = self._run(self._aio.get_many([keys[i] for i in rest]))
        for i, one in zip(rest, got, strict=True):
            out[i] = one
        return out

    def get_into(self, key: KeyLike, out: torch.Tensor) -> ChunkMeta | None:
        text = key_text(key)
        host = out.device.type == "cpu" and out.is_contiguous()
        if self._direct_reads and host:
            read = self._shared_read(text, out)
            if read is not None:
                return read[0]
        done, meta = self._direct_get_into(text, out)
        if done:
            return meta
        if host:
            got = self._h2_get([text], out)
            if got is not None:
                return None if got[0] is None else got[0].meta
        return self._run(self._aio.get_into(key, out))

    # -- gets over the client's own HTTP/2 connection (see the module docstring) -------------
    def _h2_get(self, texts: list[str], into: torch.Tensor | None) -> list[Fetched | None] | None:
        """The chunks, or None: use the ordinary path (shared memory in use or not tried yet,
        the connection busy or failing: grpcio then retries and reports)."""
        if self._h2 is None or not self._http2_get or self._closed or not self._aio.stream_only:
            return None
        return h2calls.get(
            self._h2, texts, into, frame_bytes=self._aio.frame_bytes, metadata=self._aio.metadata,
            timeout_s=self._aio.timeout_s,
        )

    def direct_reads_ready(self) -> bool:
        """Map the daemon's shared arena now, if it offers one, and every page of
        it into this process (0.15-0.25 s per 4 GiB here), so that no later get
        pays a page fault for a page it never read (100 us per MiB).  For a
        long-lived client, once at start; optional.  False when direct reads are
        not available."""
        if not self._direct_reads or self._aio.stream_only:
            return False
        direct = self._direct()
        arena = None if direct is None else direct[1].attach()
        if arena is None:
            return False
        arena.populate()
        return True

    # -- reads from the daemon's shared arena (see the module docstring) --------------
    def _shared_read(self, text: str, out: torch.Tensor | None) -> tuple[ChunkMeta, torch.Tensor] | None:
        direct = self._direct()
        return None if direct is None else direct[1].read_shared(text, out)

    # -- the direct path (see the module docstring) ----------------------------------
    def _direct(self) -> tuple[ClientSegment, BlockingControlChannel] | None:
        """The segment and this thread's way to the control channel; the first call
        registers the segment (as the ordinary path would), so that a new client's
        first put or get is direct too.  None: take the ordinary path."""
        local = self._aio._local  # noqa: SLF001 - one implementation of the segment's lifecycle
        if local.segment is None and not self._closed and not local.stream_only:
            self._run(local.ready())  # once: after a failed try the session is stream-only
        seg = local.segment
        if self._closed or seg is None or not seg.control_socket or seg.segment_id == self._blocking_refused:
            return None
        with self._blocking_lock:
            ch = self._blocking
            if ch is None or ch.broken or ch.segment_id != seg.segment_id:
                if ch is not None:
                    ch.close()
                try:
                    ch = BlockingControlChannel(
                        seg.control_socket, seg.segment_id, seg.nonce, self._aio.timeout_s, writes=self._direct_writes
                    )
                except (OSError, KVStoreError):
                    self._blocking, self._blocking_refused = None, seg.segment_id
                    return None
                self._blocking = ch
        return seg, ch

    def _direct_call(self, ch: BlockingControlChannel, kind: int, req: pb.ShmPutRequest | pb.ShmGetRequest) -> bytes | None:
        """The reply, or None: use the ordinary path (it re-registers a segment the daemon lost)."""
        try:
            return ch.try_call(kind, req.SerializeToString())
        except TimeoutError:
            raise error_for_status("DEADLINE_EXCEEDED", f"no reply within {self._aio.timeout_s} s") from None
        except (OSError, NotFound):
            return None

    def _arena_put(self, key: KeyLike, value: Value, durable: bool) -> str | None:
        """A direct write (see the module docstring), or None: take another path."""
        out = self._arena_put_many([(key, value)], durable)
        return None if out is None else out[0]

    def _arena_put_many(self, items: Sequence[tuple[KeyLike, Value]], durable: bool) -> list[str | None] | None:
        """Direct writes (see the module docstring): for each item, the tier it went
        to or None (put it another way); None: put them all another way."""
        if not self._direct_writes or not items:
            return None
        texts = [key_text(key) for key, _ in items]
        direct = self._direct()
        return None if direct is None else direct[1].try_put_many(texts, [value for _, value in items], durable)

    @property
    def direct_writes(self) -> int:
        """Puts this client wrote into the daemon's shared arena (over the current control channel)."""
        ch = self._blocking
        return 0 if ch is None else ch.direct_writes

    def _direct_put(self, key: KeyLike, value: torch.Tensor, durable: bool) -> str | None:
        direct = self._direct()
        if direct is None:
            return None
        seg, ch = direct
        off = seg.offset_of(value)
        if off is None:
            return None
        meta, _ = to_payload(value, with_checksum=False)
        req = pb.ShmPutRequest(items=[put_item(seg, key_text(key), meta, off)], durable=durable)
        body = self._direct_call(ch, KIND_PUT, req)
        return None if body is None else pb.PutReply.FromString(body).results[0].tier

    def _direct_get_into(self, text: str, out: torch.Tensor) -> tuple[bool, ChunkMeta | None]:
        direct = self._direct()
        if direct is None:
            return False, None
        seg, ch = direct
        off = seg.offset_of(out)
        if off is None:
            return False, None
        room = out.numel() * out.element_size()
        body = self._direct_call(ch, KIND_GET, pb.ShmGetRequest(items=[get_item(seg, text, off, room)]))
        if body is None:
            return False, None
        res = pb.ShmGetReply.FromString(body).results[0]
        if not res.found:
            return True, None
        meta = meta_from_pb(res.meta)
        if not res.written:
            raise InvalidArgument(f"output has room for {room} bytes, the chunk has {meta.nbytes}")
        return True, meta

    def buffer(self, nbytes: int) -> torch.Tensor | None:
        return self._run(self._aio.buffer(nbytes))

    def free_buffer(self, t: torch.Tensor) -> None:
        self._aio.free_buffer(t)

    def lookup(self, keys: Sequence[KeyLike]) -> LookupResult:
        return self._run(self._aio.lookup(keys))

    def exists(self, keys: Sequence[KeyLike]) -> list[bool]:
        return self._run(self._aio.exists(keys))

    def delete(self, keys: Sequence[KeyLike]) -> list[bool]:
        return self._run(self._aio.delete(keys))
