"""Reliability and security tests (issue 10): fuzzing, faults, load, isolation.

Sizes are for CI (seconds each).  Longer runs, by environment variable:

* ``KVSTORE_FUZZ_LONG=1``: every fuzz test runs 20x as many inputs;
* ``KVSTORE_SOAK=1``: the load test runs for 10 minutes instead of 15 s
  (or ``KVSTORE_SOAK_S=<seconds>``).

docs/reliability.md lists every promise and the test that checks it.
"""

from __future__ import annotations

import os

FUZZ_LONG = os.environ.get("KVSTORE_FUZZ_LONG", "") not in ("", "0")
SOAK_S = float(os.environ.get("KVSTORE_SOAK_S") or (600 if os.environ.get("KVSTORE_SOAK", "") not in ("", "0") else 0))


def fuzz_count(ci: int) -> int:
    """How many inputs a fuzz test runs: ``ci`` in CI, 20x with KVSTORE_FUZZ_LONG."""
    return ci * 20 if FUZZ_LONG else ci
