"""Bad input to a real daemon: the right status, a message that says what was
wrong, nothing stored, the daemon still serving and what it held unchanged.

Every test runs against one daemon (``max_batch: 8``, ``max_chunk_bytes:
8MiB``) that holds a sentinel chunk; after each test a fixture checks that
the sentinel is intact, the daemon answers its health check and logged no
traceback, and none of the keys the test tried to write exist.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import kvstore
from kvstore.client.shm import ClientSegment
from kvstore.errors import InvalidArgument
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from tests.server import (
    FP,
    SERVING,
    MiB,
    blob,
    channel,
    data_frames,
    exists,
    header,
    health,
    key,
    meta_for,
    raw_get,
    raw_put,
    rpc_error,
    stub,
)
from tests.support.daemon import DaemonProcess, cpu_only

INVALID = grpc.StatusCode.INVALID_ARGUMENT
SENTINEL = key(0, model="sentinel")
SENTINEL_DATA = blob(0, 3 * MiB + 17)
#: Keys the tests try (and must fail) to write; none may exist afterwards.
BAD = [key(i, model="bad") for i in range(16)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    cfg = cpu_only("64MiB", max_batch=8, max_chunk_bytes="8MiB")
    with DaemonProcess(tmp_path_factory.mktemp("bad"), cfg) as d:
        with channel(d.address) as ch:
            raw_put(stub(ch), [(SENTINEL, SENTINEL_DATA)])
        yield d


@pytest.fixture
def s(server: DaemonProcess) -> Iterator[pb_grpc.KVStoreStub]:
    """A raw stub; afterwards the daemon must be serving with the sentinel intact."""
    with channel(server.address) as ch:
        yield stub(ch)
    assert server.proc is not None and server.proc.poll() is None, server.log()
    assert health(server.address) == SERVING
    assert "Traceback" not in server.log(), "bad input must be answered, not raise inside the daemon"
    with channel(server.address) as ch:
        after = stub(ch)
        assert raw_get(after, [SENTINEL]) == [SENTINEL_DATA]
        assert exists(after, BAD[:8]) + exists(after, BAD[8:]) == [False] * len(BAD)


@pytest.fixture
def segment(server: DaemonProcess, s: pb_grpc.KVStoreStub) -> Iterator[tuple[ClientSegment, int]]:
    seg = ClientSegment(1 * MiB)
    reply = s.RegisterSegment(pb.RegisterSegmentRequest(name=seg.name, size=seg.size, nonce=seg.nonce), timeout=10)
    yield seg, reply.segment_id
    s.ReleaseSegment(pb.ReleaseSegmentRequest(segment_id=reply.segment_id), timeout=10)
    seg.close()


# -- keys ----------------------------------------------------------------------------
MALFORMED_KEYS = {
    "empty": ("", "expected 'tenant/model/fingerprint/digest'"),
    "no slashes": ("t-m-deadbeef", "expected 'tenant/model/fingerprint/digest'"),
    "too few parts": ("t/m/deadbeef", "expected 'tenant/model'"),
    "bad tenant": (f"-t/m/{FP}/s{'0' * 64}", "namespace.tenant"),
    "empty model part": (f"t/a//b/{FP}/s{'0' * 64}", "namespace.model"),
    "upper-case fingerprint": (f"t/m/{FP.upper()}/s{'0' * 64}", "fingerprint"),
    "short fingerprint": (f"t/m/abc/s{'0' * 64}", "fingerprint"),
    "digest kind": (f"t/m/{FP}/x{'0' * 64}", "digest"),
    "short digest": (f"t/m/{FP}/s{'0' * 63}", "digest"),
    "too long": ("t/" + "m" * 600 + f"/{FP}/s{'0' * 64}", "at most 512 characters"),
    "not utf-8 safe": (f"t/m\udcff/{FP}/s{'0' * 64}".encode("utf-8", "surrogateescape").decode("latin-1"), "model"),
}


@pytest.mark.parametrize("name", list(MALFORMED_KEYS))
def test_malformed_keys_are_rejected_by_every_rpc(s: pb_grpc.KVStoreStub, name: str) -> None:
    bad, what = MALFORMED_KEYS[name]
    keys = [SENTINEL, bad]  # the bad key second: the message must say which one
    rpc_error(lambda: s.Exists(pb.ExistsRequest(keys=keys), timeout=10), INVALID, "keys[1]", what)
    rpc_error(lambda: s.Lookup(pb.LookupRequest(keys=keys), timeout=10), INVALID, "keys[1]", what)
    rpc_error(lambda: s.Delete(pb.DeleteRequest(keys=keys), timeout=10), INVALID, "keys[1]", what)
    rpc_error(lambda: list(s.Get(pb.GetRequest(keys=keys), timeout=10)), INVALID, "keys[1]", what)
    rpc_error(lambda: s.Put(iter([header(bad, b"abc"), pb.PutFrame(data=b"abc")]), timeout=10), INVALID, what)


def test_client_rejects_malformed_keys_before_sending(server: DaemonProcess) -> None:
    with kvstore.Client(server.address, shm=False) as c:
        for bad, _ in MALFORMED_KEYS.values():
            with pytest.raises(InvalidArgument, match="key|namespace"):
                c.put(bad, b"x")
            with pytest.raises(InvalidArgument):
                c.get(bad)
        with pytest.raises(InvalidArgument, match="ChunkKey or its string form"):
            c.exists([42])  # type: ignore[list-item]


# -- batches and sizes -----------------------------------------------------------------------
def test_oversized_batches(s: pb_grpc.KVStoreStub, segment: tuple[ClientSegment, int]) -> None:
    nine = BAD[:9]
    msg = "9 keys in one request; at most 8"
    rpc_error(lambda: s.Exists(pb.ExistsRequest(keys=nine), timeout=10), INVALID, msg)
    rpc_error(lambda: s.Lookup(pb.LookupRequest(keys=nine), timeout=10), INVALID, msg)
    rpc_error(lambda: s.Delete(pb.DeleteRequest(keys=nine), timeout=10), INVALID, msg)
    rpc_error(lambda: list(s.Get(pb.GetRequest(keys=nine), timeout=10)), INVALID, msg)
    seg, seg_id = segment
    sl = pb.ShmSlice(segment_id=seg_id, offset=4096, length=3)
    items = [pb.ShmPutItem(key=k, meta=meta_for(b"abc"), slice=sl) for k in nine]
    rpc_error(lambda: s.ShmPut(pb.ShmPutRequest(items=items), timeout=10), INVALID, "9 items", "at most 8")
    gets = [pb.ShmGetItem(key=k, slice=sl) for k in nine]
    rpc_error(lambda: s.ShmGet(pb.ShmGetRequest(items=gets), timeout=10), INVALID, "9 items", "at most 8")
    # Eight is allowed.
    assert exists(s, BAD[:8]) == [False] * 8


def test_chunk_larger_than_max_chunk_bytes(s: pb_grpc.KVStoreStub, segment: tuple[ClientSegment, int]) -> None:
    big = pb.PutFrame(header=pb.PutHeader(key=BAD[0], meta=pb.ChunkMeta(nbytes=8 * MiB + 1, checksum=1)))
    rpc_error(
        lambda: s.Put(iter([big]), timeout=10), grpc.StatusCode.RESOURCE_EXHAUSTED, "8388609 bytes", "max_chunk_bytes"
    )
    _, seg_id = segment
    item = pb.ShmPutItem(
        key=BAD[1],
        meta=pb.ChunkMeta(nbytes=8 * MiB + 1, checksum=1),
        slice=pb.ShmSlice(segment_id=seg_id, offset=4096, length=8 * MiB + 1),
    )
    rpc_error(
        lambda: s.ShmPut(pb.ShmPutRequest(items=[item]), timeout=10),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "max_chunk_bytes",
    )


def test_frame_larger_than_allowed(s: pb_grpc.KVStoreStub) -> None:
    data = b"x" * 100
    # A frame the daemon's gRPC layer accepts but the service refuses (frames are at most 64 MiB) ...
    huge = pb.PutFrame(data=bytes(64 * MiB + 4096))
    rpc_error(lambda: s.Put(iter([header(BAD[0], data), huge]), timeout=30), INVALID, "frames may be at most")
    # ... and one past the gRPC message limit.
    huger = pb.PutFrame(data=bytes(65 * MiB))
    rpc_error(lambda: s.Put(iter([header(BAD[1], data), huger]), timeout=30), grpc.StatusCode.RESOURCE_EXHAUSTED)


# -- the shape of a Put stream ---------------------------------------------------------------------
def test_data_before_header(s: pb_grpc.KVStoreStub) -> None:
    rpc_error(lambda: s.Put(iter([pb.PutFrame(data=b"abc")]), timeout=10), INVALID, "before any header")
    rpc_error(lambda: s.Put(iter([pb.PutFrame(data=b"")]), timeout=10), INVALID, "before any header")


def test_extra_bytes_beyond_nbytes(s: pb_grpc.KVStoreStub) -> None:
    data = blob(1, 1000)
    frames = [header(BAD[0], data), pb.PutFrame(data=data + b"!")]
    rpc_error(lambda: s.Put(iter(frames), timeout=10), INVALID, "1001 bytes received, header said 1000")
    frames = [header(BAD[1], data), pb.PutFrame(data=data[:600]), pb.PutFrame(data=data[600:] + b"!")]
    rpc_error(lambda: s.Put(iter(frames), timeout=10), INVALID, "header said 1000")


def test_empty_frame(s: pb_grpc.KVStoreStub) -> None:
    rpc_error(lambda: s.Put(iter([pb.PutFrame()]), timeout=10), INVALID, "empty PutFrame")
    data = blob(2, 10)
    frames = [header(BAD[0], data), pb.PutFrame(data=data[:5]), pb.PutFrame(), pb.PutFrame(data=data[5:])]
    rpc_error(lambda: s.Put(iter(frames), timeout=10), INVALID, "empty PutFrame")


def test_header_without_meta_and_header_inside_a_chunk(s: pb_grpc.KVStoreStub) -> None:
    rpc_error(
        lambda: s.Put(iter([pb.PutFrame(header=pb.PutHeader(key=BAD[0]))]), timeout=10), INVALID, "has no meta"
    )
    data = blob(3, 100)
    frames = [header(BAD[1], data), pb.PutFrame(data=data[:50]), header(BAD[2], data)]
    rpc_error(lambda: s.Put(iter(frames), timeout=10), INVALID, "new header after 50 of 100 bytes")


@pytest.mark.parametrize(
    ("fields", "what"),
    [
        ({"dtype": "float32", "shape": [10]}, "needs 40 bytes, nbytes says 39"),
        ({"dtype": "bfloat16", "shape": [3, 7]}, "meta is inconsistent"),
        ({"dtype": "float128"}, "meta.dtype 'float128' is not supported"),
        ({"dtype": "complex64", "shape": [39]}, "not supported"),
        ({"codec": "no such codec!"}, "meta.codec"),
        ({"shape": [1] * 9}, "meta.shape"),
        ({"layout": "L" * 17}, "meta.layout"),
    ],
    ids=["float32", "bfloat16", "float128", "complex64", "codec", "rank", "layout"],
)
def test_inconsistent_or_unknown_meta(
    s: pb_grpc.KVStoreStub, segment: tuple[ClientSegment, int], fields: dict[str, object], what: str
) -> None:
    data = blob(4, 39)
    frames = [header(BAD[0], data, **fields), pb.PutFrame(data=data)]
    rpc_error(lambda: s.Put(iter(frames), timeout=10), INVALID, "chunk 0.meta", what)
    seg, seg_id = segment
    item = pb.ShmPutItem(key=BAD[1], meta=meta_for(data, **fields), slice=pb.ShmSlice(segment_id=seg_id, offset=4096, length=39))
    rpc_error(lambda: s.ShmPut(pb.ShmPutRequest(items=[item]), timeout=10), INVALID, "items[0].meta", what)


def test_malformed_protobuf_messages(server: DaemonProcess, s: pb_grpc.KVStoreStub) -> None:
    """Bytes that are not a valid message of the method's type: INVALID_ARGUMENT, not UNKNOWN."""
    garbage = b"\x0a\xff\xff\xff\x7fnot a message"
    with channel(server.address) as ch:
        for method in ("Exists", "Lookup", "Delete", "RegisterSegment", "ShmPut", "ShmGet"):
            call = ch.unary_unary(f"/kvstore.v1.KVStore/{method}")
            rpc_error(lambda: call(garbage, timeout=10), INVALID, "malformed")
        get = ch.unary_stream("/kvstore.v1.KVStore/Get")
        rpc_error(lambda: list(get(garbage, timeout=10)), INVALID, "malformed GetRequest")
        put = ch.stream_unary("/kvstore.v1.KVStore/Put")
        rpc_error(lambda: put(iter([garbage]), timeout=10), INVALID, "malformed PutFrame")
        unknown = ch.unary_unary("/kvstore.v1.KVStore/NoSuchMethod")
        rpc_error(lambda: unknown(b"", timeout=10), grpc.StatusCode.UNIMPLEMENTED)


