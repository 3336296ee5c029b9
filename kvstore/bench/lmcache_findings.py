"""The failure scenarios ("findings") the LMCache peer worker runs.

Runs in the peer virtualenv: ``lmcache_worker.py finding --name NAME`` runs
``FINDINGS[NAME]`` against an LMCache server that ``kvstore.bench.peers``
started; each prints one JSON object (``finding``, ``observed``, ``details``,
``data``) through :func:`~lmcache_clients.emit`. What each shows:
``docs/benchmarks/peers.md``.

* ``mp-drops-acknowledged-stores``: :func:`finding_mp_drops_acked`;
* ``mp-wedged-but-healthy``: :func:`finding_mp_wedge`;
* ``tcp-truncated-put-stored``: :func:`finding_tcp_truncated_put`;
* ``tcp-no-capacity-limit``: :func:`finding_tcp_no_capacity`.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

# Plain module names: run by path (lmcache_worker.py), these files are in no
# package. mypy checks them as modules of kvstore.bench, so it reads them
# under those names.
if TYPE_CHECKING:
    from kvstore.bench.lmcache_clients import MIB, SOURCE_SLOTS, MPClient, TCPClient, emit
else:
    from lmcache_clients import MIB, SOURCE_SLOTS, MPClient, TCPClient, emit


def finding(name: str, observed: bool, details: str, **data: Any) -> None:
    emit({"finding": name, "observed": observed, "details": details, "data": data})


def finding_mp_drops_acked(args: argparse.Namespace) -> None:
    """Fill the MP server past --l1-size-gb; count acknowledged keys gone."""
    size = args.value_mib * MIB
    capacity = int(args.l1_size_gb * (1 << 30))
    count = min(2 * capacity // size + 1, 512)
    client = MPClient(args.host, args.port, size, SOURCE_SLOTS)
    try:
        acked = [client.store(i, i % SOURCE_SLOTS) for i in range(count)]
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
