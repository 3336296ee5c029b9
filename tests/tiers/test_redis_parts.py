"""The part reader (kvstore/tiers/redis_parts.py) against real servers on loopback.

It receives GET replies straight into caller-given buffers: these tests check
the bytes, the replies it must not misread (nil, empty value, error, a value
of the wrong size), AUTH + SELECT at connect, a connection cancelled midway
(never reused), a restarted server (a pooled connection replaced), and that
the ``redis`` tier really reads its parts through it, on one server and from
every master of a cluster.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from kvstore.chunk import Chunk
from kvstore.keys import ChunkKey, Namespace
from kvstore.tiers.redis import RedisTier, RedisTierConfig
from kvstore.tiers.redis_parts import CONNECTION_NAME, BufferPool, Fallback, PartReader, ConnectionAuth
from tests.support.redis import RedisClusterProcess, RedisServer, clients_named, redis_cluster, redis_server

__all__ = ["redis_cluster", "redis_server"]  # fixtures, imported for pytest

MiB = 1 << 20


def _rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)




async def test_reads_values_in_place_with_nil_and_empty(redis_server: RedisServer) -> None:
    r = redis_server.client()
    values = {"a": _rand(3 * MiB + 7, 1), "b": b"", "c": _rand(100, 2)}
    for k, v in values.items():
        r.set(k, v)
    bufs = {k: bytearray(len(v)) for k, v in values.items()} | {"missing": bytearray(10)}
    reader = PartReader(ConnectionAuth(), connect_timeout_s=5, max_idle=4)
    try:
        items = [(k, memoryview(b)) for k, b in bufs.items()]
        found = (await reader.read({redis_server.node: items}))[redis_server.node]
        assert found == [True, True, True, False]
        assert all(bytes(bufs[k]) == v for k, v in values.items())
        # The connection is kept and named; a second batch reuses it.
        assert clients_named(r, CONNECTION_NAME) == 1
        again = bytearray(len(values["a"]))
        assert (await reader.read({redis_server.node: [("a", memoryview(again))]}))[redis_server.node] == [True]
        assert bytes(again) == values["a"] and clients_named(r, CONNECTION_NAME) == 1
    finally:
        reader.close()


async def test_error_or_wrong_size_falls_back_and_keeps_the_stream_in_step(redis_server: RedisServer) -> None:
    r = redis_server.client()
    r.rpush("list", b"x")
    r.set("v", b"12345")
    reader = PartReader(ConnectionAuth(), connect_timeout_s=5, max_idle=4)
    node = redis_server.node
    try:
        with pytest.raises(Fallback, match="WRONGTYPE"):
            await reader.read({node: [("list", memoryview(bytearray(1)))]})
        wrong = bytearray(4)  # the value has 5 bytes: never written past the slot
        with pytest.raises(Fallback, match="WRONGSIZE"):
            await reader.read({node: [("v", memoryview(wrong))]})
        assert wrong == bytearray(4)
        # Same connection, next batch: replies still line up.
        ok = bytearray(5)
        assert (await reader.read({node: [("v", memoryview(ok))]}))[node] == [True] and ok == b"12345"
        assert clients_named(r, CONNECTION_NAME) == 1
    finally:
        reader.close()


async def test_auth_and_database(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "r", password="pa55") as server:
        r = server.client(db=3)
        r.set("k", b"in db 3")
        node = server.node
        good = PartReader(ConnectionAuth(password="pa55", db=3), connect_timeout_s=5, max_idle=1)
        bad = PartReader(ConnectionAuth(password="wrong"), connect_timeout_s=5, max_idle=1)
        try:
            buf = bytearray(7)
            assert (await good.read({node: [("k", memoryview(buf))]}))[node] == [True] and buf == b"in db 3"
            with pytest.raises(Fallback, match="refused the setup"):
                await bad.read({node: [("k", memoryview(bytearray(7)))]})
        finally:
            good.close()
            bad.close()


async def test_cancelled_read_closes_its_connection(redis_server: RedisServer) -> None:
    r = redis_server.client()
    value = _rand(8 * MiB, 3)
    r.set("big", value)
    node = redis_server.node
    reader = PartReader(ConnectionAuth(), connect_timeout_s=5, max_idle=4)
    try:
        assert (await reader.read({node: [("big", memoryview(bytearray(len(value))))]}))[node] == [True]
        redis_server.pause()  # the reply cannot come: the read waits until cancelled
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await reader.read({node: [("big", memoryview(bytearray(len(value))))]})
        finally:
            redis_server.resume()
        # The cancelled connection was aborted, not pooled: a fresh one reads correctly.
        buf = bytearray(len(value))
        assert (await reader.read({node: [("big", memoryview(buf))]}))[node] == [True]
        assert bytes(buf) == value
        await asyncio.sleep(0.1)
        assert clients_named(r, CONNECTION_NAME) == 1
    finally:
        reader.close()


async def test_pooled_connection_replaced_after_restart(redis_server: RedisServer) -> None:
    node = redis_server.node
    reader = PartReader(ConnectionAuth(), connect_timeout_s=5, max_idle=4)
    try:
        redis_server.client().set("k", b"before")
        buf = bytearray(6)
        assert (await reader.read({node: [("k", memoryview(buf))]}))[node] == [True]
        redis_server.kill()
        redis_server.start()
        redis_server.client().set("k", b"after!")
        assert (await reader.read({node: [("k", memoryview(buf))]}))[node] == [True] and buf == b"after!"
        redis_server.kill()
        with pytest.raises(ConnectionError):  # down: the error reaches the caller (the tier's breaker)
            await reader.read({node: [("k", memoryview(buf))]})
    finally:
        reader.close()


def test_buffer_pool_sizes_and_bound() -> None:
    pool = BufferPool(max_bytes=4 * MiB)
    a = pool.take(3 * MiB + 1)
    assert len(a) == 4 * MiB
    pool.give(a)
    assert pool.take(4 * MiB) is a
    pool.give(a)
    pool.give(bytearray(2 * MiB))  # over the bound: dropped
    assert len(pool.take(2 * MiB)) == 2 * MiB


# -- through the tier ------------------------------------------------------------------------------
def _key(i: int) -> ChunkKey:
    return ChunkKey(Namespace("acme", "m"), "0123456789abcdef", "p" + f"{i:064x}")


async def test_tier_reads_parts_through_the_reader(redis_server: RedisServer) -> None:
    tier = RedisTier("remote", RedisTierConfig(url=redis_server.url, part_bytes=1 * MiB, key_prefix="rp:"))
    await tier.open()
    try:
        data = _rand(5 * MiB + 3, 4)
        await tier.put(_key(1), Chunk.from_bytes(data))
        got = await tier.get(_key(1))
        assert got is not None and bytes(got.payload) == data
        got.release()
        assert tier.fallbacks == 0 and clients_named(redis_server.client(), CONNECTION_NAME) == 1
        # A part replaced by a value of another size: corrupt, a miss, the manifest removed.
        r = redis_server.client()
        part = sorted(k for k in r.keys("rp:p:*"))[0]
        r.set(part, b"short")
        assert await tier.get(_key(1)) is None
        assert tier.counters.corrupt == 1 and tier.fallbacks == 1
        assert r.exists(tier.manifest_key(_key(1))) == 0
    finally:
        await tier.close()


async def test_cluster_parts_come_from_every_master(redis_cluster: RedisClusterProcess) -> None:
    tier = RedisTier("remote", RedisTierConfig(url=redis_cluster.url, part_bytes=1 * MiB, key_prefix="rpc:"))
    await tier.open()
    try:
        chunks = {i: _rand(8 * MiB + i, 10 + i) for i in range(3)}
        for i, data in chunks.items():
            await tier.put(_key(i), Chunk.from_bytes(data))
        for i, data in chunks.items():
            got = await tier.get(_key(i))
            assert got is not None and bytes(got.payload) == data
            got.release()
        assert tier.fallbacks == 0
        assert all(clients_named(s.client(), CONNECTION_NAME) >= 1 for s in redis_cluster.nodes)
    finally:
        await tier.close()