# -- checksums and truncated streams -------------------------------------------------------------
def test_checksum_mismatch_is_data_loss_and_stores_nothing(s: pb_grpc.KVStoreStub) -> None:
    data = blob(5, 2 * MiB)
    wrong = bytearray(data)
    wrong[MiB] ^= 1  # one flipped bit, past the first frame
    frames = [header(BAD[0], data), *data_frames(bytes(wrong))]
    rpc_error(lambda: s.Put(iter(frames), timeout=10), grpc.StatusCode.DATA_LOSS, "fails its checksum")
    # The second chunk of a stream is bad: it is not stored (the first, complete
    # and verified before it, is, as the protocol says; it is deleted again here).
    good = blob(6, 1000)
    frames = [header(BAD[1], good), pb.PutFrame(data=good), header(BAD[2], data), *data_frames(bytes(wrong))]
    rpc_error(lambda: s.Put(iter(frames), timeout=10), grpc.StatusCode.DATA_LOSS, "checksum")
    assert exists(s, BAD[1:3]) == [True, False]
    assert raw_get(s, [BAD[1]]) == [good]
    assert list(s.Delete(pb.DeleteRequest(keys=[BAD[1]]), timeout=10).found) == [True]


def test_checksum_mismatch_over_shared_memory_stores_nothing(
    s: pb_grpc.KVStoreStub, segment: tuple[ClientSegment, int]
) -> None:
    seg, seg_id = segment
    good, bad = blob(7, 5000), blob(8, 5000)
    seg.view(4096, 5000).numpy()[:] = memoryview(good)
    seg.view(16384, 5000).numpy()[:] = memoryview(bad)
    items = [
        pb.ShmPutItem(key=BAD[0], meta=meta_for(good), slice=pb.ShmSlice(segment_id=seg_id, offset=4096, length=5000)),
        pb.ShmPutItem(
            key=BAD[1], meta=meta_for(good), slice=pb.ShmSlice(segment_id=seg_id, offset=16384, length=5000)
        ),
    ]
    rpc_error(lambda: s.ShmPut(pb.ShmPutRequest(items=items), timeout=10), grpc.StatusCode.DATA_LOSS, "checksum")
    # A failed ShmPut request stores none of its items.
    assert exists(s, BAD[:2]) == [False, False]


