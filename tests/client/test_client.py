"""Client behaviour against real daemons: argument checks, frame sizes, typed
errors, deadlines, the shared-memory path (fallback, cleanup, a daemon that
restarts), and lifecycle."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import kvstore
from kvstore.errors import Closed, DeadlineExceeded, InvalidArgument, KVStoreError, RemoteUnavailable
from tests.server import MiB, blob, key
from tests.support.daemon import DaemonProcess, cpu_only


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with DaemonProcess(tmp_path_factory.mktemp("client"), cpu_only("256MiB")) as d:
        yield d


# -- arguments -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "what"),
    [
        ({"frame_bytes": 1024}, "frame_bytes must be in"),
        ({"frame_bytes": (64 << 20) + 1}, "frame_bytes must be in"),
        ({"timeout_s": 0}, "timeout_s must be positive"),
        ({"retries": -1}, "retries must be >= 0"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, object], what: str) -> None:
    with pytest.raises(InvalidArgument, match=what):
        kvstore.AsyncClient("127.0.0.1:1", **kwargs)  # type: ignore[arg-type]


def test_bad_values_and_keys_are_refused_before_sending(server: DaemonProcess) -> None:
    with kvstore.Client(server.address, shm=False) as c:
        with pytest.raises(InvalidArgument, match="a value must be bytes"):
            c.put(key(1), "a string")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="dtype complex64 are not supported"):
            c.put(key(1), torch.zeros(4, dtype=torch.complex64))
        with pytest.raises(InvalidArgument, match="ChunkKey or its string form"):
            c.get(b"t/m/x/y")  # type: ignore[arg-type]
        assert c.exists([key(1)]) == [False]


def test_values_of_every_buffer_type(server: DaemonProcess) -> None:
    data = blob(3, 10_000)
    with kvstore.Client(server.address, shm=False) as c:
        for i, value in enumerate([data, bytearray(data), memoryview(data), torch.frombuffer(bytearray(data), dtype=torch.uint8)]):
            c.put(key(i, model="types"), value)
            assert c.get_bytes(key(i, model="types")) == data
        # A memoryview of another format is sent as its bytes.
        floats = memoryview(bytearray(data[:8000])).cast("f")
        c.put(key(9, model="types"), floats)
        assert c.get_bytes(key(9, model="types")) == data[:8000]


def test_get_many_with_repeated_keys(server: DaemonProcess) -> None:
    with kvstore.Client(server.address, shm=False) as c:
        c.put(key(1, model="repeat"), b"one")
        got = c.get_many([key(1, model="repeat"), key(2, model="repeat"), key(1, model="repeat")])
        assert [None if g is None else bytes(g.data) for g in got] == [b"one", None, b"one"]


# -- frame sizes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("frame_bytes", [4096, 64 << 10, 16 * MiB, 64 * MiB])
async def test_any_allowed_client_frame_size_works(server: DaemonProcess, frame_bytes: int) -> None:
    """The client may choose frames from 4 KiB to 64 MiB; the daemon (1 MiB frames) takes them all
    (through grpcio: the HTTP/2 connection sends within the listener's frames)."""
    n = 65 * MiB + 3 if frame_bytes >= 16 * MiB else 300_001
    async with kvstore.AsyncClient(
        server.address, shm=False, frame_bytes=frame_bytes, http2_get=False, http2_put=False
    ) as c:
        await c.put(key(frame_bytes, model="frames"), blob(frame_bytes, n))
        assert await c.get_bytes(key(frame_bytes, model="frames")) == blob(frame_bytes, n)


def test_default_client_against_a_daemon_with_small_frames(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """The daemon's frame_bytes bounds what it sends, not what it accepts."""
    d = daemon_factory(cpu_only("64MiB", frame_bytes="64KiB"))
    with kvstore.Client(d.address, shm=False) as c:
        c.put(key(1, model="small-frames"), blob(1, 10 * MiB))
        assert c.get_bytes(key(1, model="small-frames")) == blob(1, 10 * MiB)


# -- unreachable daemons and deadlines ------------------------------------------------------------------------
def test_nothing_listening_is_remote_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free now, and nobody listens
    start = time.monotonic()
    with kvstore.Client(f"127.0.0.1:{port}", shm=False, timeout_s=5, retries=2, backoff_s=0.01) as c:
        with pytest.raises(RemoteUnavailable):
            c.exists([key(1)])
    assert time.monotonic() - start < 10


def test_a_silent_peer_hits_the_deadline() -> None:
    """A port that accepts connections and never speaks: the call ends at its deadline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        start = time.monotonic()
        with kvstore.Client(f"127.0.0.1:{s.getsockname()[1]}", shm=False, timeout_s=1.0) as c:
            with pytest.raises((DeadlineExceeded, RemoteUnavailable)):
                c.put(key(1), b"x")
        assert 0.9 < time.monotonic() - start < 10


# -- shared memory ---------------------------------------------------------------------------------------------
def test_auto_falls_back_to_the_stream_when_the_daemon_refuses_shm(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    d = daemon_factory(cpu_only("64MiB", shm=False))
    with kvstore.Client(d.address) as c:  # shm="auto"
        c.put(key(1, model="noshm"), blob(1, 5 * MiB))
        assert not c.uses_shm
        assert c.get_bytes(key(1, model="noshm")) == blob(1, 5 * MiB)
        assert c.buffer(MiB) is None
    with kvstore.Client(d.address, shm=True) as c:
        with pytest.raises(KVStoreError, match="shared-memory path is disabled"):
            c.put(key(2, model="noshm"), b"x")


def test_segment_is_unlinked_once_registered(server: DaemonProcess) -> None:
    """A crashed client leaves nothing in /dev/shm: the name goes as soon as the daemon mapped it."""
    with kvstore.Client(server.address, shm=True) as c:
        c.put(key(1, model="unlink"), b"x" * 5000)
        assert c.uses_shm
        seg = c._aio._local.segment  # noqa: SLF001 - the segment's file name is what is under test
        assert seg is not None and not seg.path.exists()
        assert c.get_bytes(key(1, model="unlink")) == b"x" * 5000


def test_shm_client_survives_a_daemon_restart(tmp_path: Path) -> None:
    """The new daemon does not know the old segment: the client notices, uses the
    stream for that call and registers a new segment for the next."""
    first = DaemonProcess(tmp_path / "a", cpu_only("64MiB")).start()
    port = first.port
    try:
        c = kvstore.Client(first.address, shm=True, timeout_s=20)
        c.put(key(1, model="restart"), blob(1, 2 * MiB))
        assert c.uses_shm
    finally:
        first.stop()
    with c, DaemonProcess(tmp_path / "b", cpu_only("64MiB", port=port)) as second:
        assert second.port == port
        c.put(key(2, model="restart"), blob(2, 2 * MiB))
        assert c.get_bytes(key(2, model="restart")) == blob(2, 2 * MiB)
        out = torch.empty(2 * MiB, dtype=torch.uint8)
        assert c.get_into(key(2, model="restart"), out) is not None
        assert bytes(out.numpy()) == blob(2, 2 * MiB)
        assert c.uses_shm  # a new segment


def test_get_into_a_shared_memory_buffer_of_the_wrong_size(server: DaemonProcess) -> None:
    with kvstore.Client(server.address, shm=True) as c:
        c.put(key(1, model="small-out"), blob(1, 3 * MiB))
        small = c.buffer(MiB)
        assert small is not None
        with pytest.raises(InvalidArgument, match="room for"):
            c.get_into(key(1, model="small-out"), small)
        c.free_buffer(small)
        with pytest.raises(InvalidArgument, match="does not live in this shared-memory segment"):
            c.free_buffer(torch.empty(10, dtype=torch.uint8))
        with pytest.raises(InvalidArgument, match="contiguous CPU tensor"):
            c.get_into(key(1, model="small-out"), torch.empty(8, 8, dtype=torch.uint8).t())


# -- lifecycle -------------------------------------------------------------------------------------------------
def test_close_is_idempotent_and_a_closed_client_says_so(server: DaemonProcess) -> None:
    c = kvstore.Client(server.address, shm=True)
    c.put(key(1, model="closed"), b"x")
    c.close()
    c.close()
    with pytest.raises(Closed, match="closed"):
        c.get(key(1, model="closed"))


async def test_async_client_as_context_manager(server: DaemonProcess) -> None:
    async with kvstore.AsyncClient(server.address, shm=True) as c:
        await c.put(key(1, model="ctx"), b"abc")
        assert await c.get_bytes(key(1, model="ctx")) == b"abc"
    c2 = kvstore.AsyncClient(server.address, shm=False)
    try:
        assert await c2.exists([key(1, model="ctx")]) == [True]
    finally:
        await c2.close()
