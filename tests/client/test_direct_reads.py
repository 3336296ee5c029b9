"""Gets read by the client straight from a real daemon's shared CPU arena
(kvstore/tiers/shared_arena.py, the sync client's third shortcut).

What must hold: byte-exact reads of every dtype with the daemon's metadata;
another client's overwrite or delete is seen at once; reads count in the
daemon's statistics and refresh eviction order; a token file, the config
switch and a dead daemon each turn it off, and gets then still work; reads
racing puts, overwrites and evictions never return bytes of two values.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

import kvstore
from kvstore.admin.client import AdminClient
from kvstore.chunk import checksum
from kvstore.errors import KVStoreError
from kvstore.tiers.shared_arena import SUPPORTED
from tests.server import MiB, key
from tests.support.daemon import DaemonProcess, cpu_only

# The daemon offers its arena only on x86-64 (the seqlock relies on its memory ordering), so
# elsewhere there is nothing to test; CI and the development machine are x86-64 and run these.
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="the shared arena is offered on x86-64 only")

DTYPES = [torch.uint8, torch.int32, torch.float16, torch.bfloat16, torch.float32]
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.append(torch.float8_e4m3fn)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with DaemonProcess(tmp_path_factory.mktemp("direct"), cpu_only("256MiB")) as d:
        yield d


def values(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 255, shape, dtype=torch.uint8, generator=g).view(-1).view(dtype).reshape(shape[:-1] + (-1,))


def tier_hits(address: str, tier: str = "cpu") -> int:
    with AdminClient(address) as admin:
        return next(t.hits for t in admin.stats().tiers if t.name == tier)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reads_are_byte_exact_with_the_daemons_metadata(server: DaemonProcess, dtype: torch.dtype) -> None:
    value = values(1, (4, 2, 64, 512), dtype)
    with kvstore.Client(server.address) as c:
        k = key(hash(str(dtype)) % 1000, model="dtypes")
        c.put(k, value)
        out = torch.empty_like(value)
        meta = c.get_into(k, out)
        assert meta is not None and meta.dtype == str(dtype).removeprefix("torch.") and meta.shape == tuple(value.shape)
        assert torch.equal(out.view(torch.uint8), value.view(torch.uint8))
        got = c.get(k)
        assert got is not None and torch.equal(got.tensor().view(torch.uint8), value.view(torch.uint8))
        assert got.tensor().dtype == dtype
        assert c.direct_reads == 2  # neither went to the daemon


def test_get_many_mixes_direct_reads_and_misses(server: DaemonProcess) -> None:
    with kvstore.Client(server.address) as c:
        ks = [key(i, model="many") for i in range(4)]
        for i in (0, 2):
            c.put(ks[i], bytes([i]) * 70_000)
        c.get_into(ks[0], torch.empty(70_000, dtype=torch.uint8))  # attaches
        before = c.direct_reads
        got = c.get_many(ks)
        assert [None if g is None else bytes(g.data) for g in got] == [b"\x00" * 70_000, None, b"\x02" * 70_000, None]
        assert c.direct_reads == before + 2


def test_other_clients_overwrites_and_deletes_are_seen_at_once(server: DaemonProcess) -> None:
    k = key(7, model="visibility")
    out = torch.empty(MiB, dtype=torch.uint8)
    with kvstore.Client(server.address) as reader, kvstore.Client(server.address, shm=False) as writer:
        for version in range(5):
            writer.put(k, bytes([version]) * MiB)
            assert reader.get_into(k, out) is not None
            assert bool((out == version).all())
        writer.delete([k])
        assert reader.get_into(k, out) is None
        assert reader.direct_reads == 5  # every get, the first one too (it registers the segment first)


def test_reads_are_counted_and_keep_chunks_warm(tmp_path: Path) -> None:
    """LRU tier with room for three 20 MiB chunks: A, B, C stored; A read
    directly (the daemon sees no get); then D: B must be the one evicted."""
    cfg = cpu_only("64MiB")
    cfg["tiers"][0]["eviction"] = "lru"
    # Puts through the daemon: a direct write reserves the block of the next put
    # ahead (kvstore/server/direct_writes.py), which would evict one put early here.
    with DaemonProcess(tmp_path, cfg) as d, kvstore.Client(d.address, direct_writes=False) as c:
        a, b, cc, dd = (key(i, model="lru") for i in range(4))
        for k in (a, b, cc):
            c.put(k, torch.full((20 * MiB,), 1, dtype=torch.uint8))
        out = torch.empty(20 * MiB, dtype=torch.uint8)
        hits = tier_hits(d.address)
        for _ in range(3):
            assert c.get_into(a, out) is not None
            time.sleep(0.01)  # past TELL_EVERY_S: the next read tells the daemon
        assert c.direct_reads == 3
        c.put(dd, torch.full((20 * MiB,), 2, dtype=torch.uint8))
        assert c.exists([a, b, cc, dd]) == [True, False, True, True]
        assert tier_hits(d.address) >= hits + 2
        with AdminClient(d.address) as admin:
            assert admin.stats().hits >= 2  # the daemon's get metrics count them too


def test_a_token_file_turns_direct_reads_off(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": [{"token": "token-of-tenant-t-readwrite", "tenant": "t", "role": "readwrite"}]}))
    with DaemonProcess(tmp_path / "d", cpu_only("64MiB", token_file=str(tokens))) as d:
        with kvstore.Client(d.address, token="token-of-tenant-t-readwrite") as c:
            c.put(key(1), b"z" * 100_000)
            out = torch.empty(100_000, dtype=torch.uint8)
            for _ in range(2):
                assert c.get_into(key(1), out) is not None and bytes(out.numpy()) == b"z" * 100_000
            assert c.uses_shm and c.direct_reads == 0


@pytest.mark.parametrize("how", ["config", "client"])
def test_direct_reads_can_be_turned_off(tmp_path: Path, how: str) -> None:
    cfg = cpu_only("64MiB", shm_direct_reads=False) if how == "config" else cpu_only("64MiB")
    with DaemonProcess(tmp_path, cfg) as d, kvstore.Client(d.address, direct_reads=how != "client") as c:
        c.put(key(1), b"q" * 100_000)
        out = torch.empty(100_000, dtype=torch.uint8)
        for _ in range(2):
            assert c.get_into(key(1), out) is not None and bytes(out.numpy()) == b"q" * 100_000
        assert c.direct_reads == 0


def test_a_killed_daemons_memory_is_not_read(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, cpu_only("64MiB")) as d:
        with kvstore.Client(d.address, timeout_s=2, retries=0) as c:
            c.put(key(1), b"k" * 100_000)
            out = torch.empty(100_000, dtype=torch.uint8)
            assert c.get_into(key(1), out) is not None and c.direct_reads == 1
            d.send_signal(signal.SIGKILL)
            d.wait()
            with pytest.raises(KVStoreError):
                c.get_into(key(1), out)
            assert c.direct_reads == 0  # the arena was dropped with its channel


def test_reads_racing_puts_and_evictions_return_whole_values(tmp_path: Path) -> None:
    """A writer cycles 12 keys of 4 MiB through a 32 MiB LRU tier (evictions and
    reuse of freed blocks all the time), each put a new fill byte; a reader
    reads the same keys directly: every read is one whole value."""
    cfg = cpu_only("32MiB")
    cfg["tiers"][0]["eviction"] = "lru"
    ks = [key(i, model="race") for i in range(12)]
    stop = threading.Event()
    errors: list[BaseException] = []
    with DaemonProcess(tmp_path, cfg) as d:

        def write() -> None:
            try:
                with kvstore.Client(d.address) as w:
                    buf = w.buffer(4 * MiB)
                    assert buf is not None
                    i = 0
                    while not stop.is_set():
                        buf.fill_(i % 251 + 1)
                        w.put(ks[i % len(ks)], buf)
                        i += 1
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        t = threading.Thread(target=write)
        t.start()
        reads = 0
        try:
            with kvstore.Client(d.address) as r:
                out = torch.empty(4 * MiB, dtype=torch.uint8)
                deadline = time.monotonic() + 4
                i = 0
                while time.monotonic() < deadline:
                    meta = r.get_into(ks[i % len(ks)], out)
                    i += 1
                    if meta is None:
                        continue
                    reads += 1
                    first = int(out[0])
                    assert bool((out == first).all()), "a read returned bytes of two values"
                    assert checksum(out.numpy().tobytes()) == meta.checksum
                assert r.direct_reads > 50
        finally:
            stop.set()
            t.join()
        assert not errors, errors
        assert reads > 50


async def test_the_async_client_reads_directly_too(server: DaemonProcess) -> None:
    k = key(3, model="async")
    value = values(3, (2, 1024, 1024), torch.bfloat16)
    async with kvstore.AsyncClient(server.address) as c, kvstore.AsyncClient(server.address, direct_reads=False) as plain:
        await c.put(k, value)
        out = torch.empty_like(value)
        meta = await c.get_into(k, out)
        assert meta is not None and torch.equal(out.view(torch.uint8), value.view(torch.uint8))
        got = await c.get(k)
        assert got is not None and torch.equal(got.tensor().view(torch.uint8), value.view(torch.uint8))
        assert c.direct_reads == 2
        assert await plain.get_into(k, out) is not None and plain.direct_reads == 0
        await plain.delete([k])
        assert await c.get_into(k, out) is None  # withdrawn at once


def test_direct_reads_ready_maps_the_arena(server: DaemonProcess, tmp_path: Path) -> None:
    with kvstore.Client(server.address) as c:
        assert c.direct_reads_ready()  # registers, attaches, maps every page
        c.put(key(9, model="ready"), b"r" * 5000)
        assert c.get_bytes(key(9, model="ready")) == b"r" * 5000 and c.direct_reads == 1
    with kvstore.Client(server.address, shm=False) as c:
        assert not c.direct_reads_ready()
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": [{"token": "token-of-tenant-t-readwrite", "tenant": "t", "role": "readwrite"}]}))
    with DaemonProcess(tmp_path / "d", cpu_only("64MiB", token_file=str(tokens))) as d:
        with kvstore.Client(d.address, token="token-of-tenant-t-readwrite") as c:
            assert not c.direct_reads_ready() and c.uses_shm


async def test_async_direct_reads_ready(server: DaemonProcess) -> None:
    async with kvstore.AsyncClient(server.address) as c:
        assert await c.direct_reads_ready()


async def test_async_direct_reads_outlive_a_broken_control_channel(server: DaemonProcess) -> None:
    """The arena reader has its own connection: the control channel breaking (a
    cancelled call does that) sends ShmPut/ShmGet over gRPC, not gets to the daemon."""
    k = key(4, model="async-broken")
    async with kvstore.AsyncClient(server.address) as c:
        await c.put(k, b"b" * 70_000)
        assert await c.get_bytes(k) == b"b" * 70_000 and c.direct_reads == 1
        assert c._local.control is not None  # noqa: SLF001 - break what a cancelled call breaks
        c._local.control.close()  # noqa: SLF001
        await c.put(k, b"c" * 70_000)  # over gRPC now
        assert await c.get_bytes(k) == b"c" * 70_000 and c.direct_reads == 2
