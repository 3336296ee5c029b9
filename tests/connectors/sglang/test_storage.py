"""KVStoreHiCacheStorage against the real SGLang classes and a real daemon.

Every backend here is built by SGLang's own ``StorageBackendFactory`` with the
``dynamic`` option, as ``--hicache-storage-backend dynamic`` does.  Most tests
run three ways (``make_backend``): over shared memory, over the gRPC stream,
and with the in-process store.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

from kvstore.connectors.sglang import KVStoreHiCacheStorage
from kvstore.errors import ConfigError, InvalidArgument
from tests.connectors.sglang.conftest import Factory, build, storage_config
from tests.connectors.sglang.host_pool import HostPoolTwin
from tests.support.daemon import DaemonProcess

MHA_LAYOUTS = ["layer_first", "page_first", "page_first_direct", "page_head"]
MLA_LAYOUTS = ["layer_first", "page_first", "page_first_direct"]


def keys(n: int, salt: str = "") -> list[str]:
    """SGLang-style page keys: a chain of 64-hex sha256 digests."""
    out, prev = [], b""
    for i in range(n):
        prev = hashlib.sha256(prev + f"{salt}{i}".encode()).digest()
        out.append(prev.hex())
    return out


def slots(page_ids: list[int], page_size: int) -> torch.Tensor:
    """host_indices as SGLang passes them: every token slot of each page."""
    return torch.cat([torch.arange(p * page_size, (p + 1) * page_size) for p in page_ids])


def mha_pool(layout: str, pages: int = 8, heads: int = 2, head_dim: int = 32) -> HostPoolTwin:
    return HostPoolTwin(mla=False, layout=layout, layers=4, page_size=16, pages=pages, heads=heads, head_dim=head_dim)


def mla_pool(layout: str, pages: int = 8) -> HostPoolTwin:
    return HostPoolTwin(mla=True, layout=layout, layers=4, page_size=16, pages=pages, head_dim=96)


# -- construction ---------------------------------------------------------------


def test_factory_builds_the_real_subclass(kv_daemon: DaemonProcess, tenant: str) -> None:
    b = build({"address": kv_daemon.address, "tenant": tenant})
    try:
        assert isinstance(b, HiCacheStorage) and type(b) is KVStoreHiCacheStorage
        assert str(b.namespace) == f"{tenant}/HuggingFaceTB/SmolLM2-135M"
        assert b.uses_shm is False  # the segment is registered on first use
        b.set("k", torch.ones(3))
        assert b.uses_shm is True
    finally:
        b.close()


def test_factory_reports_bad_options() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        StorageBackendFactory.create_backend("dynamic", storage_config({"adress": "x:1"}), None)


def test_model_name_is_made_a_valid_namespace(kv_daemon: DaemonProcess) -> None:
    with build({"address": kv_daemon.address}, model="/models/Llama 3 (8B)//instruct/") as b:
        assert b.namespace.model == "models/Llama-3-8B-/instruct"
    with build({"address": kv_daemon.address}, model=None) as b:
        assert b.namespace.model == "unnamed"


# -- generic methods, no host pool: arbitrary tensors ------------------------------


def test_round_trip_of_every_generic_method(make_backend: Factory) -> None:
    b = make_backend()
    a = torch.randn(3, 5).to(torch.bfloat16)
    c = torch.arange(7, dtype=torch.int32)
    assert b.set("a", a) is True
    assert b.exists("a") and not b.exists("b")
    got = b.get("a")
    assert got is not None and got.dtype == torch.bfloat16 and torch.equal(got, a)
    # into a target location: filled and returned
    target = torch.zeros(3, 5, dtype=torch.bfloat16)
    assert b.get("a", target) is target and torch.equal(target, a)
    assert b.get("missing") is None
    assert b.batch_set(["b", "c"], [a * 2, c]) is True
    out = b.batch_get(["c", "nope", "b"])
    assert out[1] is None and torch.equal(out[0], c) and torch.equal(out[2], a * 2)  # type: ignore[arg-type]
    # a target of the wrong size is a miss, not a corrupted buffer
    small = torch.zeros(2, dtype=torch.bfloat16)
    assert b.batch_get(["a"], [small]) == [None] and not small.any()


def test_batch_exists_counts_the_leading_run(make_backend: Factory) -> None:
    b = make_backend()
    k = keys(6)
    for i in (0, 1, 2, 4):
        b.set(k[i], torch.full((4,), float(i)))
    assert b.batch_exists(k) == 3  # k[3] is missing: k[4] does not count
    assert b.batch_exists(k[:2]) == 2
    assert b.batch_exists(k[3:]) == 0
    assert b.batch_exists([]) == 0


def test_caller_bugs_still_raise(make_backend: Factory) -> None:
    b = make_backend()
    with pytest.raises(InvalidArgument, match="one tensor per key"):
        b.batch_set(["a", "b"], [torch.ones(1)])
    with pytest.raises(InvalidArgument, match="torch.Tensors"):
        b.set("a", [1, 2, 3])
    with pytest.raises(InvalidArgument, match="non-empty string"):
        b.exists("")


# -- the zero-copy v1 path against a host pool ------------------------------------


@pytest.mark.parametrize("layout", MHA_LAYOUTS)
def test_v1_round_trip_mha(make_backend: Factory, layout: str) -> None:
    src = mha_pool(layout)
    b = make_backend(src)
    k = keys(3, layout)
    refs = [src.fill_page(p * 16, seed=p) for p in (5, 1, 6)]
    assert b.batch_set_v1(k, slots([5, 1, 6], 16)) == [True, True, True]
    assert b.batch_exists(k) == 3
    # load into other slots of a fresh pool of the same layout
    dst = mha_pool(layout)
    b.register_mem_pool_host(dst)
    assert b.batch_get_v1(k, slots([0, 7, 3], 16)) == [True, True, True]
    for ref, p in zip(refs, (0, 7, 3)):
        assert torch.equal(dst.read_page(p * 16), ref)
    # untouched slots stay untouched
    assert not dst.read_page(2 * 16).any()


@pytest.mark.parametrize("layout", MLA_LAYOUTS)
def test_v1_round_trip_mla(make_backend: Factory, layout: str) -> None:
    src = mla_pool(layout)
    b = make_backend(src, mla=True)
    assert b.geometry is not None and b.geometry.chunk_layout == "LTHD"
    k = keys(2, "mla" + layout)
    refs = [src.fill_page(p * 16, seed=10 + p) for p in (2, 4)]
    assert b.batch_set_v1(k, slots([2, 4], 16)) == [True, True]
    dst = mla_pool(layout)
    b.register_mem_pool_host(dst)
    assert b.batch_get_v1(k, slots([4, 0], 16)) == [True, True]
    assert torch.equal(dst.read_page(4 * 16), refs[0]) and torch.equal(dst.read_page(0), refs[1])


def test_v1_get_stops_at_the_first_missing_page(make_backend: Factory) -> None:
    pool = mha_pool("page_first")
    b = make_backend(pool)
    k = keys(4, "gap")
    pool.fill_page(0, 1), pool.fill_page(16, 2), pool.fill_page(48, 4)
    assert b.batch_set_v1([k[0], k[1], k[3]], slots([0, 1, 3], 16)) == [True] * 3
    dst = mha_pool("page_first")
    b.register_mem_pool_host(dst)
    assert b.batch_get_v1(k, slots([4, 5, 6, 7], 16)) == [True, True, False, False]
    assert not dst.read_page(7 * 16).any()  # k[3] exists but lies past the gap: not loaded
    assert b.stats.pages_missed >= 2


def test_v1_set_skips_pages_already_stored(make_backend: Factory) -> None:
    pool = mha_pool("layer_first")
    b = make_backend(pool)
    k = keys(3, "skip")
    pool.fill_page(0, 1)
    assert b.batch_set_v1(k[:1], slots([0], 16)) == [True]
    written = b.stats.pages_written
    assert b.batch_set_v1(k, slots([0, 1, 2], 16)) == [True] * 3
    assert b.stats.pages_skipped == 1 and b.stats.pages_written == written + 2


def test_v1_in_several_requests(make_backend: Factory) -> None:
    """batch_bytes smaller than the batch: pages go in several staged groups."""
    pool = mha_pool("page_first", pages=12, heads=8, head_dim=128)
    page = 4 * 2 * 16 * 8 * 128 * 2
    b = make_backend(pool, {"batch_bytes": 1 << 20})
    assert b.options.batch_bytes // page < 12  # more than one group
    k = keys(12, "groups")
    refs = [pool.fill_page(p * 16, seed=p) for p in range(12)]
    assert all(b.batch_set_v1(k, slots(list(range(12)), 16)))
    dst = mha_pool("page_first", pages=12, heads=8, head_dim=128)
    b.register_mem_pool_host(dst)
    order = list(reversed(range(12)))
    assert all(b.batch_get_v1(k, slots(order, 16)))
    for ref, p in zip(refs, order):
        assert torch.equal(dst.read_page(p * 16), ref)


def test_v1_rejects_mismatched_indices(make_backend: Factory) -> None:
    b = make_backend(mha_pool("page_first"))
    with pytest.raises(InvalidArgument, match="page_size=16 slots per key"):
        b.batch_get_v1(keys(2), torch.arange(16))


def test_v1_needs_a_registered_pool(make_backend: Factory) -> None:
    b = make_backend()
    with pytest.raises(InvalidArgument, match="register_mem_pool_host"):
        b.batch_set_v1(keys(1), torch.arange(16))


# -- generic path with a pool: flat pages in the pool's own layout ------------------


def test_generic_page_path_interoperates_with_v1(make_backend: Factory) -> None:
    """SGLang without interface_v1 moves flat pages (get_data_page / dummy page /
    set_from_flat_data_page); they are stored canonically, so v1 reads them."""
    pool = mha_pool("page_first")
    b = make_backend(pool)
    k = keys(2, "generic")
    refs = [pool.fill_page(p * 16, seed=p) for p in (3, 4)]
    # what CacheController._generic_page_set does
    assert b.batch_set(k, [pool.get_data_page(p * 16) for p in (3, 4)]) is True
    # what _generic_page_get does
    dummies = [pool.get_dummy_flat_data_page() for _ in k]
    got = b.batch_get(k, dummies)
    assert got[0] is dummies[0] and got[1] is dummies[1]
    pool.set_from_flat_data_page(0, got[0])  # type: ignore[arg-type]
    assert torch.equal(pool.read_page(0), refs[0])
    # and the zero-copy path sees the same pages
    dst = mha_pool("layer_first")
    b.register_mem_pool_host(dst)
    assert b.batch_get_v1(k, slots([6, 2], 16)) == [True, True]
    assert torch.equal(dst.read_page(6 * 16), refs[0]) and torch.equal(dst.read_page(32), refs[1])


# -- sharing and isolation between engines (one daemon) -----------------------------


def test_pages_are_shared_across_host_layouts(kv_daemon: DaemonProcess, tenant: str) -> None:
    extra = {"address": kv_daemon.address, "tenant": tenant}
    a_pool, b_pool = mha_pool("page_first"), mha_pool("page_head")
    with build(extra, a_pool) as a, build(extra, b_pool) as b:
        k = keys(2, "share")
        refs = [a_pool.fill_page(p * 16, seed=p) for p in (0, 1)]
        assert all(a.batch_set_v1(k, slots([0, 1], 16)))
        assert b.batch_exists(k) == 2
        assert all(b.batch_get_v1(k, slots([5, 2], 16)))
        assert torch.equal(b_pool.read_page(80), refs[0]) and torch.equal(b_pool.read_page(32), refs[1])


def test_tp_ranks_are_isolated(kv_daemon: DaemonProcess, tenant: str) -> None:
    extra = {"address": kv_daemon.address, "tenant": tenant}
    p0, p1 = mha_pool("page_first"), mha_pool("page_first")
    with build(extra, p0, tp_rank=0, tp_size=2) as r0, build(extra, p1, tp_rank=1, tp_size=2) as r1:
        k = keys(2, "tp")
        ref0 = p0.fill_page(0, seed=1)
        p0.fill_page(16, seed=2)
        ref1 = p1.fill_page(0, seed=3)
        assert all(r0.batch_set_v1(k, slots([0, 1], 16)))
        assert r1.batch_exists(k) == 0  # rank 1 never sees rank 0's head shard
        assert r1.batch_set_v1(k[:1], slots([0], 16)) == [True]
        assert r0.batch_get_v1(k[:1], slots([7], 16)) == [True] and torch.equal(p0.read_page(7 * 16), ref0)
        assert r1.batch_get_v1(k[:1], slots([7], 16)) == [True] and torch.equal(p1.read_page(7 * 16), ref1)
    # another TP size is another layout too
    with build(extra, mha_pool("page_first"), tp_rank=0, tp_size=1) as solo:
        assert solo.batch_exists(k) == 0


def test_pipeline_stages_are_isolated(kv_daemon: DaemonProcess, tenant: str) -> None:
    extra = {"address": kv_daemon.address, "tenant": tenant}
    s0, s1 = mha_pool("layer_first"), mha_pool("layer_first")
    with build(extra, s0, pp=(0, 2)) as a, build(extra, s1, pp=(1, 2)) as b:
        s0.fill_page(0, 1)
        k = keys(1, "pp")
        assert a.batch_set_v1(k, slots([0], 16)) == [True]
        assert a.batch_exists(k) == 1 and b.batch_exists(k) == 0


def test_mla_latent_is_shared_by_tp_ranks(kv_daemon: DaemonProcess, tenant: str) -> None:
    extra = {"address": kv_daemon.address, "tenant": tenant}
    p0, p1 = mla_pool("page_first"), mla_pool("layer_first")
    with build(extra, p0, tp_rank=0, tp_size=2, mla=True) as r0, \
            build(extra, p1, tp_rank=1, tp_size=2, mla=True) as r1:
        k = keys(1, "mla-tp")
        ref = p0.fill_page(32, seed=5)
        assert r0.batch_set_v1(k, slots([2], 16)) == [True]  # SGLang lets only the writer rank store
        assert r1.batch_exists(k) == 1
        assert r1.batch_get_v1(k, slots([1], 16)) == [True] and torch.equal(p1.read_page(16), ref)


def test_different_models_do_not_meet(kv_daemon: DaemonProcess, tenant: str) -> None:
    extra = {"address": kv_daemon.address, "tenant": tenant}
    with build(extra, model="m1") as a, build(extra, model="m2") as b:
        a.set("k", torch.ones(2))
        assert a.exists("k") and not b.exists("k")


# -- housekeeping ------------------------------------------------------------------


def test_clear_drops_the_namespace(make_backend: Factory) -> None:
    pool = mha_pool("page_first")
    b = make_backend(pool)
    k = keys(2, "clear")
    pool.fill_page(0, 1), pool.fill_page(16, 2)
    assert all(b.batch_set_v1(k, slots([0, 1], 16)))
    b.set("raw", torch.ones(4))
    assert b.clear() is True
    assert b.batch_exists(k) == 0 and not b.exists("raw")


def test_stats(make_backend: Factory) -> None:
    pool = mha_pool("page_first")
    b = make_backend(pool, metrics=True)
    k = keys(2, "stats")
    assert all(b.batch_set_v1(k, slots([0, 1], 16)))
    assert all(b.batch_get_v1(k, slots([2, 3], 16)))
    page = b.geometry.nbytes  # type: ignore[union-attr]
    s = b.stats
    assert (s.pages_written, s.pages_read, s.bytes_read, s.errors) == (2, 2, 2 * page, 0)
    assert s.backup_pgs == [2] and s.prefetch_pgs == [2] and s.prefetch_bandwidth[0] > 0
    m = b.get_stats()  # SGLang's StorageMetrics where it imports, else None
    if m is not None:
        assert m.prefetch_pgs == [2] and b.stats.prefetch_pgs == []


def test_get_stats_is_none_without_storage_metrics(make_backend: Factory) -> None:
    assert make_backend().get_stats() is None
