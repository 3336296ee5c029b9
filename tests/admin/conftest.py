"""Daemons for the admin tests, and helpers to fill them.

The RPC tests share one daemon with bearer-token authentication (an admin
token and a readwrite one); each test works in a namespace of its own, so
tests do not see each other's chunks.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from kvstore.client import Client
from kvstore.v1 import admin_pb2_grpc as apb_grpc
from tests.support.daemon import DaemonProcess

MiB = 1 << 20
FP = "0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789"
RW_TOKEN = "readwrite-token-0123456789"


def key(i: int, tenant: str = "t", model: str = "m") -> str:
    """The wire form of the ``i``-th test key of ``tenant``/``model``."""
    return f"{tenant}/{model}/{FP}/s{i:064x}"


def blob(seed: int, n: int = MiB) -> bytes:
    return random.Random(seed).randbytes(n)


def tiered(disk: Path, cpu: str = "32MiB", disk_cap: str = "256MiB", **server: Any) -> dict[str, Any]:
    """A cpu tier that demotes into a write-through disk tier."""
    return {
        "server": {"host": "127.0.0.1", "port": 0, **server},
        "tiers": [
            {"name": "cpu", "kind": "cpu", "capacity": cpu, "on_evict": "demote"},
            {"name": "disk", "kind": "disk", "capacity": disk_cap, "path": str(disk), "write_through": True,
             "on_evict": "drop"},
        ],
    }


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture(scope="module")
def auth_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """cpu (32 MiB) over disk (256 MiB), with an admin and a readwrite token."""
    root = tmp_path_factory.mktemp("admin")
    tokens = root / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": [
        {"token": ADMIN_TOKEN, "role": "admin"},
        {"token": RW_TOKEN, "tenant": "t", "role": "readwrite"},
    ]}))
    with DaemonProcess(root / "d", tiered(root / "disk", token_file=str(tokens))) as d:
        yield d


@pytest.fixture
def admin(auth_daemon: DaemonProcess) -> Iterator[apb_grpc.AdminStub]:
    """The Admin stub of the shared daemon; calls need ``metadata=bearer(ADMIN_TOKEN)``."""
    with grpc.insecure_channel(auth_daemon.address) as ch:
        yield apb_grpc.AdminStub(ch)


@pytest.fixture
def client(auth_daemon: DaemonProcess) -> Iterator[Client]:
    """A data client of the shared daemon (admin token: any tenant)."""
    with Client(auth_daemon.address, token=ADMIN_TOKEN, shm=False) as c:
        yield c