def test_stream_ending_inside_a_chunk_stores_nothing(s: pb_grpc.KVStoreStub) -> None:
    data = blob(9, 5 * MiB)
    frames = [header(BAD[0], data), *data_frames(data[: 3 * MiB])]
    rpc_error(lambda: s.Put(iter(frames), timeout=30), INVALID, f"stream ended inside chunk 0: {3 * MiB} of {5 * MiB}")
    rpc_error(lambda: s.Put(iter([header(BAD[1], data)]), timeout=30), INVALID, "0 of")


def test_cancelled_put_stores_nothing_of_the_unfinished_chunk(daemon: DaemonProcess) -> None:
    """Header announcing N bytes, fewer sent, then the call cancelled mid-stream.

    (A daemon of its own: this chunk is larger than the shared one's
    max_chunk_bytes.)  Chunk A completes first in the same stream, and becomes visible (the
    protocol commits each complete chunk): seeing it proves the daemon is
    reading this stream.  Then B's header and 96 MiB of its 100 MiB: more than
    the connection's flow-control window, so by the time the generator is
    asked for the frame after them, the daemon has consumed B's header and
    part of its bytes.  Then the client cancels."""
    a = blob(10, 1000)
    b = blob(11, 4 * MiB)
    nbytes = 100 * MiB
    asked_past_partial = threading.Event()
    release = threading.Event()

    def frames() -> Iterator[pb.PutFrame]:
        yield header(BAD[0], a)
        yield pb.PutFrame(data=a)
        yield pb.PutFrame(header=pb.PutHeader(key=BAD[1], meta=pb.ChunkMeta(nbytes=nbytes, checksum=0)))
        for _ in range(24):
            yield pb.PutFrame(data=b)
        asked_past_partial.set()
        release.wait(60)

    with channel(daemon.address) as ch:
        s = stub(ch)
        future = s.Put.future(frames(), timeout=60)
        assert asked_past_partial.wait(60)
        assert exists(s, BAD[:1]) == [True]
        future.cancel()
        release.set()
        with pytest.raises(grpc.FutureCancelledError):
            future.result()
        assert exists(s, BAD[1:2]) == [False]
        assert raw_get(s, [BAD[1]]) == [None]
        # The daemon keeps serving, on this channel and a new one.
        assert raw_put(s, [(BAD[2], b)]).results[0].key == BAD[2]
    with channel(daemon.address) as ch:
        assert raw_get(stub(ch), [BAD[2], BAD[1]]) == [b, None]


