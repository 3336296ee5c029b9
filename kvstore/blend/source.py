"""Where segment KV is kept: the kvstore daemon (through a client) or an in-process TieredStore.

:class:`KVSource` is the small interface CacheBlend needs:

* :meth:`KVSource.exists` is called once per prompt, from the caller's thread, to find which
  segments are stored (every layer key of a segment must be present);
* :meth:`KVSource.get_into` is called from the background loader thread, once per segment and
  layer, while the caller's thread computes the previous layer;
* :meth:`KVSource.put_many` stores the KV of new segments (caller's thread).

Chunks hold one layer of one segment, ``[1, 2, tokens, kv_heads, head_dim]`` in the model's
dtype (the canonical ``LKTHD`` layout with L = 1), under the keys of
:meth:`kvstore.keys.KeyBuilder.segment_layer_keys`.
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from kvstore.chunk import Chunk, ChunkMeta
from kvstore.client.payload import dtype_name, to_payload, to_tensor
from kvstore.errors import CorruptChunk, InvalidArgument
from kvstore.keys import ChunkKey

if TYPE_CHECKING:
    from kvstore.client import Client
    from kvstore.store import TieredStore

T = TypeVar("T")


class KVSource(ABC):
    """Segment KV storage as CacheBlend sees it."""

    @abstractmethod
    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Presence of each key (one round trip)."""

    @abstractmethod
    def get_into(self, key: ChunkKey, out: torch.Tensor) -> bool:
        """Copy the chunk named ``key`` into ``out`` (a contiguous CPU tensor of the chunk's
        shape and dtype); False when the key is missing.  Called from the loader thread."""

    @abstractmethod
    def put_many(self, items: Sequence[tuple[ChunkKey, torch.Tensor]]) -> None:
        """Store tensors under their keys."""

    def close(self) -> None:
        """Release what the source holds; the default holds nothing of its own."""


def _check(key: ChunkKey, meta: ChunkMeta, out: torch.Tensor) -> None:
    if meta.dtype != dtype_name(out.dtype) or tuple(meta.shape) != tuple(out.shape):
        raise CorruptChunk(
            f"chunk {key} holds {meta.dtype}{list(meta.shape)}, CacheBlend expected "
            f"{dtype_name(out.dtype)}{list(out.shape)}: the layout fingerprint does not describe it"
        )


class ClientSource(KVSource):
    """A kvstore daemon reached through a (blocking, thread-safe) :class:`kvstore.client.Client`.

    The client is the caller's: :meth:`close` does not close it.
    """

    def __init__(self, client: Client) -> None:
        self.client = client

    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return self.client.exists(keys) if keys else []

    def get_into(self, key: ChunkKey, out: torch.Tensor) -> bool:
        meta = self.client.get_into(key, out)
        if meta is None:
            return False
        if meta.codec != "raw":  # a tier codec encoded it: the bytes in ``out`` are not the tensor
            got = self.client.get(key)
            if got is None:
                return False
            meta = got.meta
            _check(key, meta, out)
            out.copy_(got.tensor())
            return True
        _check(key, meta, out)
        return True

    def put_many(self, items: Sequence[tuple[ChunkKey, torch.Tensor]]) -> None:
        if items:
            self.client.put_many(list(items))


class StoreSource(KVSource):
    """An in-process :class:`kvstore.store.TieredStore` running on ``loop`` in another thread.

    The store is asyncio code bound to its loop; every call is handed to that loop, so none
    may come from the loop's own thread (that would deadlock: it is refused).
    """

    def __init__(self, store: TieredStore, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, store: TieredStore) -> StoreSource:
        """Open ``store`` on a new event loop in a thread of its own; :meth:`close` closes both."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="kvstore-blend-store", daemon=True)
        thread.start()
        src = cls(store, loop)
        src._thread = thread
        try:
            src._run(store.open())
        except BaseException:
            src.close()
            raise
        return src

    def close(self) -> None:
        """Close the store and stop its loop, if :meth:`start` made them; otherwise nothing."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            self._run(self.store.close())  # a no-op when the store is not open
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            thread.join()
            self.loop.close()

    def __enter__(self) -> StoreSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.loop.is_closed():
            coro.close()
            raise InvalidArgument("the TieredStore's event loop is closed")
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            coro.close()
            raise InvalidArgument(
                "StoreSource was called from the store's own event loop thread; run the store's loop in "
                "another thread (CacheBlend blocks while it loads)"
            )
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return self._run(self.store.exists_many(keys)) if keys else []

    def get_into(self, key: ChunkKey, out: torch.Tensor) -> bool:
        async def read() -> bool:
            chunk = await self.store.get(key)
            if chunk is None:
                return False
            with chunk:
                _check(key, chunk.meta, out)
                out.copy_(to_tensor(chunk.meta, chunk.payload).view(out.shape))
            return True

        return self._run(read())

    def put_many(self, items: Sequence[tuple[ChunkKey, torch.Tensor]]) -> None:
        async def write() -> None:
            for key, value in items:
                meta, view = to_payload(value)
                await self.store.put(key, Chunk(meta, view))

        self._run(write())
