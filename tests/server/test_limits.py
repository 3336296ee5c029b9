"""Limits and backpressure (kvstore/server/limits.py) against a real daemon.

Streams per client and in total, the resident-memory bound and per-tenant
quotas: each is pushed past its limit, and must answer RESOURCE_EXHAUSTED
with a message naming the limit, keep the daemon serving, and free up again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from kvstore.config import LimitsConfig, load
from kvstore.errors import ConfigError
from kvstore.server.resident import resident_bytes
from kvstore.v1 import admin_pb2 as apb
from kvstore.v1 import admin_pb2_grpc as apb_grpc
from kvstore.v1 import kvstore_pb2 as pb
from tests.server import MiB, blob, data_frames, exists, header, key, raw_get, raw_put, rpc_error, stub
from tests.support.daemon import DaemonProcess, cpu_only

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def own_channel(address: str) -> grpc.Channel:
    """A channel with its own connection: the daemon sees it as another client."""
    return grpc.insecure_channel(
        address,
        options=[("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)],
    )


class HeldPut:
    """A Put stream kept open (header sent, data withheld) until ``release``."""

    def __init__(self, ch: grpc.Channel, k: str, data: bytes) -> None:
        self._go = threading.Event()
        self.data = data

        def frames() -> Iterator[pb.PutFrame]:
            yield header(k, data)
            self._go.wait(30)
            yield from data_frames(data)

        self.future = stub(ch).Put.future(frames(), timeout=60)

    def release(self) -> pb.PutReply:
        self._go.set()
        return self.future.result()


# -- streams -------------------------------------------------------------------------------
def test_streams_per_client_and_in_total(daemon_factory: Callable[..., DaemonProcess]) -> None:
    d = daemon_factory(
        cpu_only("64MiB", max_concurrent_streams=3, limits={"max_streams_per_client": 2, "stream_wait_s": 1})
    )
    with own_channel(d.address) as one, own_channel(d.address) as two:
        held = [HeldPut(one, key(i), blob(i, 100_000)) for i in range(2)]
        time.sleep(0.5)  # both streams open on the daemon
        # A third stream of the same client is refused at once: one client cannot take every slot.
        start = time.monotonic()
        rpc_error(lambda: raw_put(stub(one), [(key(9), b"x")]), EXHAUSTED, "per client", "max_streams_per_client")
        assert time.monotonic() - start < 0.9
        # Another client gets the last slot of three...
        third = HeldPut(two, key(2), blob(2, 100_000))
        time.sleep(0.3)
        # ... and its next stream waits stream_wait_s for a free slot, then is refused.
        start = time.monotonic()
        rpc_error(lambda: raw_get(stub(two), [key(0)]), EXHAUSTED, "max_concurrent_streams", "retry later")
        assert 0.9 < time.monotonic() - start < 5
        # A stream that waits gets the slot as soon as one frees up.
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(raw_get, stub(two), [key(0)])
            time.sleep(0.3)
            assert [len(r.results) for r in (h.release() for h in held)] == [1, 1]
            assert waiting.result(timeout=10) == [blob(0, 100_000)]
        assert len(third.release().results) == 1
        # Every slot came back: both clients stream again.
        assert raw_get(stub(one), [key(1), key(2)]) == [blob(1, 100_000), blob(2, 100_000)]


# -- memory --------------------------------------------------------------------------------
class PeakSampler:
    """The highest resident memory (RssAnon + RssFile) of ``pid``, read every ~1 ms
    in a thread of its own while the ``with`` block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.samples = pid, 0, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, resident_bytes(self.pid))
            self.samples += 1
            time.sleep(0.001)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def idle_resident(
    daemon_factory: Callable[..., DaemonProcess], config: dict[str, Any], name: str, *, read: bool
) -> int:
    """Resident memory of a daemon of ``config`` that stored (and, with ``read``,
    served) one 1 MiB chunk: what it needs to run, measured on a probe then stopped."""
    probe = daemon_factory(config, name=name)
    with own_channel(probe.address) as ch:
        raw_put(stub(ch), [(key(0), blob(0, MiB))])
        if read:
            raw_get(stub(ch), [key(0)])
    idle = resident_bytes(probe.proc.pid)  # type: ignore[union-attr]
    probe.stop()
    return idle


def run_sampled(pid: int, work: Callable[[int], None], workers: int) -> PeakSampler:
    """``work(0)`` ... ``work(workers - 1)`` at once, sampling ``pid``'s resident memory meanwhile."""
    with PeakSampler(pid) as rss:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, range(workers)))
    return rss


FLOOD_CLIENTS, FLOOD_PUTS, FLOOD_CHUNK = 8, 4, 24 * MiB


