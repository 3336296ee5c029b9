"""A real vLLM engine in its own process group, driven phase by phase (run_engine.py).

Shared by the end-to-end test and benchmarks/bench_vllm_ttft.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def engine_env(scratch: Path) -> dict[str, str]:
    scratch.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        VLLM_TARGET_DEVICE="cpu",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_HOST_IP="127.0.0.1",
        HF_HUB_OFFLINE="1",
        TMPDIR=str(scratch),
        VLLM_CACHE_ROOT=str(scratch / "vllm-cache"),
        VLLM_LOGGING_LEVEL="INFO",
    )
    return env


class Engine:
    """``run_engine.py`` in a subprocess; phases advance when the test says so."""

    def __init__(self, workdir: Path, spec: dict[str, Any]) -> None:
        self.out = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        spec = {**spec, "out": str(workdir)}
        (workdir / "spec.json").write_text(json.dumps(spec))
        self.log_path = workdir / "engine.log"
        # vLLM puts IPC sockets in TMPDIR: unix socket paths must stay under 108 bytes.
        self.scratch = Path(tempfile.mkdtemp(prefix="kvs-vllm-", dir="/tmp"))
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "run_engine.py"), str(workdir / "spec.json")],
            stdout=self._log, stderr=subprocess.STDOUT, env=engine_env(self.scratch),
            # Its own process group: vLLM's EngineCore and Worker processes are
            # stopped with it, and nothing else is.
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def phase(self, i: int, timeout: float = 900.0) -> dict[str, Any]:
        if i > 0:
            (self.out / f"go{i}").touch()
        path = self.out / f"phase{i}.json"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"engine exited with {self.proc.returncode}:\n{self.log()[-6000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"engine phase {i} timed out:\n{self.log()[-6000:]}")
            time.sleep(0.1)
        result: dict[str, Any] = json.loads(path.read_text())
        return result

    def wait(self, timeout: float = 120.0) -> None:
        try:
            rc = self.proc.wait(timeout)
        finally:
            self.stop()
        assert rc == 0, self.log()[-6000:]

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)  # the group this test created, and only it
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                try:
                    os.killpg(self.proc.pid, 0)
                except ProcessLookupError:
                    break
                self.proc.poll()  # reap the leader
                time.sleep(0.2)
            else:
                continue
            break
        self.proc.poll()
        self._log.close()
        shutil.rmtree(self.scratch, ignore_errors=True)
