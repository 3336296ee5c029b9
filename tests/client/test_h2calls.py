"""The AsyncClient's gets and puts over its own HTTP/2 connection to a real daemon's
listener (kvstore/client/h2calls.py): byte-exact values of every kind of call,
concurrent calls (one on the connection, the others through grpcio), the
switches, a cancelled call that leaves the caller's tensor alone afterwards,
and a connection that the daemon drops."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import kvstore
from kvstore.chunk import Chunk
from tests.server import MiB, blob, key
from tests.support.daemon import DaemonProcess, cpu_only


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with DaemonProcess(tmp_path_factory.mktemp("h2calls"), cpu_only("512MiB")) as d:
        yield d


async def test_every_call_goes_over_http2_byte_exact(server: DaemonProcess) -> None:
    async with kvstore.AsyncClient(server.address, shm=False) as c:
        k = [key(i, model="aio-h2") for i in range(6)]
        assert await c.put(k[0], blob(0, 3 * MiB + 1)) == "cpu"
        tensors = [torch.randn(64, 1000, dtype=dt) for dt in (torch.float16, torch.bfloat16, torch.float32)]
        await c.put_many(list(zip(k[1:4], tensors, strict=True)))
        chunk = Chunk.from_bytes(blob(4, 70_001), dtype="int8", shape=(70_001,))
        await c.put_chunks([(k[4], chunk.meta, chunk.payload)])
        assert c.http2_puts == 3
        assert await c.get_bytes(k[0]) == blob(0, 3 * MiB + 1)
        got = await c.get_many([k[1], k[5], k[2], k[3], k[4]])
        assert got[1] is None
        for g, t in zip([got[0], got[2], got[3]], tensors, strict=True):
            assert g is not None and torch.equal(g.tensor(), t)
        assert got[4] is not None and got[4].meta == chunk.meta and bytes(got[4].data) == blob(4, 70_001)
        out = torch.empty(3 * MiB + 1, dtype=torch.uint8)
        meta = await c.get_into(k[0], out)
        assert meta is not None and bytes(out.numpy()) == blob(0, 3 * MiB + 1)
        assert c.http2_gets == 3


async def test_concurrent_calls_share_the_connection_or_go_through_grpcio(server: DaemonProcess) -> None:
    async with kvstore.AsyncClient(server.address, shm=False) as c:
        keys = [key(i, model="aio-h2-many") for i in range(16)]
        await asyncio.gather(*(c.put(k, blob(i, MiB + i)) for i, k in enumerate(keys)))
        for _ in range(3):
            got = await asyncio.gather(*(c.get_bytes(k) for k in keys))
            assert got == [blob(i, MiB + i) for i in range(16)]
        assert 1 <= c.http2_gets < 48 and 1 <= c.http2_puts < 16  # one call at a time on the connection


async def test_the_switches_turn_it_off(server: DaemonProcess) -> None:
    async with kvstore.AsyncClient(server.address, shm=False, http2_get=False, http2_put=False) as c:
        await c.put(key(1, model="aio-h2-off"), blob(1, MiB))
        assert await c.get_bytes(key(1, model="aio-h2-off")) == blob(1, MiB)
        assert c.h2 is None and c.http2_gets == c.http2_puts == 0
    async with kvstore.AsyncClient(server.address, shm=False, http2_get=False) as c:
        await c.put(key(2, model="aio-h2-off"), blob(2, MiB))
        assert await c.get_bytes(key(2, model="aio-h2-off")) == blob(2, MiB)
        assert c.http2_puts == 1 and c.http2_gets == 0


async def test_a_cancelled_get_into_leaves_the_tensor_alone_afterwards(server: DaemonProcess) -> None:
    """Cancelled mid-way (a caller's deadline), the call's connection is shut and the worker
    thread has returned before the cancellation reaches the caller: nothing writes into
    ``out`` after that.  The next calls are served."""
    n = 96 * MiB
    async with kvstore.AsyncClient(server.address, shm=False) as c:
        k = key(1, model="aio-h2-cancel")
        await c.put(k, blob(1, n))
        cancelled = 0
        for _ in range(5):
            out = torch.zeros(n, dtype=torch.uint8)
            try:
                await asyncio.wait_for(c.get_into(k, out), timeout=0.002)
            except TimeoutError:
                cancelled += 1
                before = out.clone()
                await asyncio.sleep(0.3)
                assert torch.equal(out, before), "the cancelled get went on writing into the caller's tensor"
        assert cancelled >= 1  # a 96 MiB get takes tens of ms here
        assert await c.get_bytes(k) == blob(1, n)
        assert c.http2_gets >= 1


async def test_a_daemon_restarted_on_the_same_port_is_found_again(tmp_path: Path) -> None:
    """The connection to the old daemon's listener is gone and the new one listens on
    another port: the next calls find the broken connection, learn the new listener's
    port through the gRPC port, and go over HTTP/2 again."""
    first = DaemonProcess(tmp_path / "a", cpu_only("64MiB")).start()
    port = first.port
    try:
        c = kvstore.AsyncClient(first.address, shm=False, retries=5, backoff_s=0.2)
        await c.put(key(1, model="aio-h2-restart"), b"before")
        assert await c.get_bytes(key(1, model="aio-h2-restart")) == b"before"
        served = c.http2_gets
        assert served >= 1
    finally:
        first.stop()
    try:
        with DaemonProcess(tmp_path / "b", cpu_only("64MiB", port=port)) as second:
            assert second.port == port
            await c.put(key(2, model="aio-h2-restart"), b"after")
            for _ in range(3):
                assert await c.get_bytes(key(2, model="aio-h2-restart")) == b"after"
            assert c.http2_gets > served
    finally:
        await c.close()


async def test_a_caller_deadline_ends_a_call_to_a_silent_peer_at_once() -> None:
    """A port that accepts connections and never speaks, a client deadline of 60 s, and a
    caller's own of 0.5 s (as the peer tier bounds its calls): the cancellation shuts the
    connection, so the caller gets its TimeoutError then, not when the client's runs out."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        async with kvstore.AsyncClient(f"127.0.0.1:{s.getsockname()[1]}", shm=False, timeout_s=60) as c:
            for call in (c.get_bytes(key(1)), c.put(key(1), b"x")):
                start = time.monotonic()
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(call, timeout=0.5)
                assert time.monotonic() - start < 5
