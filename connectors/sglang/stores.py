"""Where the SGLang backend keeps pages: a kvstore daemon, or an in-process store.

:class:`PageStore` is the small interface the backend needs; every method is
a coroutine run on the backend's private event loop (:class:`LoopThread`), so
SGLang's prefetch and backup threads can call the backend at the same time.

* :class:`DaemonPageStore` talks to ``kvstore serve`` through
  :class:`~kvstore.client.AsyncClient` (shared memory when the daemon is on
  this host).  Every call is bounded by ``timeout_s`` and guarded by a
  circuit breaker: after ``breaker_failures`` failed calls the store refuses
  at once (``RemoteUnavailable``) for ``breaker_reset_s``, so a dead daemon
  costs SGLang one timeout, not one per page.
* :class:`LocalPageStore` runs a :class:`~kvstore.store.TieredStore` in this
  process (no daemon; the pages die with the process unless a disk tier holds them).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any, TypeVar

import torch

from kvstore.chunk import Chunk, ChunkMeta
from kvstore.client.aio import AsyncClient
from kvstore.client.payload import dtype_name
from kvstore.errors import Closed, DeadlineExceeded, KVStoreError, RemoteUnavailable
from kvstore.keys import ChunkKey, Namespace
from kvstore.store import TieredStore
from kvstore.tiers.breaker import BreakerConfig, CircuitBreaker
from kvstore.tiers.memory import as_uint8_tensor, tensor_view

T = TypeVar("T")


class LoopThread:
    """An asyncio loop in a daemon thread; :meth:`run` submits a coroutine and waits."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.loop.is_closed():
            coro.close()
            raise Closed("the SGLang kvstore backend is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class PageStore(ABC):
    """What the backend asks of a store.  Errors are typed ``KVStoreError`` s."""

    @abstractmethod
    async def lookup(self, keys: Sequence[ChunkKey]) -> int:
        """How many leading ``keys`` are present."""

    @abstractmethod
    async def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Presence of each key."""

    @abstractmethod
    async def put(self, keys: Sequence[ChunkKey], values: Sequence[torch.Tensor]) -> None:
        """Store contiguous CPU tensors (dtype and shape travel with them)."""

    @abstractmethod
    async def get_into(self, keys: Sequence[ChunkKey], outs: Sequence[torch.Tensor]) -> list[bool]:
        """Copy each present chunk's bytes into ``outs[i]`` (contiguous CPU, exact size)."""

    @abstractmethod
    async def get(self, key: ChunkKey) -> torch.Tensor | None:
        """The stored tensor, or None."""

    @abstractmethod
    async def clear(self, namespace: Namespace) -> int:
        """Drop every chunk of ``namespace``; returns how many."""

    async def staging(self, nbytes: int) -> torch.Tensor | None:
        """A uint8 buffer that puts from and gets into cost no client copy, if any."""
        return None

    def release(self, buf: torch.Tensor) -> None:
        """Give back a buffer from :meth:`staging`."""

    @abstractmethod
    async def close(self) -> None: ...


class DaemonPageStore(PageStore):
    def __init__(
        self,
        address: str,
        *,
        token: str | None,
        timeout_s: float,
        retries: int,
        shm: bool | str,
        shm_bytes: int,
        breaker: BreakerConfig,
        durable: bool,
    ) -> None:
        self.address = address
        self._token = token
        self._timeout = timeout_s
        self._durable = durable
        self._client = AsyncClient(
            address,
            token=token,
            timeout_s=timeout_s,
            retries=retries,
            backoff_s=0.02,
            shm=shm,  # type: ignore[arg-type]  # validated by HiCacheOptions
            shm_bytes=shm_bytes,
        )
        self.breaker = CircuitBreaker(
            f"kvstore daemon {address}", breaker, failure_types=(RemoteUnavailable, DeadlineExceeded)
        )

        # Staging buffers in the shared segment are handed out only while the
        # segment is known good.  After a failure the daemon may have restarted
        # and forgotten the segment; the client then drops (unmaps) it while a
        # put or get that referenced it falls back to the stream, reading or
        # writing the caller's now unmapped buffer.  So after any failure, the
        # next transfers use private buffers until one succeeds (which also
        # re-registers the segment).
        self._segment_trusted = True

    @property
    def uses_shm(self) -> bool:
        return self._client.uses_shm

    @contextlib.asynccontextmanager
    async def _guard(self, what: str, *, transfer: bool = False) -> AsyncIterator[None]:
        try:
            async with self.breaker.guard(self._timeout, what):
                yield
        except KVStoreError:
            self._segment_trusted = False
            raise
        if transfer:
            self._segment_trusted = True

    async def lookup(self, keys: Sequence[ChunkKey]) -> int:
        async with self._guard("lookup"):
            return (await self._client.lookup(keys)).count

    async def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        async with self._guard("exists"):
            return await self._client.exists(keys)

    async def put(self, keys: Sequence[ChunkKey], values: Sequence[torch.Tensor]) -> None:
        async with self._guard("put", transfer=True):
            await self._client.put_many(list(zip(keys, values, strict=True)), durable=self._durable)

    async def get_into(self, keys: Sequence[ChunkKey], outs: Sequence[torch.Tensor]) -> list[bool]:
        async with self._guard("get", transfer=True):
            # One request per key, all in flight at once: with ``outs`` in the
            # shared segment the daemon writes each page straight into place.
            # return_exceptions: every request has finished before the caller
            # may reuse ``outs``.
            got = await asyncio.gather(
                *(self._client.get_into(k, o) for k, o in zip(keys, outs, strict=True)), return_exceptions=True
            )
            for g in got:
                if isinstance(g, RemoteUnavailable | DeadlineExceeded):
                    raise g
                if isinstance(g, BaseException) and not isinstance(g, KVStoreError):
                    raise g  # a bug, not a miss
        return [
            isinstance(g, ChunkMeta) and g.nbytes == o.numel() * o.element_size()
            for g, o in zip(got, outs, strict=True)
        ]

    async def get(self, key: ChunkKey) -> torch.Tensor | None:
        async with self._guard("get"):
            return await self._client.get_tensor(key)

    async def clear(self, namespace: Namespace) -> int:
        from kvstore.admin.client import AdminClient  # blocking client: run it off the loop

        def run() -> int:
            with AdminClient(self.address, token=self._token, timeout_s=self._timeout) as admin:
                return int(admin.clear(namespace=str(namespace), confirm=True).chunks)

        async with self._guard("clear"):
            return await asyncio.get_running_loop().run_in_executor(None, run)

    async def staging(self, nbytes: int) -> torch.Tensor | None:
        if not self._segment_trusted or self.breaker.refusing():
            return None
        try:
            return await self._client.buffer(nbytes)
        except Exception:  # noqa: BLE001 - a full or absent segment only means: no fast path
            return None

    def release(self, buf: torch.Tensor) -> None:
        self._client.free_buffer(buf)

    async def close(self) -> None:
        await self._client.close()


class LocalPageStore(PageStore):
    """A :class:`TieredStore` in this process, opened on the backend's loop."""

    def __init__(self, store: TieredStore) -> None:
        self.store = store

    @classmethod
    async def open(cls, store: TieredStore) -> LocalPageStore:
        await store.open()
        return cls(store)

    async def lookup(self, keys: Sequence[ChunkKey]) -> int:
        return (await self.store.lookup(keys)).count

    async def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return await self.store.exists_many(keys)

    async def put(self, keys: Sequence[ChunkKey], values: Sequence[torch.Tensor]) -> None:
        for key, value in zip(keys, values, strict=True):
            chunk = Chunk.from_bytes(
                tensor_view(value), dtype=dtype_name(value.dtype), shape=tuple(value.shape)
            )
            await self.store.put(key, chunk, verified=True)

    async def get_into(self, keys: Sequence[ChunkKey], outs: Sequence[torch.Tensor]) -> list[bool]:
        found: list[bool] = []
        for key, out in zip(keys, outs, strict=True):
            chunk = await self.store.get(key)
            if chunk is None:
                found.append(False)
                continue
            with chunk:
                ok = chunk.nbytes == out.numel() * out.element_size()
                if ok:
                    out.view(torch.uint8).reshape(-1).copy_(as_uint8_tensor(chunk.payload))
            found.append(ok)
        return found

    async def get(self, key: ChunkKey) -> torch.Tensor | None:
        from kvstore.client.payload import to_tensor

        chunk = await self.store.get(key)
        if chunk is None:
            return None
        with chunk:
            return to_tensor(chunk.meta, bytes(chunk.payload)).clone()

    async def clear(self, namespace: Namespace) -> int:
        chunks, _ = await self.store.clear(None, namespace)
        return chunks

    async def close(self) -> None:
        await self.store.close()
