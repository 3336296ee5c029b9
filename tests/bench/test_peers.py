"""Tests of kvstore.bench.peers, peer_redis and peer_lmcache against the real
peer servers on loopback.

Redis needs a ``redis-server`` binary (CI installs it); the LMCache peers need
the virtualenv made by ``benchmarks/peers/install.sh``. Each is skipped, with
the reason, when missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kvstore.bench.peer_lmcache import LMCacheMPPeer, LMCacheTCPPeer, default_venv
from kvstore.bench.peer_redis import RedisPeer
from kvstore.bench.peers import (
    MIB,
    Finding,
    PeerReport,
    PeerResult,
    PeerUnavailable,
    bench_peers,
    run_findings,
    run_peer,
)

needs_redis = pytest.mark.skipif(
    shutil.which(os.environ.get("KVSTORE_REDIS_SERVER", "redis-server")) is None,
    reason="no redis-server binary (apt-get install -y redis-server, "
    "or run benchmarks/peers/install.sh)",
)
needs_lmcache = pytest.mark.skipif(
    LMCacheTCPPeer().unavailable_reason() is not None,
    reason=f"no LMCache peer virtualenv at {default_venv()} "
    "(run benchmarks/peers/install.sh)",
)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _check(result: PeerResult, peer: str, size: int) -> None:
    assert result.peer == peer
    assert result.size_bytes == size
    assert result.put_gbps > 0 and result.get_gbps > 0
    assert 0 < result.put_p50_ms <= result.put_p99_ms
    assert 0 < result.get_p50_ms <= result.get_p99_ms


# -- without any server ------------------------------------------------------


def test_redis_missing_binary_says_how_to_install() -> None:
    peer = RedisPeer(server_binary="/nonexistent/redis-server")
    reason = peer.unavailable_reason()
    assert reason is not None and "benchmarks/peers/install.sh" in reason
    with pytest.raises(PeerUnavailable, match="install.sh"):
        peer.start()


def test_missing_venv_says_how_to_install(tmp_path: Path) -> None:
    for peer in (LMCacheTCPPeer(tmp_path / "nope"), LMCacheMPPeer(tmp_path / "nope")):
        reason = peer.unavailable_reason()
        assert reason is not None and "benchmarks/peers/install.sh" in reason


def test_bench_reports_unavailable_peers_as_errors(tmp_path: Path) -> None:
    # The bench shows "n/a" for these instead of crashing.
    reports = bench_peers(
        [MIB], 1, 0,
        peers=[RedisPeer("/nonexistent/redis-server"), LMCacheTCPPeer(tmp_path / "nope")],
    )
    assert [r.peer for r in reports] == ["redis", "lmcache-tcp"]
    assert all(r.results == () and r.error for r in reports)


def test_run_peer_rejects_unknown_names() -> None:
    from kvstore.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="lmcache-mp"):
        run_peer("memcached", [MIB], 1, 0)


def test_run_peer_without_venv_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(PeerUnavailable, match="install.sh"):
        run_peer("lmcache-mp", [MIB], 1, 0, peer_python=tmp_path / "nope" / "bin" / "python")


def test_findings_without_venv_are_not_run(tmp_path: Path) -> None:
    findings = run_findings(tmp_path / "nope")
    assert len(findings) == 4
    assert all(f.observed is None and "install.sh" in f.details for f in findings)


# -- Redis ---------------------------------------------------------------------


@needs_redis
def test_redis_peer_measures_each_size() -> None:
    sizes = [MIB, 4 * MIB]
    with RedisPeer() as peer:
        pid = peer.pid
        assert pid is not None
        results = peer.run(sizes, iterations=3, warmup=1)
    for result, size in zip(results, sizes, strict=True):
        _check(result, "redis", size)
    assert not _pid_alive(pid)


@needs_redis
def test_redis_server_stopped_on_error() -> None:
    peer = RedisPeer()
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="boom"), peer:
        assert peer.pid is not None and _pid_alive(peer.pid)
        pids.append(peer.pid)
        raise RuntimeError("boom")
    assert not _pid_alive(pids[0])
    assert peer.pid is None


@needs_redis
def test_run_requires_start() -> None:
    with pytest.raises(RuntimeError, match="start"):
        RedisPeer().run([MIB], 1, 0)


@needs_redis
def test_run_peer_redis() -> None:
    (result,) = run_peer("redis", [MIB], 2, 1)
    _check(result, "redis", MIB)


@needs_redis
def test_bench_peers_with_redis() -> None:
    reports = bench_peers([MIB], 2, 1, peers=[RedisPeer()])
    assert reports == [PeerReport("redis", reports[0].results)]
    _check(reports[0].results[0], "redis", MIB)


# -- LMCache (only with the peer virtualenv) --------------------------------------


@needs_lmcache
@pytest.mark.slow
def test_lmcache_tcp_peer_measures_each_size() -> None:
    with LMCacheTCPPeer() as peer:
        pid = peer.pid
        assert pid is not None
        results = peer.run([MIB, 4 * MIB], iterations=3, warmup=1)
    _check(results[0], "lmcache-tcp", MIB)
    _check(results[1], "lmcache-tcp", 4 * MIB)
    assert not _pid_alive(pid)


@needs_lmcache
@pytest.mark.slow
def test_lmcache_mp_peer_uses_shared_memory() -> None:
    with LMCacheMPPeer(l1_size_gb=0.5) as peer:
        pid, shm = peer.pid, peer.shm_name
        assert pid is not None
        assert peer.healthcheck()[0] == 200
        results = peer.run([MIB], iterations=3, warmup=1)
    _check(results[0], "lmcache-mp", MIB)
    assert results[0].note == "EngineDrivenContextShm"  # not the pickle fallback
    assert not _pid_alive(pid)
    assert not Path(f"/dev/shm/lmcache_l1_pool_{shm}").exists()


def test_lmcache_sizes_must_be_whole_mib() -> None:
    from kvstore.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="whole MiB"):
        LMCacheTCPPeer().run([MIB + 1], 1, 0)


@needs_lmcache
@pytest.mark.slow
def test_lmcache_findings_reproduce() -> None:
    findings = run_findings(budget_gb=0.25)
    by_name = {f.name: f for f in findings}
    assert set(by_name) == {
        "mp-drops-acknowledged-stores",
        "mp-wedged-but-healthy",
        "tcp-truncated-put-stored",
        "tcp-no-capacity-limit",
    }
    for f in findings:
        assert isinstance(f, Finding)
        assert f.observed is True, f"{f.name} not reproduced: {f.details}"
