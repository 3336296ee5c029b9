"""Every Admin RPC against a real daemon (cpu over a write-through disk tier, with tokens).

Each test fills a namespace of its own through the data API, steers it
through the Admin service and checks the result through both APIs.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import pytest
import torch

from kvstore.client import Client
from kvstore.codecs.chunk_io import decode_chunk
from kvstore.v1 import admin_pb2 as apb
from kvstore.v1 import admin_pb2_grpc as apb_grpc
from tests.admin.conftest import ADMIN_TOKEN, MiB, RW_TOKEN, bearer, blob, key
from tests.support.daemon import DaemonProcess


def call(admin: apb_grpc.AdminStub, method: str, request: Any, token: str | None = ADMIN_TOKEN) -> Any:
    return getattr(admin, method)(request, metadata=bearer(token) if token else None, timeout=60)


def sel(**kw: Any) -> apb.Selector:
    return apb.Selector(**kw)


def tier_stats(admin: apb_grpc.AdminStub, name: str) -> apb.TierStats:
    return next(t for t in call(admin, "Stats", apb.StatsRequest()).tiers if t.name == name)


def fill(client: Client, tenant: str, n: int, size: int = MiB) -> list[str]:
    keys = [key(i, tenant) for i in range(n)]
    for i, k in enumerate(keys):
        client.put(k, blob(i, size), durable=True)  # durable: the disk copy is there on return
    return keys


def listed(admin: apb_grpc.AdminStub, **selector: Any) -> dict[str, list[str]]:
    reply = call(admin, "ListChunks", apb.ListChunksRequest(selector=sel(**selector), page_size=10_000))
    return {c.key: list(c.tiers) for c in reply.chunks}


def test_stats_reports_tiers_namespaces_and_quotas(admin: apb_grpc.AdminStub, client: Client) -> None:
    fill(client, "stats", 3)
    assert client.get(key(0, "stats")) is not None
    assert client.get(key(99, "stats")) is None
    call(admin, "SetPolicy", apb.SetPolicyRequest(quotas=[apb.QuotaChange(namespace="stats/m", bytes=8 * MiB)]))
    r = call(admin, "Stats", apb.StatsRequest())
    assert [t.name for t in r.tiers] == ["cpu", "disk"]
    cpu = r.tiers[0]
    assert cpu.kind == "cpu" and cpu.eviction_policy == "lru" and cpu.healthy
    assert cpu.capacity_bytes == cpu.max_capacity_bytes == 32 * MiB
    ns = next(n for n in r.namespaces if n.namespace == "stats/m")
    # Three chunks in both tiers (write-through): per-tier usage, summed totals.
    assert {(u.tier, u.bytes, u.chunks) for u in ns.tiers} == {("cpu", 3 * MiB, 3), ("disk", 3 * MiB, 3)}
    assert (ns.bytes, ns.chunks, ns.quota_bytes) == (6 * MiB, 6, 8 * MiB)
    assert (ns.hits, ns.misses, ns.write_bytes, ns.read_bytes) == (1, 1, 3 * MiB, MiB)
    assert ns.read_bandwidth > 0 and ns.write_bandwidth > 0
    assert r.gets >= 2 and r.hits + r.misses == r.gets and 0 < r.hit_ratio < 1 and r.uptime_s > 0
    call(admin, "SetPolicy", apb.SetPolicyRequest(quotas=[apb.QuotaChange(namespace="stats/m", bytes=0)]))


def test_list_chunks_pages_and_filters(admin: apb_grpc.AdminStub, client: Client) -> None:
    a = fill(client, "lsa", 25, 4096)
    b = fill(client, "lsb", 5, 4096)
    # Pages of 10: every chunk exactly once, in order, then an empty token.
    seen: list[str] = []
    token = ""
    while True:
        page = call(admin, "ListChunks", apb.ListChunksRequest(selector=sel(namespace="lsa/m"), page_size=10,
                                                               page_token=token))
        assert page.total == 25 and len(page.chunks) <= 10
        seen += [c.key for c in page.chunks]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(a)
    chunk = call(admin, "ListChunks", apb.ListChunksRequest(selector=sel(keys=[b[0]]))).chunks[0]
    assert list(chunk.tiers) == ["cpu", "disk"] and chunk.nbytes == 4096 and chunk.pin_remaining_s == 0
    assert set(listed(admin, key_prefix=b[0][:-1])) == set(b)  # they differ in the last digit only
    assert set(listed(admin, key_prefix=b[3])) == {b[3]}
    assert set(listed(admin, namespace="lsb/m", tier="disk")) == set(b)
    with pytest.raises(grpc.RpcError) as err:
        call(admin, "ListChunks", apb.ListChunksRequest(selector=sel(tier="nvme")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cpu" in (err.value.details() or "")


def test_evict_by_key_prefix_namespace_and_tier(admin: apb_grpc.AdminStub, client: Client) -> None:
    keys = fill(client, "ev", 6, 64 << 10)
    # One key out of cpu: demoted (its disk copy, written through, stays).
    r = call(admin, "Evict", apb.EvictRequest(selector=sel(keys=[keys[0]], tier="cpu")))
    assert (r.chunks, r.bytes) == (1, 64 << 10)
    assert (r.freed[0].tier, r.freed[0].demoted_to) == ("cpu", "disk")
    assert listed(admin, keys=[keys[0]]) == {keys[0]: ["disk"]}
    assert client.get_bytes(keys[0]) == blob(0, 64 << 10)  # read from disk, promoted again
    # A key everywhere: gone from both tiers.
    r = call(admin, "Evict", apb.EvictRequest(selector=sel(keys=[keys[1]])))
    assert sorted(f.tier for f in r.freed) == ["cpu", "disk"] and r.bytes == 2 * (64 << 10)
    assert client.get(keys[1]) is None
    # By prefix, dropped from cpu without demotion (the disk copy stays anyway).
    r = call(admin, "Evict", apb.EvictRequest(selector=sel(key_prefix=keys[2], tier="cpu"), drop=True))
    assert [f.key for f in r.freed] == [keys[2]] and r.freed[0].demoted_to == ""
    # A whole namespace.
    r = call(admin, "Evict", apb.EvictRequest(selector=sel(namespace="ev/m")))
    assert r.chunks == 4 + 5  # keys 0, 3, 4, 5 in cpu; 0, 2, 3, 4, 5 on disk
    assert listed(admin, namespace="ev/m") == {}
    with pytest.raises(grpc.RpcError) as err:
        call(admin, "Evict", apb.EvictRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_evict_down_to_a_watermark(admin: apb_grpc.AdminStub, client: Client) -> None:
    call(admin, "Clear", apb.ClearRequest(tier="cpu", confirm=True))
    keys = fill(client, "wm", 20)
    for k in keys[:5]:
        client.get(k)  # the first five become the most recent (LRU)
    call(admin, "Pin", apb.PinRequest(selector=sel(keys=[keys[5]]), ttl_s=60))
    r = call(admin, "Evict", apb.EvictRequest(selector=sel(tier="cpu"), use_watermark=True,
                                              watermark_bytes=8 * MiB))
    assert r.watermark_reached and r.used_bytes <= 8 * MiB
    evicted = [f.key for f in r.freed]
    # LRU order: 6, 7, ... went first; the pinned key and the recently read ones stayed.
    assert evicted == keys[6 : 6 + len(evicted)] and len(evicted) == 12
    assert all(f.demoted_to == "disk" for f in r.freed) and r.bytes == 12 * MiB
    assert tier_stats(admin, "cpu").used_bytes <= 8 * MiB
    assert all(client.get_bytes(k) == blob(i, MiB) for i, k in enumerate(keys))  # nothing lost: on disk
    # A namespace's watermark; pinned chunks block it unless forced.
    call(admin, "Pin", apb.PinRequest(selector=sel(namespace="wm/m"), ttl_s=60))
    r = call(admin, "Evict", apb.EvictRequest(selector=sel(tier="cpu", namespace="wm/m"), use_watermark=True,
                                              watermark_bytes=0))
    assert not r.watermark_reached and r.chunks == 0
    r = call(admin, "Evict", apb.EvictRequest(selector=sel(tier="cpu", namespace="wm/m"), use_watermark=True,
                                              watermark_bytes=0, force=True))
    assert r.watermark_reached and listed(admin, namespace="wm/m", tier="cpu") == {}
    call(admin, "Unpin", apb.UnpinRequest(selector=sel(namespace="wm/m")))


def test_pin_leases_expire(admin: apb_grpc.AdminStub, client: Client) -> None:
    keys = fill(client, "pin", 3, 4096)
    r = call(admin, "Pin", apb.PinRequest(selector=sel(namespace="pin/m"), ttl_s=1.5))
    assert r.pinned == 3
    r = call(admin, "Pin", apb.PinRequest(selector=sel(keys=[key(99, "pin")]), ttl_s=1.5))
    assert (r.pinned, list(r.missing)) == (0, [key(99, "pin")])
    stats = call(admin, "Stats", apb.StatsRequest())
    assert next(n for n in stats.namespaces if n.namespace == "pin/m").pinned_chunks == 3
    assert next(t for t in stats.tiers if t.name == "cpu").pinned_chunks >= 3
    assert 0 < listed_pin(admin, keys[0]) <= 1.5
    # Pinned: not evicted.
    r = call(admin, "Evict", apb.EvictRequest(selector=sel(namespace="pin/m", tier="cpu")))
    assert (r.chunks, r.skipped_pinned) == (0, 3)
    # Unpin one; the other leases run out on their own.
    assert call(admin, "Unpin", apb.UnpinRequest(selector=sel(keys=[keys[0]]))).unpinned == 1
    time.sleep(1.6)
    stats = call(admin, "Stats", apb.StatsRequest())
    assert next(n for n in stats.namespaces if n.namespace == "pin/m").pinned_chunks == 0
    assert listed_pin(admin, keys[1]) == 0
    r = call(admin, "Evict", apb.EvictRequest(selector=sel(namespace="pin/m", tier="cpu")))
    assert (r.chunks, r.skipped_pinned) == (3, 0)
    with pytest.raises(grpc.RpcError) as err:
        call(admin, "Pin", apb.PinRequest(selector=sel(namespace="pin/m"), ttl_s=-1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def listed_pin(admin: apb_grpc.AdminStub, k: str) -> float:
    return float(call(admin, "ListChunks", apb.ListChunksRequest(selector=sel(keys=[k]))).chunks[0].pin_remaining_s)


def test_move_demotes_and_prefetches(admin: apb_grpc.AdminStub, client: Client) -> None:
    keys = fill(client, "mv", 4, 256 << 10)
    # Demote: out of cpu, into disk (already there: written through).
    r = call(admin, "Move", apb.MoveRequest(selector=sel(namespace="mv/m"), from_tier="cpu", to_tier="disk"))
    assert (r.moved, r.already_there) == (0, 4)
    assert set(listed(admin, namespace="mv/m", tier="cpu")) == set()
    # Prefetch: disk -> cpu; the disk copy stays.
    r = call(admin, "Move", apb.MoveRequest(selector=sel(keys=keys[:2]), to_tier="cpu"))
    assert (r.moved, r.bytes) == (2, 2 * (256 << 10))
    assert listed(admin, namespace="mv/m") == {keys[0]: ["cpu", "disk"], keys[1]: ["cpu", "disk"],
                                               keys[2]: ["disk"], keys[3]: ["disk"]}
    assert tier_stats(admin, "disk").promotions >= 2
    ns = next(n for n in call(admin, "Stats", apb.StatsRequest()).namespaces if n.namespace == "mv/m")
    assert (ns.demotions, ns.promotions) == (4, 2)
    r = call(admin, "Move", apb.MoveRequest(selector=sel(keys=[key(77, "mv")]), to_tier="cpu"))
    assert r.moved == 0 and len(r.failed) == 1
    assert [client.get_bytes(k) for k in keys] == [blob(i, 256 << 10) for i in range(4)]


def test_set_policy_capacity_and_quota_without_losing_data(admin: apb_grpc.AdminStub, client: Client) -> None:
    call(admin, "Clear", apb.ClearRequest(tier="cpu", confirm=True))
    keys = fill(client, "pol", 12)
    before = listed(admin, namespace="pol/m", tier="cpu")
    # A new policy: nothing moves.
    r = call(admin, "SetPolicy", apb.SetPolicyRequest(tier="cpu", eviction_policy="s3fifo"))
    assert r.tier.eviction_policy == "s3fifo" and r.evicted_chunks == 0
    assert listed(admin, namespace="pol/m", tier="cpu") == before
    # A lower capacity evicts (demotes) down to it; data stays readable from disk.
    r = call(admin, "SetPolicy", apb.SetPolicyRequest(tier="cpu", set_capacity=True, capacity_bytes=6 * MiB))
    assert r.tier.capacity_bytes == 6 * MiB and r.tier.used_bytes <= 6 * MiB and r.evicted_chunks >= 6
    assert all(client.get_bytes(k) == blob(i, MiB) for i, k in enumerate(keys))
    assert tier_stats(admin, "cpu").used_bytes <= 6 * MiB  # promotions respect the new capacity
    with pytest.raises(grpc.RpcError) as err:
        call(admin, "SetPolicy", apb.SetPolicyRequest(tier="cpu", set_capacity=True, capacity_bytes=1 << 40))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        call(admin, "SetPolicy", apb.SetPolicyRequest(tier="cpu", eviction_policy="fifo-ish"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "lru" in (err.value.details() or "")
    # A quota lowered below usage evicts the namespace down to it, in every tier.
    r = call(admin, "SetPolicy", apb.SetPolicyRequest(quotas=[apb.QuotaChange(namespace="pol/m", bytes=3 * MiB)]))
    assert r.quotas["pol/m"] == 3 * MiB
    ns = next(n for n in call(admin, "Stats", apb.StatsRequest()).namespaces if n.namespace == "pol/m")
    assert all(u.bytes <= 3 * MiB for u in ns.tiers)
    # Back to the defaults.
    r = call(admin, "SetPolicy", apb.SetPolicyRequest(
        tier="cpu", eviction_policy="lru", set_capacity=True, capacity_bytes=0,
        quotas=[apb.QuotaChange(namespace="pol/m", bytes=0)]))
    assert r.tier.capacity_bytes == 32 * MiB and "pol/m" not in r.quotas


def test_policy_change_under_load(admin: apb_grpc.AdminStub, auth_daemon: DaemonProcess) -> None:
    """Readers and writers run while the policy and capacity change under them:
    no request fails, and every chunk that fits stays readable and intact."""
    call(admin, "Clear", apb.ClearRequest(tier="cpu", confirm=True))
    hot = [key(i, "load") for i in range(8)]
    errors: list[BaseException] = []
    stop = threading.Event()
    with Client(auth_daemon.address, token=ADMIN_TOKEN, shm=False) as c:
        for i, k in enumerate(hot):
            c.put(k, blob(i, 512 << 10), durable=True)

        def reader() -> None:
            try:
                while not stop.is_set():
                    for i, k in enumerate(hot):
                        assert c.get_bytes(k) == blob(i, 512 << 10), k
            except BaseException as exc:  # reported below
                errors.append(exc)

        def writer() -> None:
            try:
                n = 0
                while not stop.is_set():  # 40 keys rewritten with new values: bounded on disk
                    c.put(key(n % 40, "churn"), blob(n, 256 << 10))
                    n += 1
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
        for t in threads:
            t.start()
        try:
            for policy, cap in [("s3fifo", 8 * MiB), ("lfu", 0), ("arc", 12 * MiB), ("lru", 0)]:
                call(admin, "SetPolicy", apb.SetPolicyRequest(tier="cpu", eviction_policy=policy,
                                                              set_capacity=True, capacity_bytes=cap))
                time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not errors, errors
        assert all(c.get_bytes(k) == blob(i, 512 << 10) for i, k in enumerate(hot))
    assert tier_stats(admin, "cpu").eviction_policy == "lru"
    call(admin, "Clear", apb.ClearRequest(namespace="churn/m", confirm=True))


def _kv(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((2, 2, 64, 2, 32), generator=g)).to(torch.float16)  # [L, K/V, T, H, D]


def test_recode_a_tier(admin: apb_grpc.AdminStub, client: Client) -> None:
    tensors = [_kv(i) for i in range(3)]
    keys = [key(i, "rc") for i in range(3)]
    for k, t in zip(keys, tensors, strict=True):
        client.put(k, t, durable=True)
    client.put(key(9, "rc"), blob(9, 4096), durable=True)  # opaque bytes: no codec can take them
    r = call(admin, "Recode", apb.RecodeRequest(selector=sel(namespace="rc/m", tier="disk"), codec="zstd"))
    assert (r.recoded, r.unchanged) == (3, 0)
    assert [f.key for f in r.failed] == [key(9, "rc")] and r.failed[0].reason
    assert r.bytes_before == 3 * tensors[0].numel() * 2 and 0 < r.bytes_after
    # Only the disk copies changed: read them back through disk (out of cpu first).
    call(admin, "Evict", apb.EvictRequest(selector=sel(namespace="rc/m", tier="cpu"), drop=True))
    for k, t in zip(keys, tensors, strict=True):
        got = client.get(k)
        assert got is not None and got.meta.codec == "zstd"
        assert torch.equal(decode_chunk(got.meta, got.data), t)  # lossless
    again = call(admin, "Recode", apb.RecodeRequest(selector=sel(namespace="rc/m", tier="disk"), codec="zstd"))
    assert (again.recoded, again.unchanged) == (0, 3)
    lossy = call(admin, "Recode", apb.RecodeRequest(selector=sel(keys=keys[:1], tier="disk"), codec="kivi",
                                                    set_level=True, level=1))  # 4-bit
    assert lossy.recoded == 1 and lossy.bytes_after < lossy.bytes_before
    with pytest.raises(grpc.RpcError) as err:
        call(admin, "Recode", apb.RecodeRequest(selector=sel(tier="disk"), codec="gzip"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        call(admin, "Recode", apb.RecodeRequest(selector=sel(namespace="rc/m"), codec="zstd"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # a tier is required


def test_clear_needs_confirmation(admin: apb_grpc.AdminStub, client: Client) -> None:
    fill(client, "clr", 3, 4096)
    fill(client, "clr2", 2, 4096)
    with pytest.raises(grpc.RpcError) as err:
        call(admin, "Clear", apb.ClearRequest(namespace="clr/m"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "confirm" in (err.value.details() or "")
    assert len(listed(admin, namespace="clr/m")) == 3
    r = call(admin, "Clear", apb.ClearRequest(namespace="clr/m", tier="cpu", confirm=True))
    assert (r.chunks, r.bytes) == (3, 3 * 4096)
    assert set(sum(listed(admin, namespace="clr/m").values(), [])) == {"disk"}
    r = call(admin, "Clear", apb.ClearRequest(namespace="clr/m", confirm=True))
    assert r.chunks == 3 and listed(admin, namespace="clr/m") == {}
    assert len(listed(admin, namespace="clr2/m")) == 2
    with pytest.raises(grpc.RpcError) as err:
        call(admin, "Clear", apb.ClearRequest(all=True, tier="cpu", confirm=True))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    r = call(admin, "Clear", apb.ClearRequest(all=True, confirm=True))
    assert r.chunks >= 2 and listed(admin) == {}


ALL_RPCS = [
    ("Stats", apb.StatsRequest()),
    ("ListChunks", apb.ListChunksRequest()),
    ("Evict", apb.EvictRequest(selector=sel(tier="cpu"))),
    ("Pin", apb.PinRequest(selector=sel(tier="cpu"), ttl_s=1)),
    ("Unpin", apb.UnpinRequest()),
    ("Move", apb.MoveRequest(to_tier="disk")),
    ("SetPolicy", apb.SetPolicyRequest(tier="cpu", eviction_policy="lru")),
    ("Recode", apb.RecodeRequest(selector=sel(tier="disk"), codec="zstd")),
    ("Clear", apb.ClearRequest(all=True, confirm=True)),
]


@pytest.mark.parametrize("method,request_", ALL_RPCS, ids=[m for m, _ in ALL_RPCS])
def test_admin_role_is_required(
    admin: apb_grpc.AdminStub, client: Client, auth_daemon: DaemonProcess, method: str, request_: Any
) -> None:
    client.put(key(0, "t"), b"kept")
    with pytest.raises(grpc.RpcError) as err:
        call(admin, method, request_, token=RW_TOKEN)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admin" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        call(admin, method, request_, token=None)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        call(admin, method, request_, token="not-a-known-token-at-all")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The readwrite token still reads and writes its own tenant; nothing was changed.
    with Client(auth_daemon.address, token=RW_TOKEN, shm=False) as rw:
        assert rw.get_bytes(key(0, "t")) == b"kept"


def test_malformed_request_is_invalid_argument(auth_daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(auth_daemon.address) as ch:
        raw = ch.unary_unary("/kvstore.v1.Admin/Stats", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff", metadata=bearer(ADMIN_TOKEN), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
