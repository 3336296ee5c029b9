"""The ``peer`` tier against a real daemon on loopback.

Round trips with metadata intact, presence and delete, a bearer token, and
the faults: a peer that is stopped (misses fast, puts refused, breaker open)
and started again (the tier finds it by itself).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from kvstore.chunk import Chunk, ChunkMeta, checksum
from kvstore.errors import ConfigError, RemoteUnavailable
from kvstore.keys import ChunkKey, Namespace
from kvstore.tiers.breaker import BreakerConfig
from kvstore.tiers.peer import PeerTier, PeerTierConfig
from tests.support.daemon import DaemonProcess, cpu_only

MiB = 1 << 20
NS = Namespace("acme", "llama")
FAST = BreakerConfig(failures=2, reset_s=0.2, max_reset_s=0.5)


def key(i: int) -> ChunkKey:
    return ChunkKey(NS, "fedcba9876543210", "p" + f"{i:064x}")


def _rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def opened(address: str, **kw: object) -> PeerTier:
    kw.setdefault("breaker", FAST)
    kw.setdefault("timeout_s", 0.5)
    tier = PeerTier("hub", PeerTierConfig(url=f"kvstore://{address}", **kw))  # type: ignore[arg-type]
    await tier.open()
    return tier


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"url": "grpc://h:1"}, "peer.url"),
        ({"url": "kvstore://h"}, "peer.url"),
        ({"url": "kvstores://h:1"}, "tls_ca"),
        ({"url": "kvstore://h:1", "tls_ca": Path("/etc/hostname")}, "kvstores://"),
        ({"url": "kvstore://h:1", "timeout_s": 0}, "timeout_s"),
        ({"url": "kvstore://h:1", "token": "a", "token_file": Path("/etc/hostname")}, "exclusive"),
    ],
)
def test_config_errors_name_the_field(kw: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        PeerTierConfig(**kw)  # type: ignore[arg-type]


def test_address_and_token_out_of_repr() -> None:
    c = PeerTierConfig(url="kvstore://10.0.0.7:51061", token="0123456789abcdef-secret")
    assert c.address == "10.0.0.7:51061"
    assert "secret" not in repr(c)
    assert PeerTierConfig(url="kvstore://[::1]:5").address == "[::1]:5"


async def test_round_trip_metadata_presence_delete(daemon: DaemonProcess) -> None:
    tier = await opened(daemon.address)
    try:
        data = _rand(5 * MiB + 3, 1)
        meta = ChunkMeta(nbytes=len(data), checksum=checksum(data), codec="zstd", codec_version=2)
        await tier.put(key(1), Chunk(meta, memoryview(data)))
        await tier.put(key(2), Chunk.from_bytes(b""))
        got = await tier.get(key(1))
        assert got is not None and got.meta == meta and bytes(got.payload) == data
        empty = await tier.get(key(2))
        assert empty is not None and bytes(empty.payload) == b""
        assert await tier.contains_many([key(1), key(3), key(2)]) == [True, False, True]
        assert await tier.get(key(3)) is None
        assert await tier.delete(key(1)) == 1
        assert await tier.delete(key(1)) == 0
        assert await tier.get(key(1)) is None
        assert (tier.counters.hits, tier.counters.misses, tier.counters.puts) == (2, 2, 2)
    finally:
        await tier.close()


async def test_token(tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]) -> None:
    tokens = tmp_path / "tokens.yaml"
    entry = {"token": "peer-token-0123456789", "tenant": "acme", "role": "readwrite"}
    tokens.write_text(yaml.safe_dump({"tokens": [entry]}))
    d = daemon_factory(cpu_only(token_file=str(tokens)), name="auth")
    token_file = tmp_path / "token"
    token_file.write_text("peer-token-0123456789\n")
    good = await opened(d.address, token_file=token_file)
    anonymous = await opened(d.address)
    try:
        await good.put(key(4), Chunk.from_bytes(b"with a token"))
        got = await good.get(key(4))
        assert got is not None and bytes(got.payload) == b"with a token"
        # Refused credentials: a miss and a counted error, never an exception on get.
        assert await anonymous.get(key(4)) is None
        assert anonymous.counters.errors == 1
        with pytest.raises(RemoteUnavailable, match="Unauthenticated"):
            await anonymous.put(key(5), Chunk.from_bytes(b"x"))
    finally:
        await good.close()
        await anonymous.close()


async def test_peer_down_then_back(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "hub", cpu_only()).start()
    tier = await opened(d.address)
    try:
        await tier.put(key(6), Chunk.from_bytes(b"before"))
        port = d.port
        d.stop()
        start = time.monotonic()
        for _ in range(20):
            assert await tier.get(key(6)) is None
            assert await tier.contains_many([key(6)]) == [False]
        with pytest.raises(RemoteUnavailable):
            await tier.put(key(7), Chunk.from_bytes(b"x"))
        assert time.monotonic() - start < 2 * 0.5 + 0.5  # at most `failures` calls wait; then refused
        assert tier.breaker.state == "open" and tier.breaker.trips == 1
        # Back on the same port (a restarted daemon starts empty).
        cfg = cpu_only()
        cfg["server"]["port"] = port
        d2 = DaemonProcess(tmp_path / "hub2", cfg).start()
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    await tier.put(key(8), Chunk.from_bytes(b"after"))
                    break
                except RemoteUnavailable:
                    assert time.monotonic() < deadline, "the tier did not reconnect"
                    await asyncio.sleep(0.1)
            got = await tier.get(key(8))
            assert got is not None and bytes(got.payload) == b"after"
            assert tier.breaker.state == "closed"
        finally:
            d2.stop()
    finally:
        await tier.close()
        d.stop()
