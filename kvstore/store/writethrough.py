"""Write-through: queueing a put's copies for the lower tiers, and the workers that write them.

A put enqueues one job per lower tier whose settings say ``write_through`` (a bounded queue:
``on_full`` says whether a full one blocks the put or drops the job); each tier's workers
read the chunk from a tier above and admit it.  The workers are started and stopped with
the store (:mod:`kvstore.store.core`)."""

from __future__ import annotations

import asyncio
import logging

from kvstore.chunk import Chunk
from kvstore.errors import KVStoreError, RemoteUnavailable
from kvstore.keys import ChunkKey
from kvstore.store.admission import Admission
from kvstore.store.slots import Job, Slot

log = logging.getLogger("kvstore.store")


class WriteThrough(Admission):
    """Write-through to the lower tiers; see the module docstring."""

    async def flush(self) -> None:
        """Wait until every queued write-through has been written."""
        for slot in self._slots:
            if slot.queue is not None:
                await slot.queue.join()

    def _enqueue_write_through(self, slot: Slot, key: ChunkKey, durable: bool) -> list[asyncio.Future[None]]:
        futures: list[asyncio.Future[None]] = []
        for lower in self._slots[slot.index + 1 :]:
            if lower.queue is None:
                continue
            done: asyncio.Future[None] | None = asyncio.get_running_loop().create_future() if durable else None
            job = Job(key, done)
            if lower.queue.full() and lower.settings.on_full == "drop" and not durable:
                lower.counters.write_through_dropped += 1
                continue
            try:
                lower.queue.put_nowait(job)
            except asyncio.QueueFull:
                futures.append(asyncio.ensure_future(lower.queue.put(job)))
            if done is not None:
                futures.append(done)
        return futures

    async def _write_through_worker(self, slot: Slot) -> None:
        assert slot.queue is not None
        while True:
            job = await slot.queue.get()
            try:
                await self._write_through_one(slot, job.key)
                if job.done is not None and not job.done.done():
                    job.done.set_result(None)
            except RemoteUnavailable as exc:
                # A remote tier that is down or refusing (circuit open): the
                # write is dropped and counted; the tier logs each state change
                # of its breaker, so no log line per dropped write here.
                slot.counters.write_through_dropped += 1
                log.debug("write-through of %s to %s dropped: %s", job.key, slot.tier.name, exc)
                if job.done is not None and not job.done.done():
                    job.done.set_exception(exc)
            except KVStoreError as exc:
                slot.counters.write_through_failed += 1
                log.warning("write-through of %s to %s failed: %s", job.key, slot.tier.name, exc)
                if job.done is not None and not job.done.done():
                    job.done.set_exception(exc)
            finally:
                slot.queue.task_done()

    async def _write_through_one(self, slot: Slot, key: ChunkKey) -> None:
        async with self._keys.hold(key):
            chunk = await self._get_above(slot.index, key)
            if chunk is None:
                return  # deleted or evicted meanwhile: nothing to write
            with chunk:
                if slot.holds(key, chunk.meta.checksum):
                    return
                if await self._admit(slot, key, chunk, strict=False) is not None:
                    slot.counters.write_through += 1

    async def _get_above(self, index: int, key: ChunkKey) -> Chunk | None:
        for slot in self._slots[:index]:
            if key in slot.sizes:
                chunk = await slot.tier.get(key)
                if chunk is not None:
                    return chunk
        return None
