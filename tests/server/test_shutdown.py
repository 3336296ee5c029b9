"""Graceful shutdown of a real daemon.

On SIGTERM (or SIGINT) the daemon stops taking RPCs, lets those in flight
finish, flushes its write-through queues and exits 0; every put it
acknowledged is on disk when it comes back with the same config.  A second
signal cancels what is still in flight.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import kvstore
from kvstore.errors import KVStoreError
from kvstore.v1 import kvstore_pb2 as pb
from tests.server import SERVING, MiB, blob, channel, health, key, meta_for, raw_get, stub
from tests.support.daemon import DaemonProcess, cpu_and_disk, cpu_only


def _wait_not_serving(d: DaemonProcess, timeout: float = 30.0) -> None:
    """Until the daemon's health check stops answering SERVING (it is shutting down)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if health(d.address) != SERVING:
                return
        except grpc.RpcError:
            return
        time.sleep(0.02)  # polling an outside observable: there is no event to wait on
    pytest.fail("the daemon still reports SERVING after the signal")


def test_sigterm_flushes_every_acknowledged_put_to_disk(tmp_path: Path) -> None:
    cfg = cpu_and_disk(tmp_path / "chunks", cpu="32MiB", disk="1GiB")
    sizes = [64 << 10, MiB, 3 * MiB + 1]
    acked: dict[str, bytes] = {}
    lock = threading.Lock()
    enough = threading.Event()
    errors: list[BaseException] = []

    with DaemonProcess(tmp_path / "first", cfg) as d:

        def writer(w: int) -> None:
            # Puts with durable=False: acknowledged once in the cpu tier, written to disk later.
            try:
                with kvstore.Client(d.address, shm=w % 2 == 0, retries=0, timeout_s=60) as c:
                    for i in range(10_000):
                        k = key(w * 100_000 + i, model="shutdown")
                        data = blob(w * 100_000 + i, sizes[i % len(sizes)])
                        try:
                            c.put(k, data)
                        except KVStoreError:
                            return  # the daemon is going away
                        with lock:
                            acked[k] = data
                            if len(acked) >= 80:
                                enough.set()
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        try:
            assert enough.wait(120), "the writers did not get 80 puts acknowledged"
            d.send_signal(signal.SIGTERM)
            assert d.wait(120) == 0, d.log()
        finally:
            for t in threads:
                t.join(120)
        log = d.log()
    assert not errors, errors
    assert "kvstore stopped" in log
    assert "Traceback" not in log, log

    # The same config again: every acknowledged put is there, from disk.
    with DaemonProcess(tmp_path / "second", cfg) as d2, kvstore.Client(d2.address, shm=False) as c:
        keys = sorted(acked)
        for i in range(0, len(keys), 64):
            batch = keys[i : i + 64]
            assert all(c.exists(batch)), [k for k, p in zip(batch, c.exists(batch), strict=True) if not p][:5]
        for k in keys:
            assert c.get_bytes(k) == acked[k], k


def test_sigint_exits_cleanly(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path / "d", cpu_only("16MiB")) as d:
        with kvstore.Client(d.address, shm=False) as c:
            c.put(key(1, model="sigint"), b"x" * 1000)
        d.send_signal(signal.SIGINT)
        assert d.wait(60) == 0, d.log()
        assert "kvstore stopped" in d.log()
        assert "Traceback" not in d.log()


@pytest.fixture
def held_put(tmp_path: Path) -> Iterator[tuple[DaemonProcess, threading.Event, threading.Event, bytes]]:
    """A cpu+disk daemon with one Put stream in flight, stopped inside its chunk
    until the test sets ``release``; ``sent`` is set once the partial chunk is out."""
    # One stream per client connection: while the test's Put holds it, a probe on the
    # same channel is refused at once, which is how the test knows the Put is in flight.
    cfg = cpu_and_disk(tmp_path / "chunks", cpu="32MiB", disk="256MiB", grace_s=60,
                       limits={"max_streams_per_client": 1})
    d = DaemonProcess(tmp_path / "d", cfg)
    d.start()
    yield d, threading.Event(), threading.Event(), blob(5, 3 * MiB)
    d.stop()


def _wait_in_flight(ch: grpc.Channel) -> None:
    """Until the daemon is serving the Put already open on ``ch``.

    The client's request thread runs ahead of the network, so "the frames were handed
    to grpc" does not mean the daemon has started the call; a call it has not started
    when it stops is refused, not in flight.  The probe, a Get on the same connection,
    is refused with RESOURCE_EXHAUSTED once the Put holds the connection's one stream.
    """
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            raw_get(stub(ch), [key(999, model="probe")])
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return
            raise
        time.sleep(0.02)  # polling an outside observable: there is no event to wait on
    pytest.fail("the daemon never started serving the Put")


def test_put_in_flight_at_sigterm_completes_and_is_kept(
    held_put: tuple[DaemonProcess, threading.Event, threading.Event, bytes], tmp_path: Path
) -> None:
    d, sent, release, data = held_put
    k = key(5, model="grace")

    def frames() -> Iterator[pb.PutFrame]:
        yield pb.PutFrame(header=pb.PutHeader(key=k, meta=meta_for(data)))
        yield pb.PutFrame(data=data[:MiB])
        sent.set()
        release.wait(60)
        yield pb.PutFrame(data=data[MiB:])

    with channel(d.address) as ch:
        future = stub(ch).Put.future(frames(), timeout=60)
        assert sent.wait(30)
        _wait_in_flight(ch)
        d.send_signal(signal.SIGTERM)
        _wait_not_serving(d)
        release.set()  # the stream in flight may finish during the grace period
        reply = future.result(timeout=60)
    assert [r.key for r in reply.results] == [k]
    assert d.wait(60) == 0, d.log()
    cfg = cpu_and_disk(tmp_path / "chunks", cpu="32MiB", disk="256MiB")
    with DaemonProcess(tmp_path / "again", cfg) as d2, channel(d2.address) as ch:
        assert raw_get(stub(ch), [k]) == [data]


def test_second_signal_cancels_streams_in_flight(
    held_put: tuple[DaemonProcess, threading.Event, threading.Event, bytes],
) -> None:
    d, sent, release, data = held_put

    def frames() -> Iterator[pb.PutFrame]:
        yield pb.PutFrame(header=pb.PutHeader(key=key(6, model="grace"), meta=meta_for(data)))
        yield pb.PutFrame(data=data[:MiB])
        sent.set()
        release.wait(60)

    with channel(d.address) as ch:
        future = stub(ch).Put.future(frames(), timeout=90)
        try:
            assert sent.wait(30)
            _wait_in_flight(ch)
            d.send_signal(signal.SIGTERM)
            _wait_not_serving(d)
            assert d.proc is not None and d.proc.poll() is None  # waiting for the stream (grace: 60 s)
            d.send_signal(signal.SIGTERM)
            # Well before the 60 s grace period ends.
            assert d.wait(30) == 0, d.log()
            with pytest.raises(grpc.RpcError):
                future.result(timeout=30)
        finally:
            release.set()
