"""The part writer and the order of a put (kvstore/tiers/redis_writes.py), on real servers.

The writer: the bytes it sends (a large value from the caller's memory, an
empty one), the replies it reads (status, bulk, nil, integer, error), AUTH +
SELECT at connect, a write cancelled midway (connection closed, never
reused), a restarted server (pooled connection replaced).  The tier: its
puts go through the writer on one server and on every master of a cluster;
the manifest script refuses a write whose parts are not all there; a node
that refuses a part between parts (an ACL) and a writer process killed with
SIGKILL in the middle of a put leave no readable chunk; parts and manifest
share the TTL in every placement.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kvstore.chunk import Chunk
from kvstore.errors import RemoteUnavailable
from kvstore.keys import ChunkKey, Namespace
from kvstore.tiers.breaker import BreakerConfig
from kvstore.tiers.redis import RedisTier, RedisTierConfig
from kvstore.tiers.redis_parts import Fallback, ConnectionAuth
from kvstore.tiers.redis_writes import PUT_MANIFEST_LUA, WRITER_CONNECTION_NAME, PartWriter
from tests.support.redis import RedisClusterProcess, RedisServer, clients_named, redis_cluster, redis_server

__all__ = ["redis_cluster", "redis_server"]  # fixtures, imported for pytest

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def _rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)




def _key(i: int) -> ChunkKey:
    return ChunkKey(Namespace("acme", "m"), "0123456789abcdef", "p" + f"{i:064x}")


async def _tier(url: str, **kw: object) -> RedisTier:
    kw.setdefault("part_bytes", 1 * MiB)
    kw.setdefault("breaker", BreakerConfig(failures=5, reset_s=0.2, max_reset_s=0.5))
    tier = RedisTier("remote", RedisTierConfig(url=url, **kw))  # type: ignore[arg-type]
    await tier.open()
    return tier


@contextmanager
def _set_only(servers: list[RedisServer], *patterns: str) -> Iterator[None]:
    """An ACL on each server: ``SET`` only of keys matching ``patterns``, anything else as before.

    Scripts keep running (so the manifest script can still write the
    manifest if a pattern allows it): only its own checks stop it.
    """
    selector = "(+set " + " ".join(f"~{p}" for p in patterns) + ")"
    for s in servers:
        s.client().execute_command("ACL", "SETUSER", "default", "-set", selector)
    try:
        yield
    finally:
        for s in servers:
            s.client().execute_command("ACL", "SETUSER", "default", "+@all", "clearselectors")


# -- the writer --------------------------------------------------------------------------------------
async def test_sends_values_from_memory_and_reads_every_reply_kind(redis_server: RedisServer) -> None:
    r = redis_server.client()
    big = _rand(3 * MiB + 7, 1)
    payload = memoryview(bytearray(big))[5:]  # a view into the middle of the caller's buffer
    writer = PartWriter(ConnectionAuth(), connect_timeout_s=5, max_idle=4)
    node = redis_server.node
    try:
        replies = (
            await writer.write(
                {
                    node: [
                        ["SET", "big", payload, "PX", "60000"],
                        ["SET", "empty", b""],
                        ["GET", "empty"],
                        ["GET", "missing"],
                        ["STRLEN", "big"],
                        ["SET", "big2", big, "GET"],
                    ]
                }
            )
        )[node]
        assert replies == [b"OK", b"OK", b"", None, len(big) - 5, None]
        assert r.get("big") == big[5:] and r.get("big2") == big and r.get("empty") == b""
        assert 0 < r.pttl("big") <= 60000
        # The connection is kept and named; the next batch reuses it.
        assert (await writer.write({node: [["GET", "empty"]]}))[node] == [b""]
        assert clients_named(r, WRITER_CONNECTION_NAME) == 1
    finally:
        writer.close()


async def test_error_reply_falls_back_and_keeps_the_stream_in_step(redis_server: RedisServer) -> None:
    r = redis_server.client()
    r.rpush("list", b"x")
    writer = PartWriter(ConnectionAuth(), connect_timeout_s=5, max_idle=4)
    node = redis_server.node
    try:
        with pytest.raises(Fallback, match="WRONGTYPE"):
            await writer.write({node: [["SET", "a", b"1"], ["INCR", "list"], ["SET", "b", b"2"]]})
        assert r.get("a") == b"1" and r.get("b") == b"2"  # pipelined: the rest ran
        # Same connection, next batch: replies still line up.
        assert (await writer.write({node: [["GET", "b"]]}))[node] == [b"2"]
        assert clients_named(r, WRITER_CONNECTION_NAME) == 1
    finally:
        writer.close()


async def test_auth_and_database(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "r", password="pa55") as server:
        node = server.node
        good = PartWriter(ConnectionAuth(password="pa55", db=3), connect_timeout_s=5, max_idle=1)
        bad = PartWriter(ConnectionAuth(password="wrong"), connect_timeout_s=5, max_idle=1)
        try:
            await good.write({node: [["SET", "k", b"in db 3"]]})
            assert server.client(db=3).get("k") == b"in db 3" and server.client().get("k") is None
            with pytest.raises(Fallback, match="refused the setup"):
                await bad.write({node: [["SET", "k", b"x"]]})
        finally:
            good.close()
            bad.close()


async def test_server_down_is_a_connection_error(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "r")  # not started: nothing listens on its port
    writer = PartWriter(ConnectionAuth(), connect_timeout_s=1, max_idle=1)
    try:
        with pytest.raises(ConnectionError):
            await writer.write({server.node: [["SET", "k", b"x"]]})
    finally:
        writer.close()


async def test_cancelled_write_closes_its_connection(redis_server: RedisServer) -> None:
    r = redis_server.client()
    node = redis_server.node
    value = _rand(32 * MiB, 3)
    writer = PartWriter(ConnectionAuth(), connect_timeout_s=5, max_idle=4)
    try:
        await writer.write({node: [["SET", "warm", b"x"]]})
        redis_server.pause()  # the socket buffers fill up: the send waits until cancelled
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await writer.write({node: [["SET", "big", value], ["SET", "after", b"1"]]})
        finally:
            redis_server.resume()
        await asyncio.sleep(0.2)
        # The server dropped the half-received command and never saw the next one.
        assert r.exists("big", "after") == 0
        # The cancelled connection was closed, not pooled: a fresh one writes correctly.
        await writer.write({node: [["SET", "big", value]]})
        assert r.get("big") == value
        assert clients_named(r, WRITER_CONNECTION_NAME) == 1
    finally:
        writer.close()


async def test_pooled_connection_replaced_after_restart(redis_server: RedisServer) -> None:
    node = redis_server.node
    writer = PartWriter(ConnectionAuth(), connect_timeout_s=5, max_idle=4)
    try:
        await writer.write({node: [["SET", "k", b"before"]]})
        redis_server.kill()
        redis_server.start()
        await writer.write({node: [["SET", "k", b"after"]]})
        assert redis_server.client().get("k") == b"after"
    finally:
        writer.close()


# -- the manifest script -----------------------------------------------------------------------------
def test_manifest_script_writes_only_when_every_part_is_there(redis_server: RedisServer) -> None:
    r = redis_server.client()
    r.set("p0", b"a")
    with pytest.raises(Exception, match="KVSTORE_PART_MISSING"):
        r.eval(PUT_MANIFEST_LUA, 3, "m", "p0", "p1", b"manifest", "5000")
    assert r.exists("m") == 0
    r.set("p1", b"b")
    assert r.eval(PUT_MANIFEST_LUA, 3, "m", "p0", "p1", b"manifest", "5000") is None
    assert 0 < r.pttl("m") <= 5000
    assert r.eval(PUT_MANIFEST_LUA, 1, "m", b"newer", "0") == b"manifest"  # returns what it replaced
    assert r.get("m") == b"newer" and r.pttl("m") == -1  # TTL 0: none


# -- through the tier ----------------------------------------------------------------------------------
async def test_tier_puts_through_the_writer(redis_server: RedisServer) -> None:
    tier = await _tier(redis_server.url, key_prefix="w:")
    try:
        for i, size in enumerate((1 * MiB, 5 * MiB + 3)):
            data = _rand(size, i)
            await tier.put(_key(i), Chunk.from_bytes(data))
            got = await tier.get(_key(i))
            assert got is not None and bytes(got.payload) == data
            got.release()
        assert tier.write_fallbacks == 0 and clients_named(redis_server.client(), WRITER_CONNECTION_NAME) == 1
    finally:
        await tier.close()


@pytest.mark.parametrize("placement", ["spread", "together"])
async def test_cluster_puts_through_the_writer(redis_cluster: RedisClusterProcess, placement: str) -> None:
    tier = await _tier(redis_cluster.url, key_prefix=f"wc{placement}:", cluster_parts=placement)
    try:
        chunks = {i: _rand(8 * MiB + i, 10 + i) for i in range(3)}
        for i, data in chunks.items():
            await tier.put(_key(i), Chunk.from_bytes(data))
        for i, data in chunks.items():
            got = await tier.get(_key(i))
            assert got is not None and bytes(got.payload) == data
            got.release()
        assert tier.write_fallbacks == 0
        writers = [clients_named(s.client(), WRITER_CONNECTION_NAME) for s in redis_cluster.nodes]
        assert all(writers) if placement == "spread" else any(writers)
    finally:
        await tier.close()


async def test_part_refused_between_parts_leaves_no_readable_chunk(redis_server: RedisServer) -> None:
    """One server: part 0 is stored, parts 1 and 2 are refused (an ACL), so the
    manifest script writes nothing — on the part writer and on redis-py alike."""
    tier = await _tier(redis_server.url, key_prefix="acl:")
    r = redis_server.client()
    try:
        with _set_only([redis_server], "acl:m:*", "acl:p:*:0"):
            with pytest.raises(RemoteUnavailable, match="NoPermissionError"):
                await tier.put(_key(1), Chunk.from_bytes(_rand(3 * MiB, 1)))
        assert tier.write_fallbacks == 1  # the writer handed the error to redis-py, which reported it
        assert [k.decode().rsplit(":", 1)[1] for k in r.keys("acl:p:*")] == ["0"]
        assert r.exists(tier.manifest_key(_key(1))) == 0
        assert await tier.get(_key(1)) is None and await tier.contains_many([_key(1)]) == [False]
        # The ACL lifted, the same tier writes again.
        data = _rand(3 * MiB, 2)
        await tier.put(_key(1), Chunk.from_bytes(data))
        got = await tier.get(_key(1))
        assert got is not None and bytes(got.payload) == data
    finally:
        await tier.close()


async def test_cluster_node_refusing_parts_leaves_no_readable_chunk(redis_cluster: RedisClusterProcess) -> None:
    """Spread parts: one master refuses its parts; the others store theirs, but
    the manifest is never sent."""
    tier = await _tier(redis_cluster.url, key_prefix="aclc:")
    victim = redis_cluster.nodes[1]
    data = _rand(12 * MiB, 5)
    try:
        with _set_only([victim], "aclc:m:*"):  # the manifest could land there: allowed
            with pytest.raises(RemoteUnavailable):
                await tier.put(_key(2), Chunk.from_bytes(data))
        stored = {i: len(n.client().keys("aclc:p:*")) for i, n in enumerate(redis_cluster.nodes)}
        assert stored[1] == 0 and stored[0] + stored[2] > 0, stored
        assert not any(n.client().keys("aclc:m:*") for n in redis_cluster.nodes)
        assert await tier.get(_key(2)) is None and await tier.contains_many([_key(2)]) == [False]
    finally:
        await tier.close()


async def test_cluster_manifest_refused_leaves_parts_invisible(redis_cluster: RedisClusterProcess) -> None:
    """Every part stored, the manifest refused: nothing readable."""
    tier = await _tier(redis_cluster.url, key_prefix="dies:")
    try:
        with _set_only(redis_cluster.nodes, "dies:p:*"):
            with pytest.raises(RemoteUnavailable):
                await tier.put(_key(11), Chunk.from_bytes(_rand(3 * MiB, 11)))
        assert sum(len(n.client().keys("dies:p:*")) for n in redis_cluster.nodes) == 3  # the parts are there
        assert await tier.contains_many([_key(11)]) == [False]
        assert await tier.get(_key(11)) is None
        assert tier.counters.errors == 1
    finally:
        await tier.close()


_CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    from kvstore.chunk import Chunk
    from kvstore.keys import ChunkKey, Namespace
    from kvstore.tiers.redis import RedisTier, RedisTierConfig

    async def main() -> None:
        tier = RedisTier("child", RedisTierConfig(url=sys.argv[1], key_prefix=sys.argv[2], part_bytes=1 << 20,
                                                  timeout_s=30))
        await tier.open()
        chunk = Chunk.from_bytes(os.urandom(int(sys.argv[3])))
        key = ChunkKey(Namespace("acme", "m"), "0123456789abcdef", "p" + "0" * 64)
        await tier.put(key, chunk)
        print("done", flush=True)

    asyncio.run(main())
    """
)