def test_memory_bound_refuses_puts_before_resident_memory_passes_it(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    # The cpu tier holds every chunk of the flood, so each acknowledged put can be read back;
    # its arena is resident from the start, so it is part of the idle figure.
    tier = f"{FLOOD_CLIENTS * FLOOD_PUTS * FLOOD_CHUNK // MiB + 32}MiB"
    # Measure an idle daemon first: the bound is set just above what it needs to run.
    idle = idle_resident(daemon_factory, cpu_only(tier), "probe", read=False)
    bound = idle + 128 * MiB
    d = daemon_factory(cpu_only(tier, limits={"max_memory": bound}), name="bounded")
    acked: dict[str, bytes] = {}
    refused: list[str] = []
    lock = threading.Lock()
    values = [blob(w, FLOOD_CHUNK) for w in range(FLOOD_CLIENTS)]

    def flood(w: int) -> None:
        # 8 clients pushing 24 MiB puts at once, each retrying at once when refused:
        # 192 MiB being received would pass the bound, 128 MiB above the idle daemon.
        with own_channel(d.address) as ch:
            for i in range(FLOOD_PUTS):
                k = key(100 * w + i)
                try:
                    reply = raw_put(stub(ch), [(k, values[w])])
                except grpc.RpcError as err:
                    details = err.details() or ""
                    assert err.code() == EXHAUSTED, (err.code(), details)
                    assert "memory bound" in details and "server.limits.max_memory" in details, details
                    with lock:
                        refused.append(k)
                    continue
                assert [r.key for r in reply.results] == [k]
                with lock:
                    acked[k] = values[w]

    rss = run_sampled(d.proc.pid, flood, FLOOD_CLIENTS)  # type: ignore[union-attr]
    summary = (
        f"idle {idle / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB, peak {rss.peak / MiB:.0f} MiB "
        f"({rss.samples} samples), {len(acked)} puts acknowledged, {len(refused)} refused"
    )
    print(summary)
    assert rss.samples > 100, summary
    assert acked and refused, summary  # the flood did press on the bound
    assert rss.peak <= bound, summary
    # Every acknowledged put is there, byte for byte; refused ones left nothing behind.
    with own_channel(d.address) as ch:
        for k, data in acked.items():
            assert raw_get(stub(ch), [k]) == [data], k
        assert exists(stub(ch), refused) == [False] * len(refused)
        # Refusal is not permanent: once the flood is over, puts are accepted again.
        raw_put(stub(ch), [(key(7777), blob(7, 4 * MiB))])
        assert raw_get(stub(ch), [key(7777)]) == [blob(7, 4 * MiB)]
    assert resident_bytes(d.proc.pid) <= bound  # type: ignore[union-attr]


GET_CLIENTS, GET_ROUNDS, GET_CHUNK, GET_KEYS = 8, 3, 32 * MiB, 6


def disk_only(path: Path, **server: Any) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, **server},
        "tiers": [{"name": "disk", "kind": "disk", "capacity": "1GiB", "path": str(path), "on_evict": "drop"}],
    }


