"""The flaws of the peers that kvstore must not have.

LMCache's shared-memory server acknowledges stores that it then drops when
memory is full, and a few random bytes on its port stop it serving for good
while its health check still says healthy; its raw-TCP server stores an
empty entry for a truncated put and has no capacity limit.  Here, against a
real daemon:

* a daemon filled far past its capacity acknowledges a put only once it is
  readable (and it is, right after the ack) or refuses it with
  RESOURCE_EXHAUSTED: when the chunk is larger than the tier, or the room it
  needs is pinned (admin API) or being read; what it holds never adds up to
  more than its capacity (by ``exists`` and by the admin ``Stats``);
* garbage on its port (random bytes, HTTP/1, a truncated HTTP/2 preface,
  connections left open mid-frame) leaves it serving, and its health check
  tells the truth;
* truncated puts store nothing: see ``test_bad_input.py``
  (``test_stream_ending_inside_a_chunk_stores_nothing``,
  ``test_cancelled_put_stores_nothing_of_the_unfinished_chunk``,
  ``test_client_killed_mid_put_stores_nothing``).
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

import kvstore
from kvstore.errors import CapacityError
from kvstore.v1 import kvstore_pb2 as pb
from tests.server import SERVING, MiB, blob, channel, exists, health, key, raw_get, raw_put, rpc_error, stub
from tests.support.daemon import DaemonProcess, cpu_only

CAPACITY = 8 * MiB


@pytest.fixture
def small(daemon_factory: Callable[..., DaemonProcess]) -> DaemonProcess:
    """A daemon whose only tier holds 8 MiB."""
    return daemon_factory(cpu_only("8MiB"))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with DaemonProcess(tmp_path_factory.mktemp("garbage"), cpu_only("64MiB")) as d:
        yield d


def _held_bytes(c: kvstore.Client, sizes: dict[str, int]) -> int:
    """Bytes of the chunks the daemon says it has, out of those ever put."""
    keys = list(sizes)
    return sum(sizes[k] for k, present in zip(keys, c.exists(keys), strict=True) if present)


# -- capacity ---------------------------------------------------------------------------------------
def test_every_ack_is_readable_right_after_it_and_capacity_holds(small: DaemonProcess) -> None:
    rng = random.Random(7)
    sizes: dict[str, int] = {}
    with kvstore.Client(small.address, shm=False) as c:
        for i in range(80):  # about 20 times the capacity
            n = rng.choice([1, 4095, rng.randrange(MiB), rng.randrange(3 * MiB), rng.randrange(7 * MiB)])
            k = key(i, model="fill")
            assert c.put(k, blob(i, n)) == "cpu"
            sizes[k] = n
            assert c.get_bytes(k) == blob(i, n), f"put {i} acknowledged but not readable"
            assert _held_bytes(c, sizes) <= CAPACITY
    from kvstore.admin.client import AdminClient

    with AdminClient(small.address) as admin:
        (cpu,) = admin.stats().tiers
        assert 0 < cpu.used_bytes <= cpu.capacity_bytes == CAPACITY


def test_eviction_keeps_the_newest_and_refuses_what_cannot_fit(small: DaemonProcess) -> None:
    with kvstore.Client(small.address, shm=True) as c:
        ks = [key(i, model="halves") for i in range(12)]
        for i, k in enumerate(ks):
            c.put(k, blob(i, 5 * MiB))  # each more than half the tier: only one fits
            assert c.get_bytes(k) == blob(i, 5 * MiB)
            assert c.exists(ks[: i + 1]) == [False] * i + [True]
        # Bigger than the whole tier: refused, and nothing it held is given up for it.
        with pytest.raises(CapacityError, match="larger than every tier"):
            c.put(key(99, model="halves"), blob(99, CAPACITY + 1))
        assert c.exists([key(99, model="halves"), ks[-1]]) == [False, True]
        assert c.get_bytes(ks[-1]) == blob(11, 5 * MiB)


def test_full_of_pinned_chunks_refuses_instead_of_dropping(small: DaemonProcess) -> None:
    """Pins (admin API) keep chunks from eviction; a put that needs their room is refused."""
    from kvstore.admin.client import AdminClient, selector

    pinned = [key(i, model="pinned") for i in range(3)]
    new = key(9, model="pinned")
    with kvstore.Client(small.address, shm=False) as c, AdminClient(small.address) as admin:
        for i, k in enumerate(pinned):
            c.put(k, blob(i, 2 * MiB))
        assert admin.pin(selector(pinned), ttl_s=300).pinned == 3
        with pytest.raises(CapacityError, match="pinned"):
            c.put(new, blob(9, 3 * MiB))  # 2 MiB free, the rest pinned
        assert c.exists([*pinned, new]) == [True, True, True, False]
        assert [c.get_bytes(k) for k in pinned] == [blob(i, 2 * MiB) for i in range(3)]
        (cpu,) = admin.stats().tiers
        assert cpu.pinned_bytes == 6 * MiB and cpu.used_bytes <= cpu.capacity_bytes == CAPACITY
        # Small enough for the free room: accepted, and readable.
        c.put(key(10, model="pinned"), blob(10, MiB))
        assert c.get_bytes(key(10, model="pinned")) == blob(10, MiB)
        admin.unpin(selector(pinned))
        c.put(new, blob(9, 3 * MiB))
        assert c.get_bytes(new) == blob(9, 3 * MiB)
        assert admin.stats().tiers[0].used_bytes <= CAPACITY


def test_full_of_chunks_in_use_refuses_instead_of_dropping(small: DaemonProcess) -> None:
    """A chunk being read cannot be freed; a put that needs its room is refused
    (RESOURCE_EXHAUSTED), not acknowledged and dropped, and succeeds once the read ends.

    The read is held open by a client that stops reading after the header, with
    a small HTTP/2 window, so the daemon's Get stream waits inside the chunk."""
    held, new = key(1, model="inuse"), key(2, model="inuse")
    with channel(small.address) as ch:
        raw_put(stub(ch), [(held, blob(1, 5 * MiB))])
    slow = channel(
        small.address,
        ("grpc.http2.lookahead_bytes", 65536),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.max_receive_message_length", 64 * MiB),
    )
    reading = stub(slow).Get(pb.GetRequest(keys=[held], frame_bytes=MiB), timeout=60)
    try:
        first = next(reading)
        assert first.header.found
        with channel(small.address) as ch:
            s = stub(ch)
            rpc_error(
                lambda: raw_put(s, [(new, blob(2, 5 * MiB))]),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "cannot fit",
                "in use",
            )
            assert exists(s, [new]) == [False]
    finally:
        reading.cancel()
        slow.close()
    with channel(small.address) as ch:
        s = stub(ch)
        # Once the daemon has seen the read cancelled it frees the chunk, and the put fits.
        deadline = time.monotonic() + 30
        while True:
            try:
                raw_put(s, [(new, blob(2, 5 * MiB))])
                break
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)  # no event to wait on: the cancel reaches the daemon on its own
        assert raw_get(s, [new]) == [blob(2, 5 * MiB)]


