"""Client side of the LMCache peer benchmark; runs in the peer virtualenv.

Run with the python of the virtualenv made by ``benchmarks/peers/install.sh``
against an LMCache server that is already running (``kvstore.bench.peers``
starts and stops the servers)::

    .venv-peers/bin/python kvstore/bench/lmcache_worker.py bench \\
        --mode tcp --host 127.0.0.1 --port 6555 --sizes-mib 1,4,16,32 \\
        --iterations 10 --warmup 2
    .venv-peers/bin/python kvstore/bench/lmcache_worker.py finding \\
        --name mp-wedged-but-healthy --host 127.0.0.1 --port 6556 --http-port 6557

Every result is one JSON object on its own line of stdout: one per value size
for ``bench``, one per scenario for ``finding``; a failure prints
``{"error": ...}`` and exits 1. Everything else (LMCache's logging) goes to
stderr. This script must not import kvstore: the peer virtualenv does not
have it, and LMCache's numpy pin must stay out of kvstore's environment.

Workloads, one client, one value per operation, every key fresh:

* ``--mode tcp``: LMCache's legacy raw-TCP server (``lmcache_server``)
  through its client class ``LMCServerConnector``. Its PUT has no reply, so
  a put is timed as PUT followed by EXIST (the first moment the client knows
  the value is stored). A get is one GET.
* ``--mode mp``: LMCache's multiprocess server (``lmcache server``) through
  the classes behind ``lmcache bench server``: an ``EngineDrivenTransferContext``
  registered over ZMQ with a paged KV cache whose chunk (256 tokens) is
  exactly one value; the bytes go through the server's shared-memory pool
  when it was started with ``--shm-name``. A put is one STORE; a get is a
  LOOKUP (plus waiting for its prefetch) followed by a RETRIEVE, which is what
  an engine does to read a chunk back.

Every get is checked byte for byte against what was put.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import struct
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

MIB = 1 << 20
# One value is one LMCache chunk: 8 KV heads x 128 dims x fp16 x (K, V) is
# 4 KiB per token and layer, so a 256-token chunk is 1 MiB per layer.
_HEADS = 8
_HEAD_DIM = 128
_BLOCK_TOKENS = 16
_HELLO_TOKEN = 9906
_SOURCE_SLOTS = 4

# Keep the JSON channel clean: LMCache and its dependencies log (and may
# print) freely; only _OUT writes to the real stdout.
_OUT = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
os.environ.setdefault("LMCACHE_DISABLE_BANNER", "1")
os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")


def emit(obj: dict[str, Any]) -> None:
    _OUT.write(json.dumps(obj) + "\n")
    _OUT.flush()


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    xs = sorted(samples)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(
    peer: str,
    size: int,
    put_s: list[float],
    get_s: list[float],
    mismatches: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    return {
        "peer": peer,
        "size_bytes": size,
        "iterations": len(put_s),
        "put_gbps": size * len(put_s) / sum(put_s) / 1e9,
        "get_gbps": size * len(get_s) / sum(get_s) / 1e9,
        "put_p50_ms": percentile(put_s, 50) * 1e3,
        "put_p99_ms": percentile(put_s, 99) * 1e3,
        "get_p50_ms": percentile(get_s, 50) * 1e3,
        "get_p99_ms": percentile(get_s, 99) * 1e3,
        "validated": mismatches == 0,
        "mismatches": mismatches,
        **extra,
    }


# --------------------------------------------------------------------------
# Raw-TCP server (lmcache_server) through LMCServerConnector
# --------------------------------------------------------------------------


class TCPClient:
    """LMCServerConnector plus the local CPU backend it allocates from."""

    def __init__(self, host: str, port: int, pool_bytes: int) -> None:
        import torch
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.connector.lm_connector import LMCServerConnector
        from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

        config = LMCacheEngineConfig.from_legacy(chunk_size=256, backend="cpu")
        # Room for the source values plus the values being received.
        config.max_local_cpu_size = max(0.25, pool_bytes / (1 << 30))
        metadata = LMCacheMetadata(
            model_name="kvbench",
            world_size=1,
            local_world_size=1,
            worker_id=0,
            local_worker_id=0,
            kv_dtype=torch.uint8,
            kv_shape=(1, 2, 256, 1, 1),
        )
        self.backend = LocalCPUBackend(config, metadata)
        self.loop = asyncio.new_event_loop()
        self.conn = LMCServerConnector(host, port, self.loop, self.backend)
        self.base = random.randrange(1 << 40, 1 << 48)

    def key(self, i: int) -> Any:
        import torch
        from lmcache.utils import CacheEngineKey

        return CacheEngineKey("kvbench", 1, 0, self.base + i, torch.uint8)

    def value(self, size: int) -> Any:
        """A memory object of ``size`` random bytes in LMCache's KV format."""
        import torch
        from lmcache.v1.memory_management import MemoryFormat

        if size % 512:
            raise ValueError(f"value size must be a multiple of 512 bytes, got {size}")
        obj = self.backend.allocate(
            torch.Size([2, 1, 256, size // 512]), torch.uint8, MemoryFormat.KV_2LTD
        )
        if obj is None:
            raise RuntimeError("LMCache local CPU backend could not allocate a value")
        obj.tensor.view(-1).copy_(torch.randint(0, 256, (size,), dtype=torch.uint8))
        return obj

    def put(self, key: Any, obj: Any) -> None:
        self.loop.run_until_complete(self.conn.put(key, obj))

    def exists(self, key: Any) -> bool:
        return bool(self.loop.run_until_complete(self.conn.exists(key)))

    def get(self, key: Any) -> Any:
        return self.loop.run_until_complete(self.conn.get(key))

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


def bench_tcp(args: argparse.Namespace) -> None:
    import torch

    largest = max(args.sizes_mib) * MIB
    client = TCPClient(args.host, args.port, (_SOURCE_SLOTS + 2) * largest)
    counter = 0
    try:
        for size_mib in args.sizes_mib:
            size = size_mib * MIB
            sources = [client.value(size) for _ in range(_SOURCE_SLOTS)]
            put_s: list[float] = []
            get_s: list[float] = []
            mismatches = 0
            for i in range(args.warmup + args.iterations):
                counter += 1
                key = client.key(counter)
                src = sources[i % _SOURCE_SLOTS]
                t0 = time.perf_counter()
                client.put(key, src)
                stored = client.exists(key)
                t1 = time.perf_counter()
                got = client.get(key)
                t2 = time.perf_counter()
                if not stored or got is None or not torch.equal(got.tensor, src.tensor):
                    mismatches += 1
                if got is not None:
                    got.ref_count_down()
                if i >= args.warmup:
                    put_s.append(t1 - t0)
                    get_s.append(t2 - t1)
            for src in sources:
                src.ref_count_down()
            emit(
                summarize(
                    "lmcache-tcp",
                    size,
                    put_s,
                    get_s,
                    mismatches,
                    {"put_timed_as": "PUT+EXIST"},
                )
            )
    finally:
        client.close()


# --------------------------------------------------------------------------
# Multiprocess server (lmcache server) through its engine-driven client
# --------------------------------------------------------------------------


class MPClient:
    """One simulated engine worker of the MP server, sized for one value size.

    ``size`` bytes per chunk: the registered paged KV cache has ``size / 1 MiB``
    layers and ``slots`` chunk-sized block ranges; slot ``slots - 1`` is the
    scratch range gets are retrieved into.
    """

    # Instance ids are per process on the server side; a reused id with a
    # different KV layout is not re-checked there, so never reuse one.
    _next_instance = random.randrange(1 << 20, 1 << 30)

    def __init__(
        self,
        host: str,
        port: int,
        size: int,
        slots: int,
        timeout_s: float = 10.0,
        req_client: Any = None,
    ) -> None:
        import torch
        import zmq
        from lmcache.utils import EngineType
        from lmcache.v1.multiprocess.group_view import EngineGroupInfo
        from lmcache.v1.multiprocess.transfer_context import EngineDrivenTransferContext
        from lmcache.v1.multiprocess.transport.factory import RequestClientFactory

        self.timeout_s = timeout_s
        self._own_ctx = None
        if req_client is None:
            self._own_ctx = zmq.Context()
            self._own_ctx.setsockopt(zmq.LINGER, 0)
            req_client = RequestClientFactory.create(
                f"tcp://{host}:{port}", context=self._own_ctx
            )
        self.rc = req_client
        self.chunk = int(self.rc.get_chunk_size().result(timeout=timeout_s))
        per_layer = self.chunk * 2 * _HEADS * _HEAD_DIM * 2
        if size % per_layer:
            raise ValueError(
                f"MP value size must be a multiple of {per_layer} bytes "
                f"(one layer of a {self.chunk}-token chunk), got {size}"
            )
        self.layers = size // per_layer
        self.blocks_in_chunk = self.chunk // _BLOCK_TOKENS
        self.slots = slots
        num_blocks = self.blocks_in_chunk * slots
        self.kv = {
            f"layer.{i}": torch.randn(
                (2, num_blocks, _BLOCK_TOKENS, _HEADS, _HEAD_DIM), dtype=torch.float16
            )
            for i in range(self.layers)
        }
        MPClient._next_instance += 1
        self.instance_id = MPClient._next_instance
        self.model = f"kvbench-{size}"
        self.tc = EngineDrivenTransferContext(self.instance_id, self.rc)
        self.tc.register(
            self.kv,
            self.model,
            1,
            self.blocks_in_chunk,
            timeout_s,
            layout_hints={"kv_layout": "NHD"},
            engine_group_infos=[
                EngineGroupInfo(
                    engine_group_id=0,
                    layer_indices=tuple(range(self.layers)),
                    tokens_per_block=_BLOCK_TOKENS,
                )
            ],
            engine_type=EngineType.VLLM,
        )
        self.transfer = type(self.tc.engine_driven_context).__name__
        self.base = random.randrange(1 << 20, 1 << 30)
        self._rid = 0

    def _key(self, i: int, worker_id: int | None, request_id: str | None = None) -> Any:
        from lmcache.v1.multiprocess.custom_types import IPCCacheServerKey

        self._rid += 1
        return IPCCacheServerKey(
            model_name=self.model,
            world_size=1,
            worker_id=worker_id,
            num_kv_readers=1,
            token_ids=(self.base + i,) + (_HELLO_TOKEN,) * (self.chunk - 1),
            start=0,
            end=self.chunk,
            request_id=request_id or f"kvbench-{self.instance_id}-{self._rid}",
        )

    def blocks(self, slot: int) -> list[list[int]]:
        first = slot * self.blocks_in_chunk
        return [list(range(first, first + self.blocks_in_chunk))]

    def slot_bytes(self, slot: int) -> Any:
        import torch

        b = slot * self.blocks_in_chunk
        return torch.stack(
            [t[:, b : b + self.blocks_in_chunk].view(torch.int16) for t in self.kv.values()]
        )

    def zero_slot(self, slot: int) -> None:
        b = slot * self.blocks_in_chunk
        for t in self.kv.values():
            t[:, b : b + self.blocks_in_chunk].zero_()

    def store(self, i: int, slot: int) -> bool:
        key = self._key(i, 0)
        fut = self.tc.submit_store(
            key.request_id, key, self.kv, self.blocks(slot), None, self.blocks_in_chunk
        )
        ok = bool(fut.result(timeout=self.timeout_s))
        self.end_session(key.request_id)
        return ok

    def lookup(self, i: int) -> tuple[int, str]:
        """Chunks found for key ``i`` (0 or 1) and the session to retrieve in."""
        key = self._key(i, None)
        self.rc.lookup(key, 1).result(timeout=self.timeout_s)
        hit = self.rc.wait_prefetch_status(key.request_id, self.timeout_s).result(
            timeout=self.timeout_s + 1
        )
        return int(hit or 0), key.request_id

    def retrieve(self, i: int, slot: int, request_id: str) -> bool:
        # The retrieve belongs to the session the lookup opened.
        key = self._key(i, 0, request_id)
        fut = self.tc.submit_retrieve(
            request_id, key, self.kv, self.blocks(slot), None, self.blocks_in_chunk
        )
        return bool(fut.result(timeout=self.timeout_s))

    def get(self, i: int, slot: int) -> bool:
        hit, rid = self.lookup(i)
        ok = hit == 1 and self.retrieve(i, slot, rid)
        return ok

    def end_session(self, request_id: str) -> None:
        self.rc.end_session(request_id).result(timeout=self.timeout_s)

    def close(self) -> None:
        try:
            fut = self.tc.unregister()
            if fut is not None:
                fut.result(timeout=self.timeout_s)
        except Exception as exc:  # a wedged server never answers; still clean up here
            print(f"unregister failed: {exc!r}", file=sys.stderr)
        self.tc.close()
        if self._own_ctx is not None:
            self.rc.close()
            self._own_ctx.term()


def bench_mp(args: argparse.Namespace) -> None:
    import torch

    scratch = _SOURCE_SLOTS
    for size_mib in args.sizes_mib:
        size = size_mib * MIB
        client = MPClient(args.host, args.port, size, _SOURCE_SLOTS + 1)
        try:
            put_s: list[float] = []
            get_s: list[float] = []
            mismatches = 0
            for i in range(args.warmup + args.iterations):
                slot = i % _SOURCE_SLOTS
                t0 = time.perf_counter()
                stored = client.store(i, slot)
                t1 = time.perf_counter()
                client.zero_slot(scratch)
                t2 = time.perf_counter()
                hit, rid = client.lookup(i)
                got = hit == 1 and client.retrieve(i, scratch, rid)
                t3 = time.perf_counter()
                client.end_session(rid)
                if not (
                    stored
                    and got
                    and torch.equal(client.slot_bytes(scratch), client.slot_bytes(slot))
                ):
                    mismatches += 1
                if i >= args.warmup:
                    put_s.append(t1 - t0)
                    get_s.append(t3 - t2)
            emit(
                summarize(
                    "lmcache-mp",
                    size,
                    put_s,
                    get_s,
                    mismatches,
                    {"transfer": client.transfer, "get_timed_as": "LOOKUP+RETRIEVE"},
                )
            )
        finally:
            client.close()


# --------------------------------------------------------------------------
# Findings
# --------------------------------------------------------------------------


def finding(name: str, observed: bool, details: str, **data: Any) -> None:
    emit({"finding": name, "observed": observed, "details": details, "data": data})


def finding_mp_drops_acked(args: argparse.Namespace) -> None:
    """Fill the MP server past --l1-size-gb; count acknowledged keys gone."""
    size = args.value_mib * MIB
    capacity = int(args.l1_size_gb * (1 << 30))
    count = min(2 * capacity // size + 1, 512)
    client = MPClient(args.host, args.port, size, _SOURCE_SLOTS)
    try:
        acked = [client.store(i, i % _SOURCE_SLOTS) for i in range(count)]
        present = []
        for i in range(count):
            hit, rid = client.lookup(i)
            client.end_session(rid)
            present.append(hit == 1)
    finally:
        client.close()
    gone = [i for i in range(count) if acked[i] and not present[i]]
    kept = [i for i in range(count) if present[i]]
    details = (
        f"stored {count} values of {args.value_mib} MiB ({count * size / (1 << 30):.2f} GiB) "
        f"into an L1 of {args.l1_size_gb} GiB: {sum(acked)} STOREs acknowledged as "
        f"stored, {len(gone)} of those keys are no longer found"
    )
    if gone:
        details += f" (indices {_ranges(gone)} in put order)"
    if not present[-1]:
        details += "; the newest put is among them"
    details += "; no STORE reported a failure."
    finding(
        "mp-drops-acknowledged-stores",
        bool(gone),
        details,
        puts=count,
        value_bytes=size,
        l1_size_gb=args.l1_size_gb,
        acknowledged=sum(acked),
        acknowledged_then_gone=len(gone),
        gone=gone,
        kept=len(kept),
        newest_kept=present[-1],
    )


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    out: list[str] = []
    start = prev = xs[0]
    for x in xs[1:]:
        if x != prev + 1:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = x
        prev = x
    out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(out)


def _zmtp_single_frame(host: str, port: int, payload: bytes) -> None:
    """Speak just enough ZMTP 3.0 (NULL mechanism, DEALER) to deliver one frame.

    The server's ROUTER loop asserts that every message has at least three
    parts; a one-frame message fails that assertion in its only thread.
    """
    greeting = (
        b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 0])
        + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
    )
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    with socket.create_connection((host, port), timeout=5) as s:
        # Step by step: libzmq answers each part of the greeting in turn.
        s.sendall(greeting[:10])
        _recv_at_least(s, 10)
        s.sendall(greeting[10:])
        _recv_at_least(s, 54)
        s.sendall(bytes([0x04, len(body)]) + body)
        s.sendall(bytes([0x00, len(payload)]) + payload)
        time.sleep(0.5)


def _recv_at_least(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        part = s.recv(4096)
        if not part:
            break
        got += part
    return got


def _health(http_port: int) -> tuple[int, str]:
    url = f"http://127.0.0.1:{http_port}/healthcheck"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, repr(exc)


def _mp_roundtrip(args: argparse.Namespace, i: int, timeout_s: float) -> tuple[bool, str]:
    """Store and read back one 1 MiB value with a fresh client."""
    try:
        client = MPClient(args.host, args.port, MIB, 2, timeout_s=timeout_s)
    except Exception as exc:
        return False, f"connect/register failed: {type(exc).__name__}: {exc}"
    try:
        if not client.store(i, 0):
            return False, "STORE returned failure"
        if not client.get(i, 1):
            return False, "LOOKUP/RETRIEVE failed"
        return True, "store and retrieve succeeded"
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        client.close()


def finding_mp_wedge(args: argparse.Namespace) -> None:
    timeout_s = 5.0
    before_ok, before = _mp_roundtrip(args, 1, timeout_s)
    # Plain random bytes: libzmq drops a peer that does not speak ZMTP.
    with socket.create_connection((args.host, args.port), timeout=5) as s:
        s.sendall(os.urandom(64))
        time.sleep(0.3)
    random_ok, random_msg = _mp_roundtrip(args, 2, timeout_s)
    # A ZMTP greeting followed by one frame of 8 random bytes.
    _zmtp_single_frame(args.host, args.port, os.urandom(8))
    time.sleep(0.5)
    after_ok, after = _mp_roundtrip(args, 3, timeout_s)
    time.sleep(1.0)
    later_ok, later = _mp_roundtrip(args, 4, timeout_s)
    status, body = _health(args.http_port)
    healthy = status == 200 and "healthy" in body and "unhealthy" not in body
    observed = before_ok and not after_ok and not later_ok and healthy
    details = (
        f"before: {before}; after 64 plain random bytes: {random_msg}; "
        "after a ZMTP greeting and one 8-byte random frame (~150 bytes on the port): "
        f"{after}; again 1 s later: {later}; GET /healthcheck -> {status} {body.strip()}"
    )
    finding(
        "mp-wedged-but-healthy",
        observed,
        details,
        served_before=before_ok,
        served_after_plain_random_bytes=random_ok,
        served_after_malformed_frame=after_ok or later_ok,
        health_status=status,
        health_body=body.strip(),
    )


def _tcp_header(command: Any, key: Any, length: int) -> bytes:
    import torch
    from lmcache.v1.memory_management import MemoryFormat
    from lmcache.v1.protocol import ClientMetaMessage

    header: bytes = ClientMetaMessage(
        command, key, length, MemoryFormat.KV_2LTD, torch.uint8,
        torch.Size([2, 1, 256, max(length // 512, 1)]),
    ).serialize()
    return header


def _tcp_reply(s: socket.socket) -> Any:
    from lmcache.v1.protocol import ServerMetaMessage

    raw = _recv_at_least(s, ServerMetaMessage.packlength())
    if len(raw) < ServerMetaMessage.packlength():
        return None
    return ServerMetaMessage.deserialize(raw[: ServerMetaMessage.packlength()])


def finding_tcp_truncated_put(args: argparse.Namespace) -> None:
    from lmcache.v1.protocol import ClientCommand, ServerReturnCode

    client = TCPClient(args.host, args.port, 64 * MIB)
    try:
        key = client.key(1)
        announced = MIB
        sent = 4096
        with socket.create_connection((args.host, args.port), timeout=5) as s:
            s.sendall(_tcp_header(ClientCommand.PUT, key, announced) + os.urandom(sent))
        time.sleep(0.5)
        exists = client.exists(key)
        with socket.create_connection((args.host, args.port), timeout=5) as s:
            s.sendall(_tcp_header(ClientCommand.GET, key, 0))
            reply = _tcp_reply(s)
            payload = b""
            try:
                while True:
                    part = s.recv(1 << 16)
                    if not part:
                        break
                    payload += part
            except OSError:
                pass
        # The server is still up for other keys.
        other = client.key(2)
        value = client.value(MIB)
        client.put(other, value)
        other_ok = client.exists(other)
        value.ref_count_down()
    finally:
        client.close()
    code = None if reply is None else int(reply.code)
    announced_back = None if reply is None else int(reply.length)
    observed = exists and len(payload) < announced
    details = (
        f"PUT announced {announced} bytes, sent {sent}, then closed: EXIST -> "
        f"{'found' if exists else 'not found'}; GET -> code {code}, announced length "
        f"{announced_back}, {len(payload)} bytes delivered before the server closed the "
        "connection (the entry has no content)"
    )
    finding(
        "tcp-truncated-put-stored",
        observed,
        details,
        announced=announced,
        sent=sent,
        exists=exists,
        get_code=code,
        get_success=code == int(ServerReturnCode.SUCCESS),
        get_announced_length=announced_back,
        get_bytes_delivered=len(payload),
        server_still_serving=other_ok,
    )


def _rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def finding_tcp_no_capacity(args: argparse.Namespace) -> None:
    size = args.value_mib * MIB
    count = max(1, int(args.budget_gb * (1 << 30)) // size)
    client = TCPClient(args.host, args.port, 2 * size)
    rss0 = _rss_bytes(args.server_pid)
    try:
        value = client.value(size)
        for i in range(count):
            client.put(client.key(1000 + i), value)
        kept = sum(client.exists(client.key(1000 + i)) for i in range(count))
        value.ref_count_down()
    finally:
        client.close()
    rss1 = _rss_bytes(args.server_pid)
    total = count * size
    growth = None if rss0 is None or rss1 is None else rss1 - rss0
    details = (
        "lmcache_server takes no capacity option (usage: lmcache_server HOST PORT "
        f"[DEVICE]) and has no eviction: {count} puts of {args.value_mib} MiB "
        f"({total / (1 << 30):.2f} GiB) all accepted, {kept} of {count} kept"
    )
    if growth is not None:
        details += f"; server RSS grew by {growth / (1 << 30):.2f} GiB"
    details += "; it grows until the host runs out of memory."
    finding(
        "tcp-no-capacity-limit",
        kept == count,
        details,
        puts=count,
        value_bytes=size,
        total_bytes=total,
        kept=kept,
        server_rss_growth_bytes=growth,
    )


FINDINGS: dict[str, Callable[[argparse.Namespace], None]] = {
    "mp-drops-acknowledged-stores": finding_mp_drops_acked,
    "mp-wedged-but-healthy": finding_mp_wedge,
    "tcp-truncated-put-stored": finding_tcp_truncated_put,
    "tcp-no-capacity-limit": finding_tcp_no_capacity,
}


def _sizes(text: str) -> list[int]:
    sizes = [int(x) for x in text.split(",") if x.strip()]
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError("sizes must be positive integers (MiB)")
    return sizes


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="timed put/get workload")
    b.add_argument("--mode", choices=("tcp", "mp"), required=True)
    b.add_argument("--host", default="127.0.0.1")
    b.add_argument("--port", type=int, required=True)
    b.add_argument("--sizes-mib", type=_sizes, default=[1, 4, 16, 32])
    b.add_argument("--iterations", type=int, default=10)
    b.add_argument("--warmup", type=int, default=2)
    f = sub.add_parser("finding", help="one failure scenario")
    f.add_argument("--name", choices=sorted(FINDINGS), required=True)
    f.add_argument("--host", default="127.0.0.1")
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--http-port", type=int, default=0)
    f.add_argument("--l1-size-gb", type=float, default=0.25)
    f.add_argument("--value-mib", type=int, default=32)
    f.add_argument("--budget-gb", type=float, default=1.0)
    f.add_argument("--server-pid", type=int, default=None)
    args = p.parse_args(argv)
    if args.command == "bench" and (args.iterations < 1 or args.warmup < 0):
        p.error("--iterations must be >= 1 and --warmup >= 0")
    return args


@contextmanager
def _reported_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        import traceback

        traceback.print_exc()
        emit({"error": f"{type(exc).__name__}: {exc}"})
        # Same as below: leftover client threads must not keep us alive.
        os._exit(1)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    with _reported_errors():
        if args.command == "bench":
            (bench_tcp if args.mode == "tcp" else bench_mp)(args)
        else:
            FINDINGS[args.name](args)
    # zmq/LMCache leave non-daemon threads behind; the results are out.
    _OUT.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
