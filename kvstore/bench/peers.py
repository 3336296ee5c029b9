"""The peers ``kvstore bench`` compares against, run side by side in one run.

A user who does not pick kvstore picks one of these:

* ``redis``: a real ``redis-server`` driven in-process by redis-py (with
  hiredis when installed); :class:`~kvstore.bench.peer_redis.RedisPeer`.
* ``lmcache-tcp``: LMCache's legacy raw-TCP server (``lmcache_server``);
  :class:`~kvstore.bench.peer_lmcache.LMCacheTCPPeer`.
* ``lmcache-mp``: LMCache's multiprocess server (``lmcache server``) with its
  shared-memory transfer; :class:`~kvstore.bench.peer_lmcache.LMCacheMPPeer`.

This module holds what they share: the :class:`Peer` interface, the server
subprocess (:class:`ServerProcess`), the results (:class:`PeerResult`,
:class:`PeerReport`, :class:`Finding`), and the entry points that run them
(:func:`default_peers`, :func:`run_peer`, :func:`bench_peers`,
:func:`run_findings`, :func:`main`). The concrete peers live in
``peer_redis.py`` and ``peer_lmcache.py``, which import this module; the
entry points import them when called.

Each peer starts its server as a subprocess bound to 127.0.0.1 on a free port,
in its own temporary directory, and stops it by PID on exit, errors included
(use it as a context manager). LMCache lives in a separate virtualenv (made by
``benchmarks/peers/install.sh``) so that its numpy pin stays out of kvstore's
environment: the LMCache peers run ``lmcache_worker.py`` with that
virtualenv's python and parse the JSON it prints; kvstore never imports
lmcache.

A peer that cannot run says why (:meth:`Peer.unavailable_reason`, or
:class:`PeerUnavailable` from :meth:`Peer.start`); :func:`bench_peers` turns
that into a :class:`PeerReport` whose ``error`` the bench shows as "n/a".
:func:`run_findings` runs the scenarios that show what the LMCache servers get
wrong (see ``docs/benchmarks/peers.md``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from kvstore.errors import InvalidArgument, RemoteUnavailable

MIB = 1 << 20
DEFAULT_SIZES = (1 * MIB, 4 * MIB, 16 * MIB, 32 * MIB)
INSTALL_HINT = "run benchmarks/peers/install.sh"


class PeerUnavailable(RemoteUnavailable):
    """The peer has no results: not installed, would not start, or it failed."""


class PeerFailed(PeerUnavailable):
    """The peer's workload failed or returned wrong bytes."""


@dataclass(frozen=True)
class PeerResult:
    """One peer at one value size: one client, throughput in GB/s (1e9 B/s)."""

    peer: str
    size_bytes: int
    put_gbps: float
    get_gbps: float
    put_p50_ms: float
    put_p99_ms: float
    get_p50_ms: float
    get_p99_ms: float
    note: str = ""