CUT_CLIENT = r"""
import sys, grpc
from kvstore.v1 import kvstore_pb2 as pb, kvstore_pb2_grpc as pbg
addr, key = sys.argv[1], sys.argv[2]
def frames():
    yield pb.PutFrame(header=pb.PutHeader(key=key, meta=pb.ChunkMeta(nbytes=6 << 20, checksum=0)))
    yield pb.PutFrame(data=bytes(3 << 20))
    print("sent", flush=True)
    sys.stdin.read()  # until killed
    yield pb.PutFrame(data=bytes(3 << 20))
pbg.KVStoreStub(grpc.insecure_channel(addr)).Put(frames())
"""


def test_client_killed_mid_put_stores_nothing(server: DaemonProcess, s: pb_grpc.KVStoreStub) -> None:
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", CUT_CLIENT, server.address, BAD[4]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"sent"
    finally:
        proc.kill()  # the connection is cut, not closed politely
        proc.wait(30)
    assert exists(s, [BAD[4]]) == [False]
    assert raw_get(s, [BAD[4]]) == [None]


# -- missing keys ------------------------------------------------------------------------------------------
def test_missing_keys_are_not_errors(s: pb_grpc.KVStoreStub, server: DaemonProcess) -> None:
    assert raw_get(s, BAD[:3]) == [None, None, None]
    assert list(s.Delete(pb.DeleteRequest(keys=BAD[:2]), timeout=10).found) == [False, False]
    assert s.Lookup(pb.LookupRequest(keys=BAD[:2]), timeout=10).count == 0
    with kvstore.Client(server.address) as c:
        assert c.get(BAD[0]) is None
        assert c.get_bytes(BAD[0]) is None
        assert c.get_many(BAD[:2]) == [None, None]
        assert c.delete(BAD[:1]) == [False]


