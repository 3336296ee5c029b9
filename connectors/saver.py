"""Background saves: encode gathered chunks and put them to the store.

The engine thread gathers a chunk's KV out of its paged buffers (a memory copy,
milliseconds) into a tensor the saver then owns, so the engine's blocks are free
as soon as the step ends; encoding (cachegen costs tens of milliseconds per
chunk) and the network round trip happen on this thread, off the inference path.

Memory is bounded: at most ``max_pending_bytes`` of gathered KV wait here.
When that is full the ``backlog`` policy applies: ``"block"`` makes the engine
wait (a disaggregation producer, whose saves must arrive), ``"drop"`` discards
the new save (a prefix cache: the chunk is simply a miss later).

Failed puts are counted and logged, never raised into the engine: a lost save
only costs a future recomputation.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from kvstore.chunk import Chunk
from kvstore.client.payload import Value
from kvstore.errors import InvalidArgument, KVStoreError
from kvstore.keys import ChunkKey

log = logging.getLogger(__name__)

PutMany = Callable[[Sequence[tuple[ChunkKey, Value]]], object]


@dataclass(slots=True)
class SaverStats:
    chunks_saved: int = 0
    bytes_saved: int = 0
    chunks_dropped: int = 0
    chunks_failed: int = 0


def encode_value(kv: torch.Tensor, codec: str, level: int | None) -> Value:
    """What to put for one canonical chunk: the tensor itself (raw), or an encoded :class:`Chunk`."""
    if codec == "raw":
        return kv
    from kvstore.codecs.chunk_io import encode_chunk

    payload, meta = encode_chunk(kv, codec, level)
    return Chunk(meta, memoryview(payload))


class Saver:
    """One thread that encodes and puts batches of chunks, in submission order."""

    def __init__(
        self,
        put_many: PutMany,
        *,
        codec: str = "raw",
        level: int | None = None,
        max_pending_bytes: int = 1 << 30,
        backlog: Literal["block", "drop"] = "drop",
    ) -> None:
        if backlog not in ("block", "drop"):
            raise InvalidArgument(f"backlog must be 'block' or 'drop', got {backlog!r}")
        self._put_many = put_many
        self._codec = codec
        self._level = level
        self._max = max_pending_bytes
        self._backlog = backlog
        self._pending = 0
        self._cond = threading.Condition()
        self._queue: queue.Queue[list[tuple[ChunkKey, torch.Tensor]] | None] = queue.Queue()
        self.stats = SaverStats()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kvstore-saver", daemon=True)
        self._thread.start()

    def submit(self, items: list[tuple[ChunkKey, torch.Tensor]]) -> bool:
        """Queue chunks (CPU tensors the saver now owns); False if dropped for backlog."""
        if not items:
            return True
        nbytes = sum(t.numel() * t.element_size() for _, t in items)
        with self._cond:
            if self._closed:
                raise InvalidArgument("the saver is closed")
            if self._pending + nbytes > self._max and self._pending > 0:
                if self._backlog == "drop":
                    self.stats.chunks_dropped += len(items)
                    return False
                while self._pending + nbytes > self._max and self._pending > 0:
                    self._cond.wait()
            self._pending += nbytes
        self._queue.put(items)
        return True

    def _run(self) -> None:
        while True:
            items = self._queue.get()
            if items is None:
                self._queue.task_done()
                return
            nbytes = sum(t.numel() * t.element_size() for _, t in items)
            try:
                values = [(key, encode_value(t, self._codec, self._level)) for key, t in items]
                self._put_many(values)
                self.stats.chunks_saved += len(items)
                self.stats.bytes_saved += nbytes
            except KVStoreError as exc:
                self.stats.chunks_failed += len(items)
                log.warning("kvstore: %d chunk(s) not saved: %s", len(items), exc)
            finally:
                with self._cond:
                    self._pending -= nbytes
                    self._cond.notify_all()
                self._queue.task_done()

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Wait until every queued save has been attempted; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout_s: float = 60.0) -> None:
        """Flush, then stop the thread."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self.flush(timeout_s)
        self._queue.put(None)
        self._thread.join(timeout_s)
