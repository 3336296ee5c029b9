"""A daemon outage turns into misses and False, never exceptions, within bounded time.

The daemon is a real process, killed with SIGKILL mid-run; then a new daemon
comes up on the same port and the backend recovers by itself.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable

import torch

from tests.connectors.sglang.conftest import build
from tests.connectors.sglang.host_pool import HostPoolTwin
from tests.connectors.sglang.test_storage import keys, slots
from tests.support.daemon import DaemonProcess, cpu_only

TIMEOUT_S = 2.0


def pool() -> HostPoolTwin:
    return HostPoolTwin(mla=False, layout="page_first", layers=2, page_size=16, pages=4, heads=2, head_dim=16)


def every_call_misses(b, k: list[str]) -> None:  # type: ignore[no-untyped-def]
    assert b.batch_exists(k) == 0
    assert b.batch_get_v1(k, slots([0, 1], 16)) == [False, False]
    assert b.batch_set_v1(k, slots([0, 1], 16)) == [False, False]
    assert b.get(k[0]) is None
    assert b.get(k[0], b.mem_pool_host.get_dummy_flat_data_page()) is None
    assert b.batch_get(k) == [None, None]
    assert b.exists(k[0]) is False
    assert b.set("x", torch.ones(2)) is False
    assert b.batch_set(["x", "y"], [torch.ones(2), torch.ones(2)]) is False
    assert b.clear() is False


def timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def test_killed_daemon_gives_misses_then_recovers(daemon_factory: Callable[..., DaemonProcess], tenant: str) -> None:
    d = daemon_factory(cpu_only("64MiB"), name="first")
    port = d.port
    p = pool()
    extra = {"address": d.address, "tenant": tenant, "timeout_s": TIMEOUT_S, "breaker_reset_s": 0.5}
    with build(extra, p) as b:
        k = keys(2, "outage")
        p.fill_page(0, 1), p.fill_page(16, 2)
        assert b.batch_set_v1(k, slots([0, 1], 16)) == [True, True]
        assert b.uses_shm

        d.stop(signal.SIGKILL)
        # The first call notices (bounded by timeout_s); the breaker then fails fast.
        assert timed(lambda: every_call_misses(b, k)) < TIMEOUT_S * 3 + 2
        assert timed(lambda: [b.batch_exists(k) for _ in range(50)]) < 1.0
        assert b.stats.errors > 0

        # A new daemon on the same port: the backend finds it again (and a new
        # shared-memory segment) once the breaker lets a probe through.
        daemon_factory(cpu_only("64MiB", port=port), name="second")
        deadline = time.monotonic() + 30
        while b.batch_set_v1(k, slots([0, 1], 16)) != [True, True]:
            assert time.monotonic() < deadline, "backend did not recover"
            time.sleep(0.2)
        assert b.batch_exists(k) == 2
        dst = pool()
        b.register_mem_pool_host(dst)
        assert b.batch_get_v1(k, slots([3, 2], 16)) == [True, True]
        assert torch.equal(dst.read_page(48), p.read_page(0))


def test_daemon_never_up(tenant: str) -> None:
    """Nothing listens: the backend still builds (SGLang can start), every call misses."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    p = pool()
    extra = {"address": f"127.0.0.1:{port}", "tenant": tenant, "timeout_s": TIMEOUT_S}
    with build(extra, p) as b:
        assert timed(lambda: every_call_misses(b, keys(2, "never"))) < TIMEOUT_S * 3 + 2
