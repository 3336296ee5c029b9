"""NodePool: the reuse rules the part reader and writer share (their Redis tests cover the wire)."""

from __future__ import annotations

import asyncio

import pytest

from kvstore.tiers.redis_pool import Node, NodePool

A: Node = ("10.0.0.1", 6379)
B: Node = ("10.0.0.2", 6379)


class Conn:
    made = 0

    def __init__(self, node: Node) -> None:
        Conn.made += 1
        self.node = node
        self.id = Conn.made
        self.alive = True
        self.closed = False

    def usable(self) -> bool:
        return self.alive and not self.closed

    def close(self) -> None:
        self.closed = True


async def connect(node: Node) -> Conn:
    return Conn(node)


async def ident(conn: Conn) -> int:
    return conn.id


async def test_connections_are_reused_per_node_up_to_max_idle() -> None:
    pool: NodePool[Conn] = NodePool("test pool", connect, max_idle=1)
    first = await pool.run(A, ident)
    assert await pool.run(A, ident) == first  # reused
    assert await pool.run(B, ident) != first  # another node, another connection
    # Two at once: both go back, only one stays idle.
    results = await asyncio.gather(pool.run(A, _slow_ident), pool.run(A, _slow_ident))
    assert len(set(results)) == 2
    assert pool.idle(A) == 1


async def _slow_ident(conn: Conn) -> int:
    await asyncio.sleep(0.01)
    return conn.id


async def test_a_failed_or_cancelled_exchange_closes_its_connection() -> None:
    pool: NodePool[Conn] = NodePool("test pool", connect, max_idle=4)
    seen: list[Conn] = []

    async def fails(conn: Conn) -> None:
        seen.append(conn)
        raise ValueError("bad reply")

    with pytest.raises(ValueError):
        await pool.run(A, fails)
    assert seen[-1].closed and pool.idle(A) == 0

    async def hangs(conn: Conn) -> None:
        seen.append(conn)
        await asyncio.sleep(30)

    task = asyncio.create_task(pool.run(A, hangs))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen[-1].closed and pool.idle(A) == 0


async def test_a_dead_pooled_connection_is_replaced_once() -> None:
    pool: NodePool[Conn] = NodePool("test pool", connect, max_idle=4)
    tries: list[Conn] = []

    async def server_restarted(conn: Conn) -> int:
        tries.append(conn)
        if len(tries) == 1:
            raise ConnectionError("reset by peer")
        return conn.id

    first = await pool.run(A, ident)  # now pooled
    got = await pool.run(A, server_restarted)
    assert tries[0].id == first and tries[0].closed
    assert got == tries[1].id != first

    async def always_reset(conn: Conn) -> int:
        raise ConnectionError("reset by peer")

    # A fresh connection that fails is not retried.
    fresh: NodePool[Conn] = NodePool("test pool", connect, max_idle=4)
    made = Conn.made
    with pytest.raises(ConnectionError):
        await fresh.run(A, always_reset)
    assert Conn.made == made + 1


async def test_idle_connections_found_dead_are_dropped() -> None:
    pool: NodePool[Conn] = NodePool("test pool", connect, max_idle=4)
    first = await pool.run(A, ident)
    pool._idle[A][0].alive = False  # noqa: SLF001 - the server closed it while idle
    assert await pool.run(A, ident) != first


async def test_a_closed_pool_refuses_and_keeps_nothing() -> None:
    pool: NodePool[Conn] = NodePool("test pool", connect, max_idle=4)
    await pool.run(A, ident)
    pool.close()
    assert pool.idle(A) == 0
    with pytest.raises(ConnectionError, match="test pool is closed"):
        await pool.run(A, ident)
