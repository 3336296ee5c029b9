"""Two daemons sharing chunks through a remote tier, as on two inference hosts.

Daemons A and B run as separate processes on loopback, each with its own CPU
tier and a remote tier written through in the background: first a Redis
server, then a third daemon (the hub) as their ``peer`` tier.  A chunk put
through A must be found by B's lookup, read byte-exact by B's get, and then
promoted into B's CPU tier.  With the remote gone, B keeps serving what it
holds locally at full speed and misses the rest within the time bound.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from kvstore.client import AsyncClient
from kvstore.errors import RemoteUnavailable
from kvstore.keys import ChunkKey, Namespace
from tests.support.daemon import DaemonProcess, cpu_only
from tests.support.redis import RedisServer, redis_server

__all__ = ["redis_server"]  # fixture, imported for pytest

MiB = 1 << 20
NS = Namespace("acme", "HuggingFaceTB/SmolLM2-135M")
TIMEOUT_S = 0.5


def key(i: int) -> ChunkKey:
    return ChunkKey(NS, "00112233aabbccdd", "p" + f"{i:064x}")


def _rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def host(remote: dict[str, Any]) -> dict[str, Any]:
    """A daemon with a CPU tier and ``remote`` written through in the background."""
    return {
        "server": {"host": "127.0.0.1", "port": 0},
        "tiers": [
            {"name": "cpu", "kind": "cpu", "capacity": "128MiB", "on_evict": "drop"},
            {"write_through": True, "on_full": "drop", "queue_depth": 16, "timeout": TIMEOUT_S, **remote},
        ],
    }


async def check_sharing(a: DaemonProcess, b: DaemonProcess, remote: str) -> None:
    chunks = {i: _rand(6 * MiB + i, i) for i in range(3)}
    async with AsyncClient(a.address, shm=False) as ca, AsyncClient(b.address, shm=False) as cb:
        # 1. Put through A; durable: returns once the remote tier has it too.
        for i, data in chunks.items():
            assert await ca.put(key(i), data, durable=True) == "cpu"
        # 2. B's lookup finds the whole prefix, in the remote tier.
        found = await cb.lookup([key(i) for i in range(4)])
        assert (found.count, found.tiers) == (3, [remote] * 3)
        # 3. B's get returns the bytes A stored, exactly.
        for i, data in chunks.items():
            assert await cb.get_bytes(key(i)) == data
        # 4. ...and promoted them into B's CPU tier.
        found = await cb.lookup([key(i) for i in range(3)])
        assert found.tiers == ["cpu"] * 3
        assert await cb.get_bytes(key(99)) is None


async def check_remote_down(a: DaemonProcess, b: DaemonProcess, stop_remote: Callable[[], None]) -> None:
    local = _rand(4 * MiB, 7)
    async with AsyncClient(a.address, shm=False) as ca, AsyncClient(b.address, shm=False) as cb:
        await ca.put(key(10), _rand(4 * MiB, 10), durable=True)  # only remote, as far as B knows
        await cb.put(key(11), local, durable=True)
        stop_remote()
        # B's own tier serves at full speed.
        start = time.monotonic()
        for _ in range(20):
            assert await cb.get_bytes(key(11)) == local
        assert time.monotonic() - start < 2.0
        # What only the remote had misses, within the bound, and then at once.
        for _ in range(5):
            start = time.monotonic()
            assert await cb.get_bytes(key(10)) is None
            assert time.monotonic() - start < TIMEOUT_S + 4 * MiB / 50e6 + 0.5
        found = await cb.lookup([key(11), key(10)])
        assert (found.count, found.tiers) == (1, ["cpu"])
        # Puts still land locally (write-throughs are dropped and counted) ...
        start = time.monotonic()
        for i in range(12, 20):
            assert await cb.put(key(i), _rand(MiB, i)) == "cpu"
        assert time.monotonic() - start < 2.0
        # ... while a durable put reports that the remote did not get it.
        with pytest.raises(RemoteUnavailable):
            await cb.put(key(20), b"must reach the remote", durable=True)
        assert await cb.get_bytes(key(20)) == b"must reach the remote"  # local copy stays


def redis_tier(server: RedisServer) -> dict[str, Any]:
    return {"name": "shared", "kind": "redis", "url": server.url, "key_prefix": "mh:"}


async def test_two_daemons_share_through_redis(
    redis_server: RedisServer, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    a = daemon_factory(host(redis_tier(redis_server)), name="a")
    b = daemon_factory(host(redis_tier(redis_server)), name="b")
    await check_sharing(a, b, "shared")
    await check_remote_down(a, b, redis_server.kill)


async def test_two_daemons_share_through_a_peer(daemon_factory: Callable[..., DaemonProcess]) -> None:
    hub = daemon_factory(cpu_only("256MiB"), name="hub")
    peer = {"name": "hub", "kind": "peer", "url": f"kvstore://{hub.address}"}
    a = daemon_factory(host(peer), name="a")
    b = daemon_factory(host(peer), name="b")
    await check_sharing(a, b, "hub")
    await check_remote_down(a, b, hub.stop)