def _kill_writer_midway(url: str, prefix: str, servers: list[RedisServer]) -> int:
    """Run a put of 128 MiB in a child process; SIGKILL it once 8 parts are stored; the parts left."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, url, prefix, str(128 * MiB)], env=env, stdout=subprocess.PIPE
    )
    clients = [s.client() for s in servers]
    try:
        deadline = time.monotonic() + 60
        while sum(len(c.keys(f"{prefix}p:*")) for c in clients) < 8:
            assert child.poll() is None, "the writer finished before it could be killed"
            assert time.monotonic() < deadline, "the writer stored no parts"
            time.sleep(0.001)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()
    time.sleep(0.1)
    return sum(len(c.keys(f"{prefix}p:*")) for c in clients)


async def test_writer_killed_midway_leaves_no_readable_chunk(redis_server: RedisServer) -> None:
    left = _kill_writer_midway(redis_server.url, "kill:", [redis_server])
    assert 8 <= left < 128
    r = redis_server.client()
    assert r.exists(f"kill:m:{{{_key(0)}}}") == 0
    tier = await _tier(redis_server.url, key_prefix="kill:")
    try:
        assert await tier.get(_key(0)) is None and await tier.contains_many([_key(0)]) == [False]
        assert all(0 < r.pttl(k) for k in r.keys("kill:p:*"))  # they expire
    finally:
        await tier.close()


async def test_cluster_writer_killed_midway_leaves_no_readable_chunk(redis_cluster: RedisClusterProcess) -> None:
    left = _kill_writer_midway(redis_cluster.url, "killc:", redis_cluster.nodes)
    assert 8 <= left < 128
    assert not any(n.client().keys("killc:m:*") for n in redis_cluster.nodes)
    tier = await _tier(redis_cluster.url, key_prefix="killc:")
    try:
        assert await tier.get(_key(0)) is None and await tier.contains_many([_key(0)]) == [False]
    finally:
        await tier.close()


@pytest.mark.parametrize("where", ["standalone", "spread", "together"])
async def test_parts_and_manifest_share_the_ttl(
    where: str, redis_server: RedisServer, redis_cluster: RedisClusterProcess
) -> None:
    servers = [redis_server] if where == "standalone" else redis_cluster.nodes
    url = redis_server.url if where == "standalone" else redis_cluster.url
    placement = "together" if where == "together" else "spread"
    for ttl_s in (20, 0):
        prefix = f"ttl{where}{ttl_s}:"
        tier = await _tier(url, key_prefix=prefix, ttl_s=ttl_s, cluster_parts=placement)
        try:
            await tier.put(_key(3), Chunk.from_bytes(_rand(5 * MiB, 3)))
            assert tier.write_fallbacks == 0
        finally:
            await tier.close()
        pttls = {k: c.pttl(k) for c in (s.client() for s in servers) for k in c.keys(f"{prefix}*")}
        manifest = [t for k, t in pttls.items() if b":m:" in k]
        parts = [t for k, t in pttls.items() if b":p:" in k]
        assert len(manifest) == 1 and len(parts) == 5
        if not ttl_s:
            assert manifest == [-1] and set(parts) == {-1}  # nothing expires: maxmemory decides
            continue
        # The manifest expires first, its parts a little later (the put's time budget): never a
        # manifest without its parts.
        budget_ms = tier.config.budget(5 * MiB) * 1000 + 1000
        assert 0 < manifest[0] <= ttl_s * 1000
        assert all(manifest[0] <= p <= ttl_s * 1000 + budget_ms for p in parts)
