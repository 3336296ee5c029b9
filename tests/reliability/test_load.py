"""A bounded run of benchmarks/bench_load.py: concurrent clients, mixed sizes, every byte checked.

8 s of load in CI; ``KVSTORE_SOAK=1`` (10 min) or ``KVSTORE_SOAK_S=<s>`` for a soak.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.reliability import SOAK_S

ROOT = Path(__file__).resolve().parents[2]


def test_load_checks_every_byte_and_stays_under_the_memory_bound(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    duration = SOAK_S or 8.0
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_load.py"), "--clients", "3", "--duration", str(duration),
         "--cpu", "128MiB", "--max-memory", "1GiB", "--json", str(out)],
        cwd=ROOT, check=True, timeout=duration + 240,
    )
    r = json.loads(out.read_text())
    assert r["daemon_alive"]
    assert r["errors"] == 0 and r["mismatches"] == 0, r
    assert r["put_ops"] > 20 and r["get_ops"] > 20 and r["hits"] > 0, r
    assert r["rss_peak_mib"] <= r["rss_bound_mib"], r