# -- shared-memory registration and slices ----------------------------------------------------------------------
FP_ERR = grpc.StatusCode.FAILED_PRECONDITION


def _register(s: pb_grpc.KVStoreStub, name: str, size: int, nonce: bytes) -> pb.RegisterSegmentReply:
    return s.RegisterSegment(pb.RegisterSegmentRequest(name=name, size=size, nonce=nonce), timeout=10)


@pytest.mark.parametrize(
    "name", ["../etc/passwd", "kvstore-", "kvstore-short", "other-0123456789", "kvstore-a/b0123456789", "kvstore-" + "a" * 65]
)
def test_register_segment_with_bad_name(s: pb_grpc.KVStoreStub, name: str) -> None:
    rpc_error(lambda: _register(s, name, 8192, bytes(16)), INVALID, "segment name must be 'kvstore-'")


def test_register_segment_failures(s: pb_grpc.KVStoreStub, tmp_path: Path) -> None:
    seg = ClientSegment(64 << 10)
    try:
        rpc_error(lambda: _register(s, seg.name, seg.size, secrets.token_bytes(16)), FP_ERR, "nonce mismatch")
        rpc_error(lambda: _register(s, seg.name, seg.size + 4096, seg.nonce), FP_ERR, "bytes here, the client said")
        rpc_error(lambda: _register(s, seg.name, seg.size, seg.nonce[:8]), INVALID, "nonce must be 16 bytes")
        rpc_error(lambda: _register(s, seg.name, 16, seg.nonce), INVALID, "size must be more than 16")
    finally:
        seg.close()
    rpc_error(lambda: _register(s, seg.name, seg.size, seg.nonce), FP_ERR, "cannot open")  # unlinked now
    rpc_error(lambda: _register(s, "kvstore-" + secrets.token_hex(8), 8192, bytes(16)), FP_ERR, "cannot open")
    # A name under /dev/shm that is a symlink to another file is not followed.
    target = tmp_path / "target"
    target.write_bytes(bytes(8192))
    link = Path("/dev/shm") / ("kvstore-" + secrets.token_hex(8))
    os.symlink(target, link)
    try:
        rpc_error(lambda: _register(s, link.name, 8192, bytes(16)), FP_ERR, "cannot open")
    finally:
        link.unlink()


