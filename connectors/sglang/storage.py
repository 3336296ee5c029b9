"""KVStoreHiCacheStorage: kvstore as SGLang's HiCache L3 storage backend.

SGLang loads it with::

    --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvstore",
        "module_path": "kvstore.connectors.sglang", "class_name": "KVStoreHiCacheStorage",
        "interface_v1": 1, "address": "127.0.0.1:51061"}'

and builds it as ``cls(storage_config, {})`` through its backend factory, then
calls :meth:`register_mem_pool_host` with the host pool.  Which methods SGLang
calls, and from where (``sglang/srt/managers/cache_controller.py``):

* ``batch_exists(keys)``: the prefetch thread asks how many leading pages of a
  request are stored (one ``Lookup`` RPC per call);
* ``batch_get_v1(keys, host_indices)`` / ``batch_set_v1(...)`` with
  ``interface_v1: 1``: the prefetch thread loads pages straight into host-pool
  slots and the backup thread stores them from there;
* ``batch_get`` / ``batch_set`` / ``get`` / ``set`` / ``exists``: the generic
  path without ``interface_v1`` (flat pages in the host pool's own layout),
  and any caller storing arbitrary tensors;
* ``clear()`` on a cache flush, ``get_stats()`` with storage metrics on.

Keys: SGLang's page key becomes a kvstore :class:`~kvstore.keys.ChunkKey` in
the namespace ``tenant/model`` with a fingerprint of the page layout, shard
and stage (:mod:`.page_keys`).  Pages are stored in a canonical layout
(:mod:`.pages`), so engines with different host layouts share them.

Failures: a daemon that is down, slow or full turns into misses (``None``,
``False``, 0) and a logged warning, never an exception into SGLang's threads;
each call is bounded by ``timeout_s`` and a circuit breaker fails fast while
the daemon stays down.  Malformed arguments (a caller's bug) still raise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from kvstore.errors import InvalidArgument, KVStoreError
from kvstore.keys import ChunkKey
from kvstore.tiers.breaker import BreakerConfig

from .options import HiCacheOptions
from .page_keys import PageKeys
from .pages import PageGeometry, geometry_of
from .stats import HiCacheStats, StatsRecorder
from .stores import DaemonPageStore, LocalPageStore, LoopThread, PageStore

log = logging.getLogger(__name__)
T = TypeVar("T")
#: A failed get may leave a request still writing into its staging buffer on
#: the daemon side; such a buffer is handed back only after this long.
_QUARANTINE_S = 30.0


class KVStoreHiCacheStorage(HiCacheStorage):  # type: ignore[misc]  # SGLang is untyped
    """See the module docstring; options in :class:`HiCacheOptions` / docs/sglang.md."""

    def __init__(self, storage_config: HiCacheStorageConfig, extra: dict[str, Any] | None = None) -> None:
        if not isinstance(storage_config, HiCacheStorageConfig):
            raise InvalidArgument(
                f"storage_config must be a HiCacheStorageConfig, got {type(storage_config).__name__}"
            )
        self.options = HiCacheOptions.from_extra_config(storage_config.extra_config)
        self.storage_config = storage_config
        self.keys = PageKeys(storage_config, self.options.tenant, self.options.model)
        self.namespace = self.keys.namespace
        self.geometry: PageGeometry | None = None
        self._counts = StatsRecorder(bool(storage_config.enable_storage_metrics))
        self._scratch = threading.local()
        self._closed = False
        self._loop = LoopThread(f"kvstore-hicache-{self.keys.shard[0]}")
        try:
            self.store: PageStore = self._loop.run(self._open_store())
        except BaseException:
            self._loop.close()
            raise
        log.info(
            "kvstore HiCache backend: %s store, namespace %s, shard %d/%d%s",
            self.options.mode,
            self.namespace,
            *self.keys.shard,
            f", {self.keys.stage}" if self.keys.stage else "",
        )

    async def _open_store(self) -> PageStore:
        o = self.options
        if o.mode == "local":
            from kvstore.config import build, load
            from kvstore.server.daemon import build_store

            if o.local_config is None:
                cfg = build({"tiers": [{"name": "cpu", "kind": "cpu", "capacity": o.local_capacity, "on_evict": "drop"}]})
            else:
                cfg = load(o.local_config, environ={})
            return await LocalPageStore.open(build_store(cfg))
        return DaemonPageStore(
            o.address,
            token=o.token,
            timeout_s=o.timeout_s,
            retries=o.retries,
            shm=o.shm,
            shm_bytes=o.shm_bytes,
            breaker=BreakerConfig(failures=o.breaker_failures, reset_s=o.breaker_reset_s),
            durable=o.durable,
        )

    # -- registration ----------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """SGLang hands over its host pool: pages of its geometry become chunks."""
        geom = geometry_of(mem_pool_host, mla=bool(self.storage_config.is_mla_model))
        self.keys.register(geom, getattr(mem_pool_host, "storage_format_tag", None))
        self.geometry = geom
        super().register_mem_pool_host(mem_pool_host)

    # -- keys ------------------------------------------------------------------
    def page_keys(self, keys: Sequence[str]) -> list[ChunkKey]:
        """The kvstore keys of SGLang page keys (raw keys before a pool is registered)."""
        return self.keys.pages(keys)

    def _is_page(self, t: Any) -> bool:
        g = self.geometry
        return g is not None and isinstance(t, torch.Tensor) and t.dtype == g.dtype and t.numel() == g.numel

    # -- plumbing --------------------------------------------------------------
    def _call(self, coro: Coroutine[Any, Any, T], default: T, what: str) -> T:
        """Run on the loop; an expected failure (daemon down, full, ...) -> ``default``."""
        try:
            return self._loop.run(coro)
        except KVStoreError as exc:
            self._counts.add(errors=1)
            log.warning("kvstore HiCache %s failed (%s): %s", what, type(exc).__name__, exc)
            return default

    def _staging(self, nbytes: int) -> tuple[torch.Tensor, bool]:
        """A buffer for ``nbytes``: in the shared segment when there is one (True)."""
        buf = self._call(self.store.staging(nbytes), None, "staging")
        if buf is not None:
            return buf, True
        scratch: torch.Tensor | None = getattr(self._scratch, "buf", None)
        if scratch is None or scratch.numel() < nbytes:
            scratch = torch.empty(nbytes, dtype=torch.uint8)
            self._scratch.buf = scratch
        return scratch[:nbytes], False

    def _release(self, buf: torch.Tensor, shared: bool, *, failed: bool = False) -> None:
        if not shared:
            return
        loop = self._loop.loop
        if failed:
            loop.call_soon_threadsafe(loop.call_later, _QUARANTINE_S, self.store.release, buf)
        else:
            loop.call_soon_threadsafe(self.store.release, buf)

    def _pages_per_batch(self, geom: PageGeometry) -> int:
        return max(1, self.options.batch_bytes // geom.nbytes)

    # -- presence --------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return any(self._call(self.store.exists(self.keys.both(key)), [False], "exists"))

    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        """Length of the leading run of ``keys`` that are stored (one Lookup RPC)."""
        if not keys:
            return 0
        self._counts.add(lookups=1)
        return self._call(self.store.lookup(self.page_keys(keys)), 0, "batch_exists")

    # -- zero-copy v1: straight between host-pool slots and the store ------------
    def _slots(self, keys: Sequence[str], host_indices: torch.Tensor) -> tuple[PageGeometry, list[int]]:
        geom = self.geometry
        if geom is None:
            raise InvalidArgument("batch_get_v1/batch_set_v1 need a host pool: call register_mem_pool_host first")
        if not isinstance(host_indices, torch.Tensor) or host_indices.numel() != len(keys) * geom.page_size:
            n = host_indices.numel() if isinstance(host_indices, torch.Tensor) else host_indices
            raise InvalidArgument(
                f"host_indices must hold page_size={geom.page_size} slots per key: "
                f"{len(keys)} keys need {len(keys) * geom.page_size}, got {n}"
            )
        return geom, host_indices.reshape(-1)[:: geom.page_size].tolist()

    def _page_view(self, geom: PageGeometry, slot: int) -> torch.Tensor:
        return geom.canonical_view(self.mem_pool_host.get_data_page(slot, flat=False))

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        """Load pages into the host-pool slots ``host_indices`` (page_size per key).

        Stops at the first missing page (SGLang uses only the leading run)."""
        geom, slots = self._slots(keys, host_indices)
        return self._get_pages(
            geom, self.page_keys(keys), lambda i, page: self._page_view(geom, slots[i]).copy_(page),
            leading=True, what="batch_get_v1",
        )

    def _get_pages(
        self, geom: PageGeometry, ckeys: list[ChunkKey], place: Callable[[int, torch.Tensor], Any], *,
        leading: bool, what: str,
    ) -> list[bool]:
        """Load pages in batches through a staging buffer, ``place(i, page)``
        taking page ``i`` (canonical form) where it goes; per key, whether it
        was found.  With ``leading`` it stops at the first page missing."""
        out = [False] * len(ckeys)
        step = self._pages_per_batch(geom)
        nb = geom.nbytes
        for start in range(0, len(ckeys), step):
            n = min(step, len(ckeys) - start)
            t0 = time.perf_counter()
            buf, shared = self._staging(n * nb)
            pages = _pages(buf, geom, n)
            found = self._call(self.store.get_into(ckeys[start : start + n], pages), None, what)
            if found is None:
                self._release(buf, shared, failed=True)
                break
            hits = 0
            for j in range(n):
                if found[j]:
                    place(start + j, pages[j])
                    out[start + j] = True
                    hits += 1
                elif leading:
                    break
            self._release(buf, shared)
            self._counts.transfer(True, hits, hits * nb, time.perf_counter() - t0)
            if leading and hits < n:
                self._counts.add(missed=len(ckeys) - start - hits)
                break
        return out

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        """Store the pages in host-pool slots ``host_indices``; per-key success."""
        geom, slots = self._slots(keys, host_indices)
        ckeys = self.page_keys(keys)
        return self._put_pages(geom, ckeys, lambda i, dst: dst.copy_(self._page_view(geom, slots[i])))

    def _put_pages(
        self, geom: PageGeometry, ckeys: list[ChunkKey], fill: Callable[[int, torch.Tensor], Any]
    ) -> list[bool]:
        """Store pages ``fill(i, dst)`` writes in canonical form, skipping stored ones."""
        out = [False] * len(ckeys)
        todo = list(range(len(ckeys)))
        if self.options.skip_existing and ckeys:
            present = self._call(self.store.exists(ckeys), None, "exists")
            if present is None:
                return out
            todo = [i for i, p in enumerate(present) if not p]
            for i, p in enumerate(present):
                out[i] = p
            self._counts.add(skipped=len(ckeys) - len(todo))
        step = self._pages_per_batch(geom)
        nb = geom.nbytes
        for start in range(0, len(todo), step):
            group = todo[start : start + step]
            t0 = time.perf_counter()
            buf, shared = self._staging(len(group) * nb)
            pages = _pages(buf, geom, len(group))
            for j, i in enumerate(group):
                fill(i, pages[j])
            # put() returns None; a failure returns the default, False.
            ok = self._call(self.store.put([ckeys[i] for i in group], pages), False, "batch_set") is None
            self._release(buf, shared)
            if not ok:
                break
            for i in group:
                out[i] = True
            self._counts.transfer(False, len(group), len(group) * nb, time.perf_counter() - t0)
        return out

    # -- generic path: tensors in, tensors out ------------------------------------
    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(
        self, keys: list[str], values: Any = None, target_locations: Any = None, target_sizes: Any = None
    ) -> bool:
        """Store tensors; flat host-pool pages go in canonical form, others as they are."""
        if values is None:
            values = target_locations
        if not isinstance(values, list | tuple) or len(values) != len(keys):
            raise InvalidArgument(f"batch_set needs one tensor per key: {len(keys)} keys, values={type(values).__name__}")
        for v in values:
            if not isinstance(v, torch.Tensor):
                raise InvalidArgument(f"HiCache values must be torch.Tensors, got {type(v).__name__}")
        geom = self.geometry
        page_idx = [i for i, v in enumerate(values) if self._is_page(v)]
        ok = True
        if page_idx and geom is not None:
            ckeys = self.keys.pages([keys[i] for i in page_idx])
            done = self._put_pages(
                geom, ckeys, lambda j, dst: dst.copy_(geom.flat_to_canonical(values[page_idx[j]]))
            )
            ok = all(done)
        pages = set(page_idx)
        raw = [i for i in range(len(keys)) if i not in pages]
        if raw and ok:
            ckeys = [self.keys.raw(keys[i]) for i in raw]
            tensors = [values[i].detach().to("cpu").contiguous() for i in raw]
            t0 = time.perf_counter()
            ok = self._call(self.store.put(ckeys, tensors), False, "batch_set") is None
            if ok:
                n = sum(t.numel() * t.element_size() for t in tensors)
                self._counts.transfer(False, len(raw), n, time.perf_counter() - t0)
        return ok

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        return self.batch_get([key], [target_location] if target_location is not None else None)[0]

    def batch_get(
        self, keys: list[str], target_locations: Any = None, target_sizes: Any = None
    ) -> list[torch.Tensor | None]:
        """Tensors (or None) per key; with ``target_locations`` they are filled and returned."""
        if target_locations is not None and (
            not isinstance(target_locations, list | tuple) or len(target_locations) != len(keys)
        ):
            raise InvalidArgument("batch_get needs one target location per key (or none)")
        targets: list[Any] = list(target_locations) if target_locations is not None else [None] * len(keys)
        out: list[torch.Tensor | None] = [None] * len(keys)
        geom = self.geometry
        page_idx = [i for i, t in enumerate(targets) if self._is_page(t)]
        if page_idx and geom is not None:
            ckeys = self.keys.pages([keys[i] for i in page_idx])

            def place(j: int, page: torch.Tensor) -> None:
                i = page_idx[j]
                geom.flat_to_canonical(targets[i]).copy_(page)
                out[i] = targets[i]

            self._get_pages(geom, ckeys, place, leading=False, what="batch_get")
        is_page = set(page_idx)
        for i in range(len(keys)):
            if i in is_page:
                continue
            t0 = time.perf_counter()
            got = self._call(self.store.get(self.keys.raw(keys[i])), None, "get")
            if got is None:
                continue
            target = targets[i]
            if isinstance(target, torch.Tensor):
                if target.numel() * target.element_size() != got.numel() * got.element_size():
                    log.warning("kvstore HiCache get %s: stored %d bytes, target has room for %d",
                                keys[i], got.numel() * got.element_size(), target.numel() * target.element_size())
                    continue
                target.view(torch.uint8).reshape(-1).copy_(got.reshape(-1).view(torch.uint8))
                got = target
            out[i] = got
            self._counts.transfer(True, 1, got.numel() * got.element_size(), time.perf_counter() - t0)
        self._counts.add(missed=sum(1 for o in out if o is None))
        return out

    # -- housekeeping -------------------------------------------------------------
    def clear(self) -> bool:
        """Drop every chunk of this backend's namespace (all ranks' pages)."""
        return self._call(self.store.clear(self.namespace), None, "clear") is not None

    def get_stats(self) -> Any:
        """SGLang's ``StorageMetrics`` since the last call (None if metrics are off)."""
        if not self.storage_config.enable_storage_metrics:
            return None
        try:
            from sglang.srt.observability.metrics_collector import StorageMetrics
        except ImportError as exc:  # the full SGLang install is missing pieces
            log.warning("kvstore HiCache get_stats: cannot import SGLang's StorageMetrics: %s", exc)
            return None
        prefetch_pgs, backup_pgs, prefetch_bandwidth, backup_bandwidth = self._counts.take_batches()
        return StorageMetrics(
            prefetch_pgs=prefetch_pgs, backup_pgs=backup_pgs,
            prefetch_bandwidth=prefetch_bandwidth, backup_bandwidth=backup_bandwidth,
        )

    @property
    def stats(self) -> HiCacheStats:
        """Counters since start (see :class:`~.stats.HiCacheStats`)."""
        return self._counts.stats

    @property
    def uses_shm(self) -> bool:
        return isinstance(self.store, DaemonPageStore) and self.store.uses_shm

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.run(self.store.close())
        finally:
            self._loop.close()

    def __enter__(self) -> KVStoreHiCacheStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pages(buf: torch.Tensor, geom: PageGeometry, n: int) -> list[torch.Tensor]:
    """``n`` pages of ``geom`` (canonical shape) side by side in ``buf``."""
    nb = geom.nbytes
    return [buf[j * nb : (j + 1) * nb].view(geom.dtype).view(geom.shape) for j in range(n)]
