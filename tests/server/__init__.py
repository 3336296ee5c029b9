"""Tests of the daemon as a real process on loopback, and the helpers they share.

The helpers speak to the daemon through the generated stubs
(``kvstore.v1.kvstore_pb2_grpc.KVStoreStub``) with hand-built frames, the way
any gRPC client in any language would, so the tests can send what the
kvstore clients never would: truncated streams, wrong checksums, bad frames.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.chunk import checksum
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

MiB = 1 << 20
FP = "0123456789abcdef"
Metadata = Sequence[tuple[str, str]] | None


def key(i: int, tenant: str = "t", model: str = "m", kind: str = "s") -> str:
    """The wire form of the ``i``-th test key of ``tenant``/``model``."""
    return f"{tenant}/{model}/{FP}/{kind}{i:064x}"


def blob(seed: int, n: int) -> bytes:
    """``n`` reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


# -- raw stubs -----------------------------------------------------------------
def channel(address: str, *options: tuple[str, Any]) -> grpc.Channel:
    """A plain gRPC channel with default options (plus ``options``)."""
    return grpc.insecure_channel(address, options=list(options))


def stub(ch: grpc.Channel) -> pb_grpc.KVStoreStub:
    return pb_grpc.KVStoreStub(ch)


def meta_for(data: bytes, **fields: Any) -> pb.ChunkMeta:
    """Metadata of a raw byte payload; ``fields`` override (e.g. a wrong checksum)."""
    m = {"nbytes": len(data), "checksum": checksum(data), "codec": "raw", "dtype": "uint8"}
    m.update(fields)
    return pb.ChunkMeta(**m)


def header(k: str, data: bytes, *, durable: bool = False, **meta: Any) -> pb.PutFrame:
    return pb.PutFrame(header=pb.PutHeader(key=k, meta=meta_for(data, **meta), durable=durable))


def data_frames(data: bytes, frame: int = MiB) -> Iterator[pb.PutFrame]:
    for off in range(0, len(data), frame):
        yield pb.PutFrame(data=data[off : off + frame])


def put_frames(items: Iterable[tuple[str, bytes]], frame: int = MiB) -> Iterator[pb.PutFrame]:
    """A well-formed Put stream: for each chunk a header, then its data frames."""
    for k, data in items:
        yield header(k, data)
        yield from data_frames(data, frame)


def raw_put(s: pb_grpc.KVStoreStub, items: Iterable[tuple[str, bytes]], metadata: Metadata = None) -> pb.PutReply:
    return s.Put(put_frames(items), metadata=metadata, timeout=60)


def raw_get(
    s: pb_grpc.KVStoreStub, keys: Sequence[str], *, frame_bytes: int = 0, metadata: Metadata = None
) -> list[bytes | None]:
    """Get ``keys`` over the stream and reassemble them, checking the stream's shape."""
    out: list[bytes | None] = [None] * len(keys)
    parts: list[bytes] = []
    want = -1
    index = -1
    seen: list[int] = []
    for frame in s.Get(pb.GetRequest(keys=keys, frame_bytes=frame_bytes), metadata=metadata, timeout=60):
        if frame.WhichOneof("part") == "header":
            assert want <= 0 or sum(map(len, parts)) == want, "header before the previous chunk was complete"
            h = frame.header
            index = h.index
            seen.append(index)
            assert h.key == keys[index]
            parts, want = [], (h.meta.nbytes if h.found else -1)
            if h.found and want == 0:
                out[index] = b""
        else:
            assert want > 0, "data frame without a found header"
            parts.append(frame.data)
            got = sum(map(len, parts))
            assert got <= want
            if frame_bytes:
                assert len(frame.data) <= max(frame_bytes, 64 << 10)
            if got == want:
                out[index] = b"".join(parts)
                assert checksum(out[index]) == h.meta.checksum  # type: ignore[arg-type]
    assert seen == list(range(len(keys))), f"headers for indices {seen}, expected one per key in order"
    return out


def exists(s: pb_grpc.KVStoreStub, keys: Sequence[str], metadata: Metadata = None) -> list[bool]:
    return list(s.Exists(pb.ExistsRequest(keys=keys), metadata=metadata, timeout=30).present)


def rpc_error(fn: Callable[[], object], code: grpc.StatusCode, *fragments: str) -> grpc.RpcError:
    """Call ``fn``; it must fail with ``code`` and a message containing every fragment."""
    with pytest.raises(grpc.RpcError) as info:
        fn()
    err = info.value
    assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
    for f in fragments:
        assert f in (err.details() or ""), f"{f!r} not in {err.details()!r}"
    return err


def health(address: str, service: str = "", ch: grpc.Channel | None = None) -> int:
    """The grpc.health.v1 status of ``service`` on ``address``."""
    own = ch is None
    ch = ch or channel(address)
    try:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        return int(reply.status)
    finally:
        if own:
            ch.close()


SERVING = health_pb2.HealthCheckResponse.SERVING
