"""Fault injection, each as an automated test against real processes and files.

* the daemon SIGKILLed during concurrent durable puts: every acknowledged put
  is on disk, byte-exact, after a restart;
* a disk that fills up (a real 8 MiB tmpfs, mounted in the daemon's own
  mount namespace): puts fail cleanly with RESOURCE_EXHAUSTED, reads go on,
  space comes back after eviction;
* a slow disk (every fdatasync takes 0.2 s): puts to the memory tier stay
  fast, durable puts wait for the disk, a full write-through queue blocks
  or drops as configured;
* clients that vanish mid-stream (SIGKILL during a Get): their stream slots
  and chunk references are released;
* wall-clock jumps: pins and deadlines use the monotonic clock only.

The remote tier killed and restarted is in tests/tiers/test_redis.py
(test_kill_and_restart_in_the_middle_of_a_workload,
test_store_keeps_serving_locally_when_redis_is_down).
"""

from __future__ import annotations

import ast
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

import kvstore
from kvstore.chunk import Chunk
from kvstore.errors import CapacityError
from kvstore.keys import ChunkKey, Namespace
from kvstore.store import TieredStore, TierSettings
from kvstore.tiers.cpu import CpuTier, CpuTierConfig
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.disk_config import DiskTierConfig
from kvstore.v1 import admin_pb2 as apb
from kvstore.v1 import admin_pb2_grpc as apb_grpc
from tests.server import SERVING, MiB, blob, health, key, raw_get, raw_put, rpc_error, stub
from tests.support.daemon import DaemonProcess, cpu_and_disk, cpu_only

ROOT = Path(__file__).resolve().parents[2]


# -- SIGKILL during concurrent durable puts -----------------------------------------------------
def test_sigkill_during_concurrent_durable_puts_loses_no_acknowledged_put(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    cfg = cpu_and_disk(disk, cpu="32MiB", disk="1GiB")
    d = DaemonProcess(tmp_path / "d", cfg).start()
    acked: set[int] = set()
    lock = threading.Lock()
    stop = threading.Event()
    size = lambda i: 4096 + (i * 7919) % (2 * MiB)  # noqa: E731

    def writer(w: int) -> None:
        with kvstore.Client(d.address, shm=w % 2 == 0, retries=0, timeout_s=10) as c:
            i = w
            while not stop.is_set():
                try:
                    c.put(key(i, tenant="crash"), blob(i, size(i)), durable=True)
                except kvstore.errors.KVStoreError:
                    return  # the daemon died under us: this put was not acknowledged
                with lock:
                    acked.add(i)
                i += 4

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    d.stop(signal.SIGKILL)  # mid-put: 4 clients have puts in flight
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acked) >= 40
    # Restart on the same disk: the cpu tier is empty, so every hit comes from disk.
    d2 = DaemonProcess(tmp_path / "d2", cfg).start()
    try:
        with grpc.insecure_channel(d2.address) as ch:
            keys = sorted(acked)
            got = raw_get(stub(ch), [key(i, tenant="crash") for i in keys], frame_bytes=1 << 20)
            lost = [i for i, g in zip(keys, got, strict=True) if g is None]
            assert not lost, f"acknowledged durable puts lost: {lost[:10]}"
            assert all(g == blob(i, size(i)) for i, g in zip(keys, got, strict=True))
    finally:
        d2.stop()
    assert not list(disk.rglob("*.tmp"))
    print(f"{len(acked)} acknowledged durable puts, all present after SIGKILL + restart")


# -- ENOSPC ----------------------------------------------------------------------------------
def _tmpfs_wrap(mountpoint: Path, size: str) -> list[str] | None:
    """A command prefix that runs the daemon in its own mount namespace with a
    ``size`` tmpfs on ``mountpoint``; None where this machine cannot."""
    if shutil.which("unshare") is None:
        return None
    script = 'mount -t tmpfs -o size="$1" kvstore-test "$2" && shift 2 && exec "$@"'
    wrap = ["unshare", "-rm", "sh", "-c", script, "sh", size, str(mountpoint)]
    probe = subprocess.run([*wrap, "true"], capture_output=True)
    return wrap if probe.returncode == 0 else None