@dataclass(frozen=True)
class PeerReport:
    """A peer's results, or why it has none (``error``; shown as "n/a")."""

    peer: str
    results: tuple[PeerResult, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class Finding:
    """One failure scenario: ``observed`` is None when it could not be run."""

    peer: str
    name: str
    observed: bool | None
    details: str


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct free loopback ports (held together while chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class ServerProcess:
    """A server subprocess in its own session, logging to ``log``."""

    def __init__(self, argv: Sequence[str], log: Path, env: dict[str, str], cwd: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,  # its own process group, so stop() gets children too
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for_ports(self, ports: Sequence[int], timeout_s: float, name: str) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(ports)
        while pending:
            if self.proc.poll() is not None:
                raise PeerUnavailable(
                    f"{name} exited with code {self.proc.returncode} while starting:\n"
                    + self.log_tail()
                )
            if time.monotonic() > deadline:
                raise PeerUnavailable(
                    f"{name} did not listen on {pending} within {timeout_s:.0f} s:\n"
                    + self.log_tail()
                )
            try:
                socket.create_connection(("127.0.0.1", pending[0]), timeout=1).close()
                pending.pop(0)
            except OSError:
                time.sleep(0.2)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)  # the group our child leads, by its PID
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


class Peer(ABC):
    """One peer server: :meth:`start`, then :meth:`run` any number of times, :meth:`stop`."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self._server: ServerProcess | None = None
        self._tmp: Path | None = None
        self.port = 0

    @abstractmethod
    def unavailable_reason(self) -> str | None:
        """Why this peer cannot run here (with the fix), or None if it can."""

    @abstractmethod
    def _launch(self, tmp: Path) -> ServerProcess:
        """Start the server in ``tmp`` and wait until it serves."""

    @abstractmethod
    def run(self, sizes: Sequence[int], iterations: int, warmup: int) -> list[PeerResult]:
        """Time ``iterations`` puts and gets per value size (after ``warmup``)."""

    @property
    def pid(self) -> int | None:
        return None if self._server is None else self._server.pid

    def start(self) -> None:
        reason = self.unavailable_reason()
        if reason is not None:
            raise PeerUnavailable(reason)
        self._tmp = Path(tempfile.mkdtemp(prefix=f"kvstore-peer-{self.name}-"))
        try:
            self._server = self._launch(self._tmp)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _spawn(
        self, argv: Sequence[str], tmp: Path, env: dict[str, str] | None = None
    ) -> ServerProcess:
        # Recorded at once, so that stop() kills it even if _launch fails later.
        self._server = ServerProcess(argv, tmp / "server.log", env or dict(os.environ), tmp)
        return self._server

    def _require_started(self) -> Path:
        if self._server is None or self._tmp is None:
            raise RuntimeError(f"{self.name}: start() it first (or use it as a context manager)")
        return self._tmp


def check_sizes(sizes: Sequence[int], iterations: int, warmup: int) -> None:
    """InvalidArgument unless ``sizes`` are positive, ``iterations`` >= 1 and ``warmup`` >= 0."""
    if not sizes or any(s <= 0 for s in sizes):
        raise InvalidArgument(f"sizes must be positive byte counts, got {list(sizes)}")
    if iterations < 1 or warmup < 0:
        raise InvalidArgument(
            f"iterations must be >= 1 and warmup >= 0, got {iterations} and {warmup}"
        )


def default_peers(
    sizes: Sequence[int] = DEFAULT_SIZES, iterations: int = 10, warmup: int = 2,
    venv: Path | None = None,
) -> list[Peer]:
    # Imported here: the concrete peers' modules import this one.
    from kvstore.bench.peer_lmcache import LMCacheMPPeer, LMCacheTCPPeer, mp_l1_size_gb
    from kvstore.bench.peer_redis import RedisPeer

    return [
        RedisPeer(),
        LMCacheTCPPeer(venv),
        LMCacheMPPeer(venv, l1_size_gb=mp_l1_size_gb(sizes, iterations, warmup)),
    ]


#: The peers :func:`run_peer` knows, by name.
PEERS = ("redis", "lmcache-tcp", "lmcache-mp")


def _venv_of(peer_python: str | Path | None) -> Path | None:
    """The virtualenv whose ``bin/python`` is ``peer_python``."""
    return None if peer_python is None else Path(peer_python).parent.parent


def run_peer(
    name: str,
    sizes: Sequence[int],
    iterations: int,
    warmup: int,
    *,
    peer_python: str | Path | None = None,
) -> list[PeerResult]:
    """Start peer ``name``, run the workload, stop it; PeerUnavailable if it cannot."""
    from kvstore.bench.peer_lmcache import LMCacheMPPeer, LMCacheTCPPeer, mp_l1_size_gb
    from kvstore.bench.peer_redis import RedisPeer

    if name not in PEERS:
        raise InvalidArgument(f"unknown peer {name!r}; choose from {sorted(PEERS)}")
    check_sizes(sizes, iterations, warmup)
    venv = _venv_of(peer_python)
    peer: Peer
    if name == "redis":
        peer = RedisPeer()
    elif name == "lmcache-tcp":
        peer = LMCacheTCPPeer(venv)
    else:
        peer = LMCacheMPPeer(venv, l1_size_gb=mp_l1_size_gb(sizes, iterations, warmup))
    with peer:
        return peer.run(sizes, iterations, warmup)


def bench_peers(
    sizes: Sequence[int] = DEFAULT_SIZES,
    iterations: int = 10,
    warmup: int = 2,
    peers: Sequence[Peer] | None = None,
) -> list[PeerReport]:
    """Run every peer in turn (one server at a time); never raises for a peer."""
    check_sizes(sizes, iterations, warmup)
    reports = []
    for peer in peers if peers is not None else default_peers(sizes, iterations, warmup):
        try:
            with peer:
                results = peer.run(sizes, iterations, warmup)
            reports.append(PeerReport(peer.name, tuple(results)))
        except PeerUnavailable as exc:
            reports.append(PeerReport(peer.name, error=str(exc)))
    return reports


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def run_findings(
    venv: Path | None = None,
    budget_gb: float = 1.0,
    *,
    peer_python: str | Path | None = None,
) -> list[Finding]:
    """Show what the LMCache servers get wrong; each on a server of its own.

    ``budget_gb`` bounds the no-capacity scenario (at most a quarter of the
    memory available now). ``peer_python`` may name the venv's python instead
    of ``venv``. Never raises for a scenario: one that cannot run has
    ``observed=None`` and the reason in ``details``.
    """
    from kvstore.bench.peer_lmcache import LMCacheMPPeer, LMCacheTCPPeer, _LMCachePeer

    venv = venv if venv is not None else _venv_of(peer_python)
    budget_gb = min(budget_gb, _mem_available() / 4 / (1 << 30))
    findings: list[Finding] = []
    scenarios: list[tuple[_LMCachePeer, str, list[str]]] = [
        (
            LMCacheMPPeer(venv, l1_size_gb=0.25),
            "mp-drops-acknowledged-stores",
            ["--l1-size-gb", "0.25", "--value-mib", "32"],
        ),
        (LMCacheMPPeer(venv, l1_size_gb=0.5), "mp-wedged-but-healthy", []),
        (LMCacheTCPPeer(venv), "tcp-truncated-put-stored", []),
        (LMCacheTCPPeer(venv), "tcp-no-capacity-limit", ["--budget-gb", f"{budget_gb:.2f}"]),
    ]
    for peer, name, args in scenarios:
        try:
            with peer:
                extra = list(args)
                if isinstance(peer, LMCacheMPPeer):
                    extra += ["--http-port", str(peer.http_port)]
                if peer.pid is not None:
                    extra += ["--server-pid", str(peer.pid)]
                findings.append(peer.finding(name, *extra))
        except PeerUnavailable as exc:
            findings.append(Finding(peer.name, name, None, f"not run: {exc}"))
    return findings


def main() -> None:  # pragma: no cover - manual entry point
    """``python -m kvstore.bench.peers``: print the peers' table and findings."""
    for report in bench_peers():
        if report.error:
            print(f"{report.peer}: n/a ({report.error.splitlines()[0]})")
        for r in report.results:
            print(
                f"{r.peer:12s} {r.size_bytes // MIB:3d} MiB  put {r.put_gbps:5.2f} GB/s "
                f"(p50 {r.put_p50_ms:7.1f} p99 {r.put_p99_ms:7.1f} ms)  get {r.get_gbps:5.2f} "
                f"GB/s (p50 {r.get_p50_ms:7.1f} p99 {r.get_p99_ms:7.1f} ms)  {r.note}"
            )
    for f in run_findings():
        seen = {True: "seen", False: "not seen", None: "n/a"}[f.observed]
        print(f"[{seen}] {f.peer} {f.name}: {f.details}")
    sys.stdout.flush()


if __name__ == "__main__":  # pragma: no cover
    # Run with -m this module is __main__, a second copy of kvstore.bench.peers:
    # the concrete peers raise the PeerUnavailable of the package module, so
    # run that module's main, whose handlers catch it.
    from kvstore.bench import peers

    peers.main()
