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

Keys: SGLang's page key (a 64-hex chained sha256 of the page's tokens) becomes
the digest of a kvstore :class:`~kvstore.keys.ChunkKey` in the namespace
``tenant/model``, with a layout fingerprint over dtype, layers, heads, head
dim, page size, the tensor-parallel shard (TP rank/size; for MLA, whose latent
is the same on every TP rank, the decode-context-parallel shard instead) and
pipeline / context-parallel stage.  Pages are stored in a canonical layout
(:mod:`.pages`), so engines with different host layouts share them.

Failures: a daemon that is down, slow or full turns into misses (``None``,
``False``, 0) and a logged warning, never an exception into SGLang's threads;
each call is bounded by ``timeout_s`` and a circuit breaker fails fast while
the daemon stays down.  Malformed arguments (a caller's bug) still raise.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from kvstore.client.payload import dtype_name
from kvstore.errors import InvalidArgument, KVStoreError
from kvstore.keys import ChunkKey, LayoutFingerprint, Namespace
from kvstore.tiers.breaker import BreakerConfig

from .options import HiCacheOptions
from .pages import PageGeometry, geometry_of
from .stores import DaemonPageStore, LocalPageStore, LoopThread, PageStore

log = logging.getLogger(__name__)
T = TypeVar("T")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MODEL_BAD = re.compile(r"[^A-Za-z0-9._/+-]+")
#: A failed get may leave a request still writing into its staging buffer on
#: the daemon side; such a buffer is handed back only after this long.
_QUARANTINE_S = 30.0


@dataclass
class HiCacheStats:
    """Counters since the backend started (pages, bytes, calls that failed)."""

    pages_read: int = 0
    pages_missed: int = 0
    pages_written: int = 0
    pages_skipped: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    lookups: int = 0
    errors: int = 0
    # Per batch since the last get_stats(): SGLang's StorageMetrics fields.
    prefetch_pgs: list[int] = field(default_factory=list)
    backup_pgs: list[int] = field(default_factory=list)
    prefetch_bandwidth: list[float] = field(default_factory=list)
    backup_bandwidth: list[float] = field(default_factory=list)


class KVStoreHiCacheStorage(HiCacheStorage):  # type: ignore[misc]  # SGLang is untyped
    """See the module docstring; options in :class:`HiCacheOptions` / docs/sglang.md."""

    def __init__(self, storage_config: HiCacheStorageConfig, extra: dict[str, Any] | None = None) -> None:
        if not isinstance(storage_config, HiCacheStorageConfig):
            raise InvalidArgument(
                f"storage_config must be a HiCacheStorageConfig, got {type(storage_config).__name__}"
            )
        self.options = HiCacheOptions.from_extra_config(storage_config.extra_config)
        self.storage_config = storage_config
        self.namespace = Namespace(self.options.tenant, _model_id(self.options.model or storage_config.model_name))
        c = storage_config
        if c.is_mla_model:
            # The latent is replicated across TP ranks: every rank shares one copy
            # (SGLang lets only the writer rank store it); DCP ranks hold slices.
            self._shard = (c.dcp_rank, c.dcp_size)
        else:
            self._shard = (c.tp_rank, c.tp_size)
        stage = []
        if c.pp_size > 1:
            stage.append(f"pp={c.pp_rank}/{c.pp_size}")
        if c.attn_cp_size > 1:
            stage.append(f"cp={c.attn_cp_rank}/{c.attn_cp_size}")
        self._stage = ";".join(stage)
        self._raw_fp = LayoutFingerprint(
            "uint8", 1, 1, 1, self._shard[0], self._shard[1], 1, self._layout_tag("sglang-raw")
        ).digest
        self.geometry: PageGeometry | None = None
        self._page_fp: str | None = None
        self.stats = HiCacheStats()
        self._stats_lock = threading.Lock()
        self._scratch = threading.local()
        self._closed = False
        self._loop = LoopThread(f"kvstore-hicache-{self._shard[0]}")
        try:
            self.store: PageStore = self._loop.run(self._open_store())
        except BaseException:
            self._loop.close()
            raise
        log.info(
            "kvstore HiCache backend: %s store, namespace %s, shard %d/%d%s",
            self.options.mode,
            self.namespace,
            *self._shard,
            f", {self._stage}" if self._stage else "",
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

    def _layout_tag(self, name: str) -> str:
        return f"{name};{self._stage}" if self._stage else name

    # -- registration ----------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """SGLang hands over its host pool: pages of its geometry become chunks."""
        geom = geometry_of(mem_pool_host, mla=bool(self.storage_config.is_mla_model))
        tag = getattr(mem_pool_host, "storage_format_tag", None)
        layout = self._layout_tag(geom.chunk_layout + (f";fmt={tag}" if tag else ""))
        self._page_fp = LayoutFingerprint(
            dtype_name(geom.dtype), geom.num_layers, geom.num_heads, geom.head_dim,
            self._shard[0], self._shard[1], geom.page_size, layout,
        ).digest
        self.geometry = geom
        super().register_mem_pool_host(mem_pool_host)

    # -- keys ------------------------------------------------------------------
    def _key(self, key: str, fp: str) -> ChunkKey:
        if not isinstance(key, str) or not key:
            raise InvalidArgument(f"a HiCache key must be a non-empty string, got {key!r}")
        digest = key if _HEX64.match(key) else hashlib.sha256(key.encode()).hexdigest()
        return ChunkKey(self.namespace, fp, "p" + digest)

    def page_keys(self, keys: Sequence[str]) -> list[ChunkKey]:
        """The kvstore keys of SGLang page keys (raw keys before a pool is registered)."""
        fp = self._page_fp or self._raw_fp
        return [self._key(k, fp) for k in keys]

    def _is_page(self, t: Any) -> bool:
        g = self.geometry
        return g is not None and isinstance(t, torch.Tensor) and t.dtype == g.dtype and t.numel() == g.numel

    # -- plumbing --------------------------------------------------------------
    def _call(self, coro: Coroutine[Any, Any, T], default: T, what: str) -> T:
        """Run on the loop; an expected failure (daemon down, full, ...) -> ``default``."""
        try:
            return self._loop.run(coro)
        except KVStoreError as exc:
            with self._stats_lock:
                self.stats.errors += 1
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

    def _record(self, read: bool, pages: int, nbytes: int, seconds: float) -> None:
        with self._stats_lock:
            s = self.stats
            if read:
                s.pages_read += pages
                s.bytes_read += nbytes
                if self.storage_config.enable_storage_metrics:
                    s.prefetch_pgs.append(pages)
                    s.prefetch_bandwidth.append(nbytes / max(seconds, 1e-9) / 1e9)
            else:
                s.pages_written += pages
                s.bytes_written += nbytes
                if self.storage_config.enable_storage_metrics:
                    s.backup_pgs.append(pages)
                    s.backup_bandwidth.append(nbytes / max(seconds, 1e-9) / 1e9)

    # -- presence --------------------------------------------------------------
    def exists(self, key: str) -> bool:
        keys = [self._key(key, self._raw_fp)]
        if self._page_fp is not None:
            keys.insert(0, self._key(key, self._page_fp))
        return any(self._call(self.store.exists(keys), [False], "exists"))

    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        """Length of the leading run of ``keys`` that are stored (one Lookup RPC)."""
        if not keys:
            return 0
        with self._stats_lock:
            self.stats.lookups += 1
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
        ckeys = self.page_keys(keys)
        out = [False] * len(keys)
        step = self._pages_per_batch(geom)
        nb = geom.nbytes
        for start in range(0, len(keys), step):
            n = min(step, len(keys) - start)
            t0 = time.perf_counter()
            buf, shared = self._staging(n * nb)
            pages = [buf[i * nb : (i + 1) * nb].view(geom.dtype).view(geom.shape) for i in range(n)]
            found = self._call(self.store.get_into(ckeys[start : start + n], pages), None, "batch_get_v1")
            if found is None:
                self._release(buf, shared, failed=True)
                break
            hits = 0
            for i in range(n):
                if not found[i]:
                    break
                self._page_view(geom, slots[start + i]).copy_(pages[i])
                out[start + i] = True
                hits += 1
            self._release(buf, shared)
            self._record(True, hits, hits * nb, time.perf_counter() - t0)
            if hits < n:
                with self._stats_lock:
                    self.stats.pages_missed += len(keys) - start - hits
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
            with self._stats_lock:
                self.stats.pages_skipped += len(ckeys) - len(todo)
        step = self._pages_per_batch(geom)
        nb = geom.nbytes
        for start in range(0, len(todo), step):
            group = todo[start : start + step]
            t0 = time.perf_counter()
            buf, shared = self._staging(len(group) * nb)
            pages = [buf[j * nb : (j + 1) * nb].view(geom.dtype).view(geom.shape) for j in range(len(group))]
            for j, i in enumerate(group):
                fill(i, pages[j])
            # put() returns None; a failure returns the default, False.
            ok = self._call(self.store.put([ckeys[i] for i in group], pages), False, "batch_set") is None
            self._release(buf, shared)
            if not ok:
                break
            for i in group:
                out[i] = True
            self._record(False, len(group), len(group) * nb, time.perf_counter() - t0)
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
            assert self._page_fp is not None
            ckeys = [self._key(keys[i], self._page_fp) for i in page_idx]
            done = self._put_pages(
                geom, ckeys, lambda j, dst: dst.copy_(geom.flat_to_canonical(values[page_idx[j]]))
            )
            ok = all(done)
        pages = set(page_idx)
        raw = [i for i in range(len(keys)) if i not in pages]
        if raw and ok:
            ckeys = [self._key(keys[i], self._raw_fp) for i in raw]
            tensors = [values[i].detach().to("cpu").contiguous() for i in raw]
            t0 = time.perf_counter()
            ok = self._call(self.store.put(ckeys, tensors), False, "batch_set") is None
            if ok:
                n = sum(t.numel() * t.element_size() for t in tensors)
                self._record(False, len(raw), n, time.perf_counter() - t0)
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
            assert self._page_fp is not None
            ckeys = [self._key(keys[i], self._page_fp) for i in page_idx]
            step = self._pages_per_batch(geom)
            nb = geom.nbytes
            for start in range(0, len(page_idx), step):
                group = page_idx[start : start + step]
                t0 = time.perf_counter()
                buf, shared = self._staging(len(group) * nb)
                pages = [buf[j * nb : (j + 1) * nb].view(geom.dtype).view(geom.shape) for j in range(len(group))]
                found = self._call(self.store.get_into(ckeys[start : start + len(group)], pages), None, "batch_get")
                if found is None:
                    self._release(buf, shared, failed=True)
                    break
                hits = 0
                for j, i in enumerate(group):
                    if found[j]:
                        geom.flat_to_canonical(targets[i]).copy_(pages[j])
                        out[i] = targets[i]
                        hits += 1
                self._release(buf, shared)
                self._record(True, hits, hits * nb, time.perf_counter() - t0)
        is_page = set(page_idx)
        for i in range(len(keys)):
            if i in is_page:
                continue
            t0 = time.perf_counter()
            got = self._call(self.store.get(self._key(keys[i], self._raw_fp)), None, "get")
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
            self._record(True, 1, got.numel() * got.element_size(), time.perf_counter() - t0)
        with self._stats_lock:
            self.stats.pages_missed += sum(1 for o in out if o is None)
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
        with self._stats_lock:
            s = self.stats
            m = StorageMetrics(
                prefetch_pgs=s.prefetch_pgs, backup_pgs=s.backup_pgs,
                prefetch_bandwidth=s.prefetch_bandwidth, backup_bandwidth=s.backup_bandwidth,
            )
            s.prefetch_pgs, s.backup_pgs, s.prefetch_bandwidth, s.backup_bandwidth = [], [], [], []
        return m

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


def _model_id(name: str | None) -> str:
    """SGLang's model name (a path or hub id) as a valid namespace model."""
    text = _MODEL_BAD.sub("-", name or "").strip("/")
    text = re.sub(r"/{2,}", "/", text).lstrip("._+-/")
    return text[:256] or "unnamed"