def test_concurrent_flood_never_serves_wrong_bytes_or_overflows(small: DaemonProcess) -> None:
    sizes: dict[str, int] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []
    refused = [0]

    def flood(w: int) -> None:
        rng = random.Random(w)
        try:
            with kvstore.Client(small.address, shm=w % 2 == 0) as c:
                for i in range(25):
                    k = key(w * 1000 + i, model="flood")
                    n = rng.randrange(1, 3 * MiB)
                    try:
                        c.put(k, blob(w * 1000 + i, n))
                    except CapacityError:
                        with lock:
                            refused[0] += 1  # the room was in use by other readers: an honest refusal
                        continue
                    with lock:
                        sizes[k] = n
                    got = c.get_bytes(k)  # others may have evicted it already, but never corrupt it
                    assert got is None or got == blob(w * 1000 + i, n)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=flood, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert len(sizes) + refused[0] == 100
    with kvstore.Client(small.address, shm=False) as c:
        assert _held_bytes(c, sizes) <= CAPACITY
        for k, present in zip(list(sizes), c.exists(list(sizes)), strict=True):
            if present:
                i = int(k.rsplit("/", 1)[1][1:], 16)
                assert c.get_bytes(k) == blob(i, sizes[k])


# -- garbage on the port ------------------------------------------------------------------------------------
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _garbage() -> Iterator[tuple[str, bytes]]:
    rng = random.Random(1)
    for n in (1, 7, 100, 4096, 65536):
        yield f"random {n} bytes", rng.randbytes(n)
    yield "HTTP/1.1 request", b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n"
    yield "HTTP/1.1 POST with a body", b"POST /kvstore.v1.KVStore/Put HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
    yield "truncated HTTP/2 preface", PREFACE[:10]
    yield "preface then garbage", PREFACE + rng.randbytes(1000)
    # A SETTINGS frame header announcing 16 MiB of payload that never comes.
    yield "preface then a truncated frame", PREFACE + b"\xff\xff\xff\x04\x00\x00\x00\x00\x00" + b"\x00" * 10
    yield "a TLS ClientHello to a plaintext port", bytes.fromhex("160301002a0100002603035a") + rng.randbytes(40)


def _send(address: str, payload: bytes, *, close: bool = True) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    try:
        sock.sendall(payload)
        if close:
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):  # whatever the daemon answers, until it closes
                pass
    except OSError:
        pass  # the daemon hung up or reset the connection: an answer too
    if close:
        sock.close()
    return sock


def _serving(address: str, i: int) -> None:
    assert health(address) == SERVING
    assert health(address, "kvstore.v1.KVStore") == SERVING
    with kvstore.Client(address, shm=False, retries=0, timeout_s=10) as c:
        c.put(key(i, model="garbage"), blob(i, MiB + i))
        assert c.get_bytes(key(i, model="garbage")) == blob(i, MiB + i)


def test_garbage_on_the_port_does_not_stop_the_daemon(shared: DaemonProcess) -> None:
    for i, (what, payload) in enumerate(_garbage()):
        _send(shared.address, payload)
        try:
            _serving(shared.address, i)
        except (AssertionError, kvstore.KVStoreError, grpc.RpcError) as exc:
            pytest.fail(f"after {what}: {exc!r}\n{shared.log()[-2000:]}")
    assert "Traceback" not in shared.log()


def test_connections_left_open_mid_frame_do_not_block_others(shared: DaemonProcess) -> None:
    stuck = [_send(shared.address, payload, close=False) for _, payload in _garbage()]
    stuck += [_send(shared.address, b"", close=False) for _ in range(20)]  # silent connections
    try:
        _serving(shared.address, 100)
    finally:
        for sock in stuck:
            sock.close()
    _serving(shared.address, 101)


def test_many_garbage_connections_at_once(shared: DaemonProcess) -> None:
    rng = random.Random(3)
    payloads = [rng.randbytes(rng.randrange(1, 2000)) for _ in range(100)]
    threads = [threading.Thread(target=_send, args=(shared.address, p)) for p in payloads]
    for t in threads:
        t.start()
    _serving(shared.address, 200)  # while they arrive
    for t in threads:
        t.join()
    _serving(shared.address, 201)