def test_memory_bound_counts_the_copies_gets_read_from_disk(
    daemon_factory: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """A get served from disk holds a copy of its chunk while it streams: those copies
    are charged against the bound, and a get that could pass it is refused."""
    values = {key(500 + i): blob(50 + i, GET_CHUNK) for i in range(GET_KEYS)}
    idle = idle_resident(daemon_factory, disk_only(tmp_path / "probe"), "probe-get", read=True)
    bound = idle + 96 * MiB
    d = daemon_factory(disk_only(tmp_path / "bounded", limits={"max_memory": bound}), name="bounded-get")
    with own_channel(d.address) as ch:
        for k, v in values.items():  # one at a time: each put fits
            raw_put(stub(ch), [(k, v)])
    served: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()

    def reader(w: int) -> None:
        # 8 readers of 32 MiB chunks at once: their copies alone would be 256 MiB.
        with own_channel(d.address) as ch:
            for r in range(GET_ROUNDS):
                k = list(values)[(w + r) % GET_KEYS]
                try:
                    got = raw_get(stub(ch), [k], frame_bytes=4 * MiB)
                except grpc.RpcError as err:
                    details = err.details() or ""
                    assert err.code() == EXHAUSTED, (err.code(), details)
                    assert "memory bound" in details and "lower tier" in details, details
                    with lock:
                        refused.append(k)
                    continue
                assert got == [values[k]], k
                with lock:
                    served.append(k)

    rss = run_sampled(d.proc.pid, reader, GET_CLIENTS)  # type: ignore[union-attr]
    summary = (
        f"idle {idle / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB, peak {rss.peak / MiB:.0f} MiB "
        f"({rss.samples} samples), {len(served)} gets served, {len(refused)} refused"
    )
    print(summary)
    assert served and refused, summary
    assert rss.peak <= bound, summary
    with own_channel(d.address) as ch:  # refusal is not permanent
        k = next(iter(values))
        assert raw_get(stub(ch), [k]) == [values[k]]


def test_inflight_bound(daemon_factory: Callable[..., DaemonProcess]) -> None:
    d = daemon_factory(cpu_only("64MiB", limits={"max_inflight": "4MiB"}))
    with own_channel(d.address) as ch:
        held = HeldPut(ch, key(1), blob(1, 3 * MiB))
        time.sleep(0.3)
        rpc_error(lambda: raw_put(stub(ch), [(key(2), blob(2, 2 * MiB))]), EXHAUSTED, "max_inflight")
        assert len(held.release().results) == 1
        raw_put(stub(ch), [(key(2), blob(2, 2 * MiB))])  # room again


# -- tenant quotas ----------------------------------------------------------------------------
def _tenant_bytes(admin: apb_grpc.AdminStub, tenant: str) -> int:
    stats = admin.Stats(apb.StatsRequest(), timeout=10)
    return sum(n.bytes for n in stats.namespaces if n.namespace.startswith(tenant + "/"))


def test_tenant_quota_spans_models_evicts_own_chunks_and_spares_others(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    d = daemon_factory(cpu_only("64MiB", limits={"tenant_quotas": {"acme": "4MiB"}}))
    with own_channel(d.address) as ch:
        s, admin = stub(ch), apb_grpc.AdminStub(ch)
        others = [(key(i, tenant="other"), blob(500 + i, MiB)) for i in range(8)]
        raw_put(s, others)
        acme = [(key(i, tenant="acme", model=f"m{i % 2}"), blob(i, MiB)) for i in range(10)]
        for k, data in acme:  # two models, one quota: the tenant's total stays under it
            raw_put(s, [(k, data)])
            assert _tenant_bytes(admin, "acme") <= 4 * MiB
            assert raw_get(s, [k]) == [data]  # the chunk just put is kept
        got = raw_get(s, [k for k, _ in acme])
        kept = [i for i, g in enumerate(got) if g is not None]
        assert len(kept) == 4 and all(got[i] == acme[i][1] for i in kept)  # whole chunks, the tenant's own
        assert raw_get(s, [k for k, _ in others]) == [data for _, data in others]  # another tenant: untouched
        rpc_error(lambda: raw_put(s, [(key(99, tenant="acme"), blob(99, 5 * MiB))]), EXHAUSTED, "quota", "acme")
        # When everything the tenant holds is pinned, a put is refused rather than evicting a pin.
        admin.Pin(apb.PinRequest(selector=apb.Selector(key_prefix="acme/"), ttl_s=60), timeout=10)
        rpc_error(lambda: raw_put(s, [(key(98, tenant="acme"), blob(98, MiB))]), EXHAUSTED, "pinned")
        assert raw_get(s, [acme[i][0] for i in kept]) == [acme[i][1] for i in kept]


# -- config -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value,words",
    [
        ("max_memory", "1MiB", "server.limits.max_memory"),
        ("max_memory", "lots", "server.limits.max_memory"),
        ("max_inflight", "1KiB", "server.limits.max_inflight"),
        ("max_streams_per_client", 0, "server.limits.max_streams_per_client"),
        ("stream_wait_s", -1, "server.limits.stream_wait_s"),
        ("tenant_quotas", {"bad tenant!": "1GiB"}, "server.limits.tenant_quotas"),
        ("tenant_quotas", {"acme": 0}, "server.limits.tenant_quotas.acme"),
        ("nonsense", 1, "server.limits: unknown field"),
    ],
)
def test_config_errors_name_the_field(field: str, value: Any, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load(environ={}, overrides=[(f"server.limits.{field}", value)])


def test_memory_bound_below_the_cpu_arenas_is_refused() -> None:
    with pytest.raises(ConfigError, match="must exceed the cpu tiers' capacity"):
        load(environ={}, overrides=[("tiers.cpu.capacity", "1GiB"), ("server.limits.max_memory", "1GiB")])
    cfg = load(
        environ={},
        overrides=[("tiers.cpu.capacity", "1GiB"), ("server.limits.max_memory", "2GiB"),
                   ("server.limits.tenant_quotas.acme", "10GiB")],
    )
    assert cfg.server.limits == LimitsConfig(max_memory_bytes=2 << 30, tenant_quotas=(("acme", 10 << 30),))