def test_shm_slices_out_of_bounds_and_unknown_segments(
    s: pb_grpc.KVStoreStub, segment: tuple[ClientSegment, int]
) -> None:
    seg, seg_id = segment
    data = blob(13, 100)
    seg.view(4096, 100).numpy()[:] = memoryview(data)

    def put(offset: int, length: int, seg_id: int = seg_id) -> pb.PutReply:
        item = pb.ShmPutItem(
            key=BAD[0], meta=meta_for(data), slice=pb.ShmSlice(segment_id=seg_id, offset=offset, length=length)
        )
        return s.ShmPut(pb.ShmPutRequest(items=[item]), timeout=10)

    def get(offset: int, length: int, seg_id: int = seg_id) -> pb.ShmGetReply:
        item = pb.ShmGetItem(key=SENTINEL, slice=pb.ShmSlice(segment_id=seg_id, offset=offset, length=length))
        return s.ShmGet(pb.ShmGetRequest(items=[item]), timeout=10)

    for offset, length in [(seg.size - 50, 100), (seg.size, 100), (2**63, 100)]:
        rpc_error(lambda: put(offset, length), INVALID, "outside segment")
    for offset, length in [(seg.size - 10, 100), (4096, seg.size), (2**64 - 1, 1)]:
        rpc_error(lambda: get(offset, length), INVALID, "outside segment")
    rpc_error(lambda: put(4096, 99), INVALID, "slice length 99 differs from meta.nbytes 100")
    unknown = seg_id ^ (1 << 40)
    rpc_error(lambda: put(4096, 100, unknown), grpc.StatusCode.NOT_FOUND, "no shared-memory segment")
    rpc_error(lambda: get(4096, 100, unknown), grpc.StatusCode.NOT_FOUND, "no shared-memory segment")
    rpc_error(
        lambda: s.ReleaseSegment(pb.ReleaseSegmentRequest(segment_id=unknown), timeout=10),
        grpc.StatusCode.NOT_FOUND,
        "no shared-memory segment",
    )
    # A slice too small for the chunk is not an error: the reply says so, nothing is written.
    res = get(4096, 100).results[0]
    assert res.found and not res.written and res.meta.nbytes == len(SENTINEL_DATA)
    assert bytes(seg.view(4096, 100).numpy()) == data
