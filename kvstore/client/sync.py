"""Client: the blocking client, a thin shell over :class:`AsyncClient`.

It runs one private event loop in a daemon thread and submits each call to
it, so both clients share one implementation of the protocol (retries,
deadlines, shared memory, validation).  Safe to use from several threads.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import torch

from kvstore.chunk import ChunkMeta
from kvstore.client.aio import AsyncClient, Fetched, KeyLike, LookupResult
from kvstore.client.payload import Value
from kvstore.errors import Closed

T = TypeVar("T")


class Client:
    """Blocking client of the kvstore daemon; same arguments as :class:`AsyncClient`."""

    def __init__(self, address: str = "127.0.0.1:51061", **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvstore-client", daemon=True)
        self._thread.start()
        self._aio: AsyncClient = self._run(self._make(address, kwargs))
        self._closed = False

    @staticmethod
    async def _make(address: str, kwargs: dict[str, Any]) -> AsyncClient:
        return AsyncClient(address, **kwargs)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()
            raise Closed("the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
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

    def put(self, key: KeyLike, value: Value, *, durable: bool = False) -> str:
        return self._run(self._aio.put(key, value, durable=durable))

    def put_many(self, items: Sequence[tuple[KeyLike, Value]], *, durable: bool = False) -> list[str]:
        return self._run(self._aio.put_many(items, durable=durable))

    def get(self, key: KeyLike) -> Fetched | None:
        return self._run(self._aio.get(key))

    def get_bytes(self, key: KeyLike) -> bytes | None:
        return self._run(self._aio.get_bytes(key))

    def get_tensor(self, key: KeyLike, device: str | torch.device = "cpu") -> torch.Tensor | None:
        return self._run(self._aio.get_tensor(key, device))

    def get_many(self, keys: Iterable[KeyLike]) -> list[Fetched | None]:
        return self._run(self._aio.get_many(list(keys)))

    def get_into(self, key: KeyLike, out: torch.Tensor) -> ChunkMeta | None:
        return self._run(self._aio.get_into(key, out))

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
