"""Shared fixtures: real daemons on loopback, stopped at the end of each test."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import DaemonProcess, cpu_only

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start daemons with a given config dict; all are stopped at teardown."""
    started: list[DaemonProcess] = []

    def make(config: dict[str, Any] | None = None, name: str = "d", **kw: Any) -> DaemonProcess:
        d = DaemonProcess(tmp_path / name, config or cpu_only(), **kw).start()
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def daemon(daemon_factory: Callable[..., DaemonProcess]) -> DaemonProcess:
    """One CPU-only daemon (256 MiB)."""
    return daemon_factory()
