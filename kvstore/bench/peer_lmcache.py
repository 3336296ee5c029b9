"""The LMCache peers: LMCache's raw-TCP server and its multiprocess server.

* :class:`LMCacheTCPPeer`: LMCache's legacy raw-TCP server (``lmcache_server``).
* :class:`LMCacheMPPeer`: LMCache's multiprocess server (``lmcache server``)
  with its shared-memory transfer.

LMCache lives in a separate virtualenv (made by ``benchmarks/peers/install.sh``)
so that its numpy pin stays out of kvstore's environment: these peers start
the servers from that virtualenv, run ``lmcache_worker.py`` with its python
and parse the JSON it prints; this module never imports lmcache.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from kvstore.bench.peers import (
    INSTALL_HINT,
    MIB,
    Finding,
    Peer,
    PeerFailed,
    PeerResult,
    ServerProcess,
    check_sizes,
    free_ports,
)
from kvstore.errors import InvalidArgument

WORKER = Path(__file__).with_name("lmcache_worker.py")
VENV_ENV = "KVSTORE_PEERS_VENV"
_REPO_ROOT = Path(__file__).resolve().parents[2]


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
        check_sizes(sizes, iterations, warmup)
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
