"""kvstore/server/malloc.py: glibc accepts the settings (mallopt returns 1 for each);
run in a child process, since they are process-wide."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_glibc_takes_the_streaming_settings() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "from kvstore.server.malloc import tune_for_streaming as t; print(t())"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert out.stdout.strip() == "True", out.stderr


def test_the_thresholds_are_ones_glibc_accepts() -> None:
    from kvstore.server.malloc import MMAP_THRESHOLD, TRIM_THRESHOLD

    from kvstore.server.service import PLAIN_CLIENT_FRAME

    assert MMAP_THRESHOLD > PLAIN_CLIENT_FRAME + (64 << 10)  # a default frame, tag and length come from the heap
    assert TRIM_THRESHOLD >= 2 * MMAP_THRESHOLD  # and freeing one never shrinks the heap at once