def test_disk_full_puts_fail_cleanly_reads_go_on_space_comes_back(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    wrap = _tmpfs_wrap(mnt, "8m")
    if wrap is None:
        pytest.skip("cannot mount a tmpfs in a user namespace here (unshare -rm)")
    # A disk tier whose configured capacity (64 MiB) is larger than its file system (8 MiB).
    cfg = {
        "server": {"host": "127.0.0.1", "port": 0},
        "tiers": [{"name": "disk", "kind": "disk", "capacity": "64MiB", "path": str(mnt / "chunks")}],
    }
    with DaemonProcess(tmp_path / "d", cfg, wrap=wrap) as d, grpc.insecure_channel(d.address) as ch:
        s = stub(ch)
        stored = []
        for i in range(16):
            try:
                raw_put(s, [(key(i), blob(i, MiB))])
                stored.append(i)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
                assert "space" in (err.details() or "").lower(), err.details()
                break
        assert 3 <= len(stored) < 8, stored  # the file system, not the tier's capacity, ran out
        full = stored[-1] + 1
        # Once full: puts keep failing cleanly, reads all go on byte-exact, the daemon serves.
        rpc_error(lambda: raw_put(s, [(key(full), blob(full, MiB))]), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert raw_get(s, [key(i) for i in stored]) == [blob(i, MiB) for i in stored]
        assert raw_get(s, [key(full)]) == [None]  # nothing half-written is visible
        assert health(d.address) == SERVING
        # Evicting two chunks gives their space back: the put goes through.
        apb_grpc.AdminStub(ch).Evict(apb.EvictRequest(selector=apb.Selector(keys=[key(i) for i in stored[:2]])))
        raw_put(s, [(key(full), blob(full, MiB))])
        assert raw_get(s, [key(full), *(key(i) for i in stored[2:])]) == [
            blob(full, MiB), *(blob(i, MiB) for i in stored[2:])
        ]
    print(f"{len(stored)} MiB fitted on the 8 MiB file system before ENOSPC")


# -- slow disk ---------------------------------------------------------------------------------
NS = Namespace("slow", "disk/model")


def _k(i: int) -> ChunkKey:
    return ChunkKey(NS, "00000000c0ffee00", "p" + f"{i:064x}")


def _store(root: Path, on_full: str) -> TieredStore:
    cpu = CpuTier("cpu", CpuTierConfig(capacity_bytes=64 * MiB, pin=False, prefault=False))
    disk = DiskTier("disk", DiskTierConfig(path=root, capacity_bytes=1 << 30, io_threads=1))
    return TieredStore(
        [(cpu, TierSettings(on_evict="demote")),
         (disk, TierSettings(write_through=True, queue_depth=2, workers=1, on_full=on_full))]  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("on_full", ["drop", "block"])
async def test_slow_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_full: str) -> None:
    real = os.fdatasync
    slow_s = 0.2

    def slow_fdatasync(fd: int) -> None:
        time.sleep(slow_s)  # a disk that takes 0.2 s per flush
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
    async with _store(tmp_path / "disk", on_full) as store:
        # A durable put waits for the slow disk, and is on disk when it returns.
        start = time.monotonic()
        await store.put(_k(0), Chunk.from_bytes(blob(0, MiB)), durable=True)
        assert time.monotonic() - start >= slow_s
        assert "disk" in dict(store.holders(_k(0)))
        # A burst of 10 plain puts: with "drop" none waits for the disk (copies are
        # dropped and counted); with "block" the bounded queue pushes back.
        start = time.monotonic()
        for i in range(1, 11):
            await store.put(_k(i), Chunk.from_bytes(blob(i, MiB)))
        burst = time.monotonic() - start
        # Reads from memory are not held up by the disk either way.
        start = time.monotonic()
        for i in range(1, 11):
            chunk = await store.get(_k(i))
            assert chunk is not None
            with chunk:
                assert bytes(chunk.payload) == blob(i, MiB)
        assert time.monotonic() - start < slow_s
        dropped = store.stats().slots["disk"].write_through_dropped
        if on_full == "drop":
            assert burst < slow_s * 2 and dropped > 0, (burst, dropped)
        else:
            assert burst > slow_s * 5 and dropped == 0, (burst, dropped)  # 10 puts, queue of 2: they waited
        await store.flush()
        if on_full == "block":
            assert all("disk" in dict(store.holders(_k(i))) for i in range(11))


# -- clients vanishing mid-stream ---------------------------------------------------------------------
GETTER = """
import sys, grpc
from kvstore.v1 import kvstore_pb2 as pb, kvstore_pb2_grpc as pb_grpc
ch = grpc.insecure_channel(sys.argv[1], options=[("grpc.max_receive_message_length", 1 << 30)])
for i, frame in enumerate(pb_grpc.KVStoreStub(ch).Get(pb.GetRequest(keys=sys.argv[2:], frame_bytes=65536))):
    if i == 3:
        print("streaming", flush=True)
        sys.stdin.read()  # hold the stream open, reading nothing more, until killed
"""


def test_clients_killed_mid_get_release_their_slots_and_chunks(daemon_factory: Callable[..., DaemonProcess]) -> None:
    d = daemon_factory(cpu_only("64MiB", max_concurrent_streams=2, limits={"stream_wait_s": 3}))
    keys = [key(i) for i in range(8)]
    with grpc.insecure_channel(d.address) as ch:
        raw_put(stub(ch), [(k, blob(i, 4 * MiB)) for i, k in enumerate(keys)])
        for _ in range(2):  # two rounds of two clients: both slots taken each time
            procs = [
                subprocess.Popen([sys.executable, "-c", GETTER, d.address, *keys], cwd=ROOT,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for _ in range(2)
            ]
            try:
                for p in procs:
                    assert p.stdout is not None and p.stdout.readline().strip() == "streaming"
            finally:
                for p in procs:
                    p.kill()
                    p.wait(10)
        # Their slots came back (2 slots, 4 clients killed holding them) ...
        assert raw_get(stub(ch), keys[:1]) == [blob(0, 4 * MiB)]
        # ... and their references to the chunks: deleted chunks free the tier completely.
        assert all(stub(ch).Delete(kvstore.v1.kvstore_pb2.DeleteRequest(keys=keys), timeout=10).found)
        deadline = time.monotonic() + 10
        admin = apb_grpc.AdminStub(ch)
        while (used := admin.Stats(apb.StatsRequest(), timeout=10).tiers[0].used_bytes) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert used == 0
        assert health(d.address) == SERVING


# -- clock jumps -------------------------------------------------------------------------------------------
async def test_pin_leases_survive_wall_clock_jumps(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = CpuTier("cpu", CpuTierConfig(capacity_bytes=4 * MiB, pin=False, prefault=False))
    async with TieredStore([(cpu, TierSettings(on_evict="drop"))]) as store:
        await store.put(_k(0), Chunk.from_bytes(blob(0, MiB)))
        store.pin(_k(0), 5.0)
        for jump in (+365 * 86400.0, -365 * 86400.0):  # NTP step, VM resumed from a snapshot...
            real = time.time
            monkeypatch.setattr(time, "time", lambda j=jump: real() + j)
            monkeypatch.setattr(time, "time_ns", lambda j=jump: int((real() + j) * 1e9))
            for i in range(1, 8):  # 7 MiB through a 4 MiB tier: everything unpinned is evicted
                await store.put(_k(i), Chunk.from_bytes(blob(i, MiB)))
            assert store.pins.is_pinned(_k(0)) and store.pins.remaining(_k(0)) > 4.0
            chunk = await store.get(_k(0))
            assert chunk is not None
            with chunk:
                assert bytes(chunk.payload) == blob(0, MiB)
            monkeypatch.undo()
        # Full: the pinned chunk stays and a chunk that would need it evicted is refused cleanly.
        with pytest.raises(CapacityError):
            await store.put(_k(99), Chunk.from_bytes(blob(99, 4 * MiB)))


WALL_CLOCK = {("time", "time"), ("time", "time_ns"), ("datetime", "now"), ("datetime", "utcnow"), ("date", "today")}


def test_package_reads_no_wall_clock() -> None:
    """Leases, deadlines, breakers and rates use time.monotonic / perf_counter only:
    no call of time.time() or datetime.now() anywhere in the package."""
    found = []
    for folder in ("kvstore", "codecs", "connectors"):
        for path in (ROOT / folder).rglob("*.py"):
            if "/v1/" in path.as_posix():
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                    if (node.value.id, node.attr) in WALL_CLOCK:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value.id}.{node.attr}")
    assert not found, found
