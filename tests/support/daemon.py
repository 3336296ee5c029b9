"""A real daemon process on a loopback port, for tests.

``DaemonProcess(tmp_path, config)`` writes the config as YAML, runs
``python -m kvstore.cli serve`` with ``--port 0`` and waits for the port
file.  It is always stopped (SIGTERM, then SIGKILL) by ``stop()`` / the
context manager, so no test leaves a server behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml


def cpu_only(capacity: str = "256MiB", **server: Any) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, **server},
        "tiers": [{"name": "cpu", "kind": "cpu", "capacity": capacity, "on_evict": "drop"}],
    }


def cpu_and_disk(disk_path: Path, cpu: str = "128MiB", disk: str = "1GiB", **server: Any) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, **server},
        "tiers": [
            {"name": "cpu", "kind": "cpu", "capacity": cpu, "on_evict": "demote"},
            {"name": "disk", "kind": "disk", "capacity": disk, "path": str(disk_path), "write_through": True,
             "on_evict": "drop"},
        ],
    }


class DaemonProcess:
    def __init__(
        self, workdir: Path, config: dict[str, Any], *, extra_args: list[str] | None = None, wrap: list[str] | None = None
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "kvstore.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.port_file = workdir / "port"
        self.log_path = workdir / "daemon.log"
        self.extra_args = extra_args or []
        #: A command the daemon runs under, which must exec it (e.g. unshare), so the PID is the daemon's.
        self.wrap = wrap or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> DaemonProcess:
        self.port_file.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*self.wrap, sys.executable, "-m", "kvstore.cli", "serve", "--config", str(self.config_path),
             "--port-file", str(self.port_file), *self.extra_args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.port_file.exists() and self.port_file.read_text().strip():
                self.port = int(self.port_file.read_text())
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"daemon did not start in {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
