"""Round trips through a real daemon: byte-exact, every path, every size.

Paths: ``Client`` and ``AsyncClient`` over the gRPC stream (``shm=False``)
and over shared memory (``shm=True``), and the raw generated stubs with
hand-built Put / Get streams.  Sizes straddle the 4 MiB frame (0, 1, 4095,
4 MiB + 1, 40 MiB).  Then the batched calls, lookup / exists / delete, and
concurrent clients (threads, asyncio tasks, processes) on distinct and
shared keys with every read checked.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import kvstore
from kvstore.chunk import checksum
from kvstore.errors import InvalidArgument
from kvstore.v1 import kvstore_pb2 as pb
from tests.server import MiB, blob, channel, data_frames, exists, header, key, raw_get, raw_put, stub
from tests.support.daemon import DaemonProcess, cpu_only

SIZES = [0, 1, 4095, 4 * MiB + 1, 40 * MiB]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with DaemonProcess(tmp_path_factory.mktemp("roundtrip"), cpu_only("512MiB")) as d:
        yield d


def _float_dtypes() -> list[torch.dtype]:
    out = [torch.bfloat16, torch.float16, torch.float32]
    out += [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]
    return out


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    return (torch.randn(shape, generator=g) * 8).to(dtype)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN payloads and -0.0 included)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and bytes(a.contiguous().view(torch.uint8).reshape(-1).numpy())
        == bytes(b.contiguous().view(torch.uint8).reshape(-1).numpy())
    )


# -- Client and AsyncClient, stream and shared memory ------------------------------
@pytest.mark.parametrize("shm", [False, True], ids=["stream", "shm"])
@pytest.mark.parametrize("size", SIZES)
def test_sync_client_round_trips_bytes(server: DaemonProcess, size: int, shm: bool) -> None:
    data = blob(size, size)
    k = key(size, model=f"sync-{shm}")
    with kvstore.Client(server.address, shm=shm) as c:
        assert c.put(k, data) == "cpu"
        assert c.uses_shm is shm
        got = c.get(k)
        assert got is not None
        assert got.meta.nbytes == size and got.meta.checksum == checksum(data)
        assert bytes(got.data) == data


@pytest.mark.parametrize(
    ("shm", "http2"), [(False, True), (False, False), (True, True)], ids=["stream-http2", "stream-grpcio", "shm"]
)
@pytest.mark.parametrize("size", SIZES)
async def test_async_client_round_trips_bytes(server: DaemonProcess, size: int, shm: bool, http2: bool) -> None:
    data = bytearray(blob(size + 1, size))
    k = key(size, model=f"async-{shm}-{http2}")
    async with kvstore.AsyncClient(server.address, shm=shm, http2_get=http2, http2_put=http2) as c:
        assert await c.put(k, data) == "cpu"
        assert c.uses_shm is shm
        data[:1] = b"\xff"[: len(data)]  # the stored copy must not alias the caller's buffer
        assert await c.get_bytes(k) == blob(size + 1, size)
        assert c.http2_puts == c.http2_gets == (1 if http2 and not shm else 0)


@pytest.mark.parametrize("shm", [False, True], ids=["stream", "shm"])
@pytest.mark.parametrize("dtype", [*_float_dtypes(), torch.uint8], ids=str)
def test_tensors_round_trip_bit_exact(server: DaemonProcess, dtype: torch.dtype, shm: bool) -> None:
    shapes = [(2, 2, 16, 4, 64), (3, 1), (0, 4), (4 * MiB // 2 + 7,)]
    with kvstore.Client(server.address, shm=shm) as c:
        for i, shape in enumerate(shapes):
            t = _tensor(dtype, shape, seed=i)
            k = key(i, model=f"tensor-{dtype}-{shm}".replace("torch.", ""))
            c.put(k, t)
            back = c.get_tensor(k)
            assert back is not None
            assert _same_tensor(t, back), (dtype, shape)
            got = c.get(k)
            assert got is not None and got.meta.dtype == str(dtype).removeprefix("torch.")
            assert got.meta.shape == shape


def test_non_contiguous_tensor_is_stored_in_c_order(server: DaemonProcess) -> None:
    t = _tensor(torch.bfloat16, (64, 48), seed=3).t()
    assert not t.is_contiguous()
    with kvstore.Client(server.address, shm=False) as c:
        c.put(key(1, model="noncontig"), t)
        back = c.get_tensor(key(1, model="noncontig"))
    assert back is not None and _same_tensor(t.contiguous(), back)


async def test_overwrite_replaces_value_and_size(server: DaemonProcess) -> None:
    k = key(7, model="overwrite")
    async with kvstore.AsyncClient(server.address, shm=False) as c:
        for n in (5 * MiB, 10, 3 * MiB, 0, 10):
            await c.put(k, blob(n, n))
            assert await c.get_bytes(k) == blob(n, n)


# -- batched calls, lookup, exists, delete ----------------------------------------------
@pytest.mark.parametrize("shm", [False, True], ids=["stream", "shm"])
async def test_put_many_get_many(server: DaemonProcess, shm: bool) -> None:
    model = f"batch-{shm}"
    sizes = [0, 1, 4095, 70_000, 4 * MiB + 1, 2 * MiB, 17]
    items: list[tuple[str, bytes | torch.Tensor]] = [(key(i, model=model), blob(i, n)) for i, n in enumerate(sizes)]
    t = _tensor(torch.float16, (8, 33), seed=5)
    items.append((key(99, model=model), t))
    async with kvstore.AsyncClient(server.address, shm=shm) as c:
        assert await c.put_many(items) == ["cpu"] * len(items)
        assert await c.put_many([]) == []
        wanted = [key(i, model=model) for i in range(len(sizes))]
        wanted.insert(3, key(1000, model=model))  # a missing key in the middle
        got = await c.get_many(wanted)
        assert got[3] is None
        del got[3]
        assert [bytes(g.data) for g in got if g is not None] == [blob(i, n) for i, n in enumerate(sizes)]
        assert all(g is not None for g in got)
        back = await c.get_tensor(key(99, model=model))
        assert back is not None and _same_tensor(t, back)
        assert await c.get_many([]) == []


async def test_lookup_counts_the_leading_run(server: DaemonProcess) -> None:
    model = "lookup"
    ks = [key(i, model=model, kind="p") for i in range(6)]
    async with kvstore.AsyncClient(server.address, shm=False) as c:
        await c.put_many([(k, blob(i, 100)) for i, k in enumerate(ks) if i != 3])
        res = await c.lookup(ks)
        assert (res.count, res.tiers) == (3, ["cpu"] * 3)  # stops at the first gap, not at the end
        assert (await c.lookup(ks[4:])).count == 2
        assert (await c.lookup([ks[3], *ks[:3]])).count == 0  # a missing first key: nothing
        assert (await c.lookup([])).count == 0
        assert await c.exists(ks) == [True, True, True, False, True, True]


async def test_delete_removes_and_reports_what_it_found(server: DaemonProcess) -> None:
    model = "delete"
    ks = [key(i, model=model) for i in range(3)]
    async with kvstore.AsyncClient(server.address, shm=False) as c:
        await c.put_many([(k, blob(i, 1000)) for i, k in enumerate(ks)])
        assert await c.delete([ks[0], key(50, model=model), ks[2]]) == [True, False, True]
        assert await c.exists(ks) == [False, True, False]
        assert await c.get(ks[0]) is None
        assert await c.get_bytes(ks[1]) == blob(1, 1000)
        assert await c.delete([ks[0]]) == [False]
        assert (await c.lookup(ks)).count == 0


@pytest.mark.parametrize("shm", [False, True], ids=["stream", "shm"])
def test_get_into_caller_tensor(server: DaemonProcess, shm: bool) -> None:
    data = blob(11, 5 * MiB + 3)
    k = key(11, model=f"into-{shm}")
    with kvstore.Client(server.address, shm=shm) as c:
        c.put(k, data)
        out = torch.zeros(6 * MiB, dtype=torch.uint8)
        meta = c.get_into(k, out)
        assert meta is not None and meta.nbytes == len(data)
        assert bytes(out[: len(data)].numpy()) == data
        assert not out[len(data) :].any()
        assert c.get_into(key(12, model=f"into-{shm}"), out) is None
        with pytest.raises(InvalidArgument, match="room for"):
            c.get_into(k, torch.zeros(MiB, dtype=torch.uint8))


def test_shared_memory_buffers_put_and_get_in_place(server: DaemonProcess) -> None:
    with kvstore.Client(server.address, shm=True) as c:
        buf = c.buffer(3 * MiB)
        assert buf is not None
        buf.copy_(torch.frombuffer(bytearray(blob(21, 3 * MiB)), dtype=torch.uint8))
        c.put(key(21, model="inplace"), buf)
        buf.zero_()
        assert c.get_into(key(21, model="inplace"), buf) is not None
        assert bytes(buf.numpy()) == blob(21, 3 * MiB)
        c.free_buffer(buf)


def test_segment_buffers_take_the_direct_path_from_the_calling_thread(server: DaemonProcess) -> None:
    """put of a segment tensor and get_into one skip the event loop (sync.py); same results."""
    with kvstore.Client(server.address, shm=True) as c:
        buf = c.buffer(2 * MiB + 5)
        assert buf is not None
        buf.copy_(torch.frombuffer(bytearray(blob(22, 2 * MiB + 5)), dtype=torch.uint8))
        assert c.put(key(22, model="direct"), buf) == "cpu"
        direct = c._blocking  # noqa: SLF001 - which path carried the call is under test
        assert direct is not None and not direct.broken
        buf.zero_()
        meta = c.get_into(key(22, model="direct"), buf)
        assert meta is not None and meta.nbytes == 2 * MiB + 5
        assert bytes(buf.numpy()) == blob(22, 2 * MiB + 5)
        assert c.get_into(key(23, model="direct"), buf) is None  # a miss
        small = c.buffer(MiB)
        assert small is not None
        with pytest.raises(InvalidArgument, match="room for"):
            c.get_into(key(22, model="direct"), small)
        # A lost connection: the call takes the ordinary path, the next reconnects.
        direct.close()
        buf.fill_(7)
        c.put(key(24, model="direct"), buf)
        assert c.get_bytes(key(24, model="direct")) == bytes([7]) * (2 * MiB + 5)
        assert c._blocking is not None and c._blocking is not direct  # noqa: SLF001
        c.free_buffer(buf)
        c.free_buffer(small)


def test_threads_share_the_direct_path(server: DaemonProcess) -> None:
    """Threads of one client using segment buffers at once: a busy channel sends the others
    through the event loop; every value comes back byte-exact."""
    errors: list[BaseException] = []
    with kvstore.Client(server.address, shm=True) as c:

        def work(w: int) -> None:
            try:
                buf = c.buffer(MiB)
                assert buf is not None
                for i in range(15):
                    data = blob(w * 100 + i, MiB)
                    buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
                    c.put(key(i, model=f"direct-t{w}"), buf)
                    buf.zero_()
                    assert c.get_into(key(i, model=f"direct-t{w}"), buf) is not None
                    assert bytes(buf.numpy()) == data
                c.free_buffer(buf)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


# -- raw generated stubs ---------------------------------------------------------------------
@pytest.mark.parametrize("frame_bytes", [0, 64 << 10, 1 << 20])
def test_raw_stub_put_and_get_streams(server: DaemonProcess, frame_bytes: int) -> None:
    """A plain gRPC client with default channel options (4 MiB receive limit)."""
    model = f"raw-{frame_bytes}"
    items = [(key(n, model=model), blob(n, n)) for n in SIZES]
    with channel(server.address) as ch:
        s = stub(ch)
        reply = raw_put(s, items)
        assert [(r.key, r.tier) for r in reply.results] == [(k, "cpu") for k, _ in items]
        wanted = [k for k, _ in items] + [key(12345, model=model)]
        got = raw_get(s, wanted, frame_bytes=frame_bytes)
        assert got == [d for _, d in items] + [None]


@pytest.mark.parametrize("frame_bytes", [64 << 10, 1 << 20])
def test_raw_stub_get_with_inline_data(server: DaemonProcess, frame_bytes: int) -> None:
    """GetRequest.inline_data: each found chunk's first frame rides in its header
    (GetHeader.data), the rest follows as data frames; a missing key's header has none."""
    model = f"inline-{frame_bytes}"
    sizes = [0, 5, frame_bytes - 1, frame_bytes, frame_bytes + 1, 3 * frame_bytes + 7]
    items = [(key(n, model=model), blob(n, n)) for n in sizes]
    with channel(server.address) as ch:
        s = stub(ch)
        raw_put(s, items)
        keys = [k for k, _ in items] + [key(999, model=model)]
        frames = list(s.Get(pb.GetRequest(keys=keys, frame_bytes=frame_bytes, inline_data=True), timeout=60))
        got: dict[int, bytes] = {}
        messages: dict[int, int] = {}
        index = -1
        for frame in frames:
            if frame.WhichOneof("part") == "header":
                index = frame.header.index
                messages[index] = 1
                if frame.header.found:
                    assert len(frame.header.data) == min(frame_bytes, frame.header.meta.nbytes)
                    got[index] = frame.header.data
                else:
                    assert frame.header.data == b""
            else:
                messages[index] += 1
                got[index] += frame.data
        assert [got.get(i) for i in range(len(keys))] == [d for _, d in items] + [None]
        # One message per frame: the header is no message of its own.
        assert [messages[i] for i in range(len(sizes))] == [max(1, -(-n // frame_bytes)) for n in sizes]
        # Without inline_data the header comes alone, as before.
        plain = list(s.Get(pb.GetRequest(keys=[keys[1]], frame_bytes=frame_bytes), timeout=60))
        assert plain[0].header.data == b"" and plain[1].data == blob(5, 5)


def test_raw_stub_uneven_frames_and_empty_data_frames(server: DaemonProcess) -> None:
    data = blob(31, 100_003)

    def frames() -> Iterator[pb.PutFrame]:
        yield header(key(31, model="uneven"), data)
        yield pb.PutFrame(data=data[:1])
        yield pb.PutFrame(data=b"")  # an empty data frame adds nothing
        yield pb.PutFrame(data=data[1:4097])
        yield from data_frames(data[4097:], 9973)

    with channel(server.address) as ch:
        s = stub(ch)
        assert [r.key for r in s.Put(frames(), timeout=30).results] == [key(31, model="uneven")]
        assert raw_get(s, [key(31, model="uneven")]) == [data]


def test_raw_stub_and_clients_interoperate(server: DaemonProcess) -> None:
    a, b = blob(41, 6 * MiB), blob(42, 3 * MiB)
    with channel(server.address) as ch, kvstore.Client(server.address, shm=False) as c:
        s = stub(ch)
        raw_put(s, [(key(41, model="interop"), a)])
        assert c.get_bytes(key(41, model="interop")) == a
        c.put(key(42, model="interop"), b)
        assert raw_get(s, [key(42, model="interop")], frame_bytes=1 << 20) == [b]
        assert exists(s, [key(41, model="interop"), key(42, model="interop"), key(43, model="interop")]) == [
            True,
            True,
            False,
        ]


# -- concurrency -------------------------------------------------------------------------------
def _value(k: str, writer: int, n: int) -> bytes:
    return random.Random(f"{k}/{writer}").randbytes(n)


def test_threads_on_distinct_and_shared_keys(server: DaemonProcess) -> None:
    """8 threads: 4 with their own Client, 4 sharing one; each writes its own keys and a
    shared set, and checks every read: own keys exact, shared keys one writer's whole value."""
    writers = 8
    shared = [key(i, model="threads-shared") for i in range(6)]
    sizes = [1000, 300_000, 2 * MiB + 5]
    errors: list[BaseException] = []
    start = threading.Barrier(writers)
    with kvstore.Client(server.address, shm=True) as common:

        def work(w: int) -> None:
            own = common if w % 2 else kvstore.Client(server.address, shm=w % 4 == 0)
            try:
                start.wait()
                for r in range(6):
                    mine = key(w * 100 + r, model="threads-own")
                    n = sizes[r % 3]
                    own.put(mine, _value(mine, w, n))
                    s = shared[(w + r) % len(shared)]
                    own.put(s, _value(s, w, n // 2))
                    assert own.get_bytes(mine) == _value(mine, w, n)
                    got = own.get_bytes(s)
                    assert got is not None
                    assert got in {_value(s, x, m // 2) for x in range(writers) for m in sizes}
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                errors.append(exc)
            finally:
                if own is not common:
                    own.close()

        threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]


async def test_asyncio_tasks_on_distinct_and_shared_keys(server: DaemonProcess) -> None:
    sizes = [10, 100_000, MiB + 1, 5 * MiB]
    shared = key(0, model="tasks-shared")
    async with kvstore.AsyncClient(server.address, shm=False) as one, kvstore.AsyncClient(
        server.address, shm=True
    ) as two:

        async def work(t: int) -> None:
            c = one if t % 2 else two
            for r in range(4):
                mine = key(t * 10 + r, model="tasks-own")
                await c.put(mine, _value(mine, t, sizes[(t + r) % 4]))
                await c.put(shared, _value(shared, t, 4096))
                assert await c.get_bytes(mine) == _value(mine, t, sizes[(t + r) % 4])
                got = await c.get_bytes(shared)
                assert got in {_value(shared, x, 4096) for x in range(16)}

        await asyncio.gather(*(work(t) for t in range(16)))
        assert all(await one.exists([key(t * 10 + r, model="tasks-own") for t in range(16) for r in range(4)]))


_WORKER = """
import sys, random, kvstore
addr, w, shm = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
fp = "0123456789abcdef"
def k(m, i): return f"t/{m}/{fp}/s{i:064x}"
def val(m, i, who, n): return random.Random(f"{m}/{i}/{who}").randbytes(n)
with kvstore.Client(addr, shm=shm) as c:
    for r in range(8):
        n = [1, 5000, 700_000, 4 * 1024 * 1024 + 1][r % 4]
        c.put(k("procs-own", w * 100 + r), val("own", r, w, n))
        c.put(k("procs-shared", r % 3), val("shared", r % 3, w, 2048))
        assert c.get_bytes(k("procs-own", w * 100 + r)) == val("own", r, w, n), "own key"
        got = c.get_bytes(k("procs-shared", r % 3))
        assert got in {val("shared", r % 3, x, 2048) for x in range(3)}, "shared key"
print("ok", w)
"""


def test_processes_on_distinct_and_shared_keys(server: DaemonProcess) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, server.address, str(w), str(w % 2)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for w in range(3)
    ]
    for w, p in enumerate(procs):
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode(errors="replace")
        assert out.decode().strip().endswith(f"ok {w}")


def test_raw_channel_default_options_reject_nothing_the_daemon_sends(server: DaemonProcess) -> None:
    """The daemon's default frames fit a default gRPC client (4 MiB receive limit)."""
    data = blob(51, 9 * MiB)
    with kvstore.Client(server.address, shm=False) as c:
        c.put(key(51, model="default-frames"), data)
    with channel(server.address) as ch:
        assert raw_get(stub(ch), [key(51, model="default-frames")]) == [data]
