"""Fuzzing the gRPC handlers of a real daemon (cpu + disk tiers).

Random bytes, mutated serialisations of valid requests (bit flips, cut,
spliced, duplicated bytes), and random Put frame sequences (headers and
data frames in any order, wrong sizes and checksums, garbage frames) go to
every RPC of ``kvstore.v1.KVStore`` and ``kvstore.v1.Admin``.  Every answer
must be OK or one of the expected status codes (never UNKNOWN or INTERNAL:
those are bugs), within a deadline (no hang); afterwards the daemon is
SERVING, its log holds no traceback, every chunk it serves matches its
checksum, and chunks stored by clean puts before and during the fuzzing are
byte-exact.  ``KVSTORE_FUZZ_LONG=1`` runs 20x as many inputs.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kvstore.chunk import checksum
from kvstore.v1 import admin_pb2 as apb
from kvstore.v1 import kvstore_pb2 as pb
from tests.reliability import fuzz_count
from tests.server import SERVING, MiB, blob, health, key, meta_for, raw_get, raw_put, stub
from tests.support.daemon import DaemonProcess, cpu_and_disk

EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
}
DEADLINE_S = 20
FUZZ_KEY = lambda i: key(i, tenant="fz", model="fuzz")  # noqa: E731
CLEAN_KEY = lambda i: key(i, tenant="clean", model="kept/model")  # noqa: E731


def mutate(rng: random.Random, raw: bytes) -> bytes:
    """One to four random edits of ``raw``."""
    b = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and b:  # bit flip
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # cut
            del b[rng.randrange(len(b)) :]
        elif op == 2:  # insert random bytes
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and b:  # overwrite a byte with an edge value
            b[rng.randrange(len(b))] = rng.choice([0x00, 0x7F, 0x80, 0xFF, 0x0A, 0x12])
        elif op == 4 and len(b) > 2:  # duplicate a slice (repeated fields, varints)
            i = rng.randrange(len(b) - 1)
            j = rng.randrange(i + 1, len(b))
            b[j:j] = b[i:j]
        else:  # huge varint length claims
            b[rng.randrange(len(b) + 1) : 0] = b"\x12\xff\xff\xff\xff\x0f"
    return bytes(b)


def seeds(rng: random.Random) -> dict[str, list[bytes]]:
    """Valid serialised requests per unary method (path -> examples)."""
    k = [FUZZ_KEY(i) for i in range(4)]
    sl = pb.ShmSlice(segment_id=1, offset=0, length=16)
    sel = apb.Selector(keys=k[:2], namespace="fz/fuzz", tier="cpu")
    kv = "/kvstore.v1.KVStore/"
    ad = "/kvstore.v1.Admin/"
    msgs: dict[str, list[Any]] = {
        kv + "Lookup": [pb.LookupRequest(keys=k)],
        kv + "Exists": [pb.ExistsRequest(keys=k)],
        kv + "Delete": [pb.DeleteRequest(keys=k[2:])],
        kv + "RegisterSegment": [pb.RegisterSegmentRequest(name="kvstore-nonexistent", size=4096, nonce=b"n" * 16)],
        kv + "ReleaseSegment": [pb.ReleaseSegmentRequest(segment_id=7)],
        kv + "ShmPut": [pb.ShmPutRequest(items=[pb.ShmPutItem(key=k[0], meta=meta_for(b"x" * 16), slice=sl)])],
        kv + "ShmGet": [pb.ShmGetRequest(items=[pb.ShmGetItem(key=k[0], slice=sl)])],
        ad + "Stats": [apb.StatsRequest()],
        ad + "ListChunks": [apb.ListChunksRequest(selector=sel, page_size=5)],
        ad + "Evict": [apb.EvictRequest(selector=apb.Selector(keys=k[3:]), drop=True)],
        ad + "Pin": [apb.PinRequest(selector=sel, ttl_s=1.5)],
        ad + "Unpin": [apb.UnpinRequest(selector=sel)],
        ad + "Move": [apb.MoveRequest(selector=apb.Selector(keys=k[:1]), to_tier="disk")],
        ad + "SetPolicy": [apb.SetPolicyRequest(tier="cpu", eviction_policy="lru")],
        ad + "Recode": [apb.RecodeRequest(selector=apb.Selector(keys=k[:1], tier="disk"), codec="zstd")],
        # Never with confirm: the fuzz keys must not take the clean keys with them.
        ad + "Clear": [apb.ClearRequest(namespace="fz/fuzz")],
    }
    return {path: [m.SerializeToString() for m in ms] for path, ms in msgs.items()}


@pytest.fixture(scope="module")
def fuzzd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    work = tmp_path_factory.mktemp("fuzz")
    cfg = cpu_and_disk(work / "disk", cpu="32MiB", disk="256MiB", max_chunk_bytes="8MiB", max_batch=64)
    with DaemonProcess(work / "d", cfg) as d:
        yield d
        log = d.log()
    assert "Traceback" not in log, log[-4000:]


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def check_codes(codes: dict[grpc.StatusCode, int], what: str) -> None:
    bad = {c: n for c, n in codes.items() if c not in EXPECTED}
    assert not bad, f"{what}: unexpected status codes {bad} (UNKNOWN/INTERNAL are bugs, DEADLINE_EXCEEDED a hang)"


def test_unary_requests_random_and_mutated(fuzzd: DaemonProcess) -> None:
    rng = random.Random(10)
    clean = {CLEAN_KEY(i): blob(i, 70_000 + i) for i in range(6)}
    with grpc.insecure_channel(fuzzd.address) as ch:
        raw_put(stub(ch), list(clean.items()))
        raw_put(stub(ch), [(FUZZ_KEY(i), blob(100 + i, 5000)) for i in range(4)])
        by_path = seeds(rng)
        calls = {p: ch.unary_unary(p, request_serializer=None, response_deserializer=None) for p in by_path}
        codes: dict[grpc.StatusCode, int] = {}
        n = fuzz_count(2400)
        for i in range(n):
            path = rng.choice(sorted(by_path))
            seed = rng.choice(by_path[path])
            body = rng.randbytes(rng.randint(0, 64)) if i % 8 == 0 else mutate(rng, seed)
            c = code_of(lambda: calls[path](body, timeout=DEADLINE_S))
            codes[c] = codes.get(c, 0) + 1
        check_codes(codes, "unary fuzz")
        assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > n // 10  # the inputs did reach validation
        assert health(fuzzd.address) == SERVING
        assert raw_get(stub(ch), list(clean)) == list(clean.values())
    print(f"{n} unary inputs: {dict((c.name, k) for c, k in codes.items())}")


def random_put_stream(rng: random.Random, known: dict[str, bytes]) -> list[bytes]:
    """Serialised PutFrames: a random mix of well-formed chunks and damage."""
    frames: list[bytes] = []
    for _ in range(rng.randint(1, 5)):
        k = FUZZ_KEY(rng.randrange(16))
        data = rng.randbytes(rng.choice([0, 1, 100, 4096, 70_000, 300_000]))
        choice = rng.randrange(10)
        meta: dict[str, Any] = {}
        if choice == 1:
            meta["checksum"] = checksum(data) ^ 1
        elif choice == 2:
            meta["nbytes"] = max(0, len(data) + rng.choice([-1, 1, 1 << 40]))
        elif choice == 3:
            meta.update(dtype=rng.choice(["float16", "int7", ""]), shape=[rng.randint(0, 9) for _ in range(2)])
        head = pb.PutFrame(header=pb.PutHeader(key=k, meta=meta_for(data, **meta), durable=rng.random() < 0.2))
        frames.append(mutate(rng, head.SerializeToString()) if choice == 4 else head.SerializeToString())
        step = rng.choice([1, 4096, 65536, 1 << 20]) if len(data) <= 4096 else rng.choice([65536, 1 << 20])
        parts = [data[o : o + step] for o in range(0, len(data), step)] or [b""]
        if choice == 5:
            rng.shuffle(parts)
        if choice == 6 and parts:
            parts.pop()
        if choice == 7:
            parts.append(b"extra")
        for part in parts:
            frame = pb.PutFrame(data=part).SerializeToString()
            frames.append(mutate(rng, frame) if choice == 8 and rng.random() < 0.3 else frame)
        if choice == 9:
            frames.insert(rng.randrange(len(frames) + 1), rng.randbytes(rng.randint(0, 40)))
        if choice == 0:
            known[k] = data
    return frames


def test_put_frame_sequences(fuzzd: DaemonProcess) -> None:
    rng = random.Random(11)
    clean = {CLEAN_KEY(100 + i): blob(200 + i, MiB + i) for i in range(3)}
    with grpc.insecure_channel(fuzzd.address) as ch:
        put = ch.stream_unary("/kvstore.v1.KVStore/Put", request_serializer=None, response_deserializer=None)
        codes: dict[grpc.StatusCode, int] = {}
        known: dict[str, bytes] = {}
        n = fuzz_count(400)
        for i in range(n):
            frames = random_put_stream(rng, known)
            c = code_of(lambda: put(iter(frames), timeout=DEADLINE_S))
            codes[c] = codes.get(c, 0) + 1
            if i % 100 == 0:  # clean puts interleaved with the damage
                k = CLEAN_KEY(100 + (i // 100) % 3)
                raw_put(stub(ch), [(k, clean[k])])
        check_codes(codes, "put fuzz")
        assert codes.get(grpc.StatusCode.OK, 0) > 0 and codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0
        assert codes.get(grpc.StatusCode.DATA_LOSS, 0) > 0
        assert health(fuzzd.address) == SERVING
        # Whatever the fuzz left under its keys is whole (raw_get checks every checksum) ...
        got = raw_get(stub(ch), [FUZZ_KEY(i) for i in range(16)])
        assert sum(g is not None for g in got) > 0
        # ... and the clean chunks are byte-exact.
        assert raw_get(stub(ch), list(clean)) == list(clean.values())
    print(f"{n} put streams: {dict((c.name, k) for c, k in codes.items())}")


def test_get_requests_mutated(fuzzd: DaemonProcess) -> None:
    rng = random.Random(12)
    with grpc.insecure_channel(fuzzd.address) as ch:
        get_key = lambda i: key(i, tenant="fg", model="fuzz")  # noqa: E731 - apart from the put fuzz's keys
        raw_put(stub(ch), [(get_key(i), blob(300 + i, 100_000)) for i in range(4)])
        get = ch.unary_stream("/kvstore.v1.KVStore/Get", request_serializer=None, response_deserializer=None)
        seed = pb.GetRequest(keys=[get_key(i) for i in range(6)], frame_bytes=65536).SerializeToString()
        codes: dict[grpc.StatusCode, int] = {}
        n = fuzz_count(600)
        for i in range(n):
            body = mutate(rng, seed) if i % 5 else rng.randbytes(rng.randint(0, 48))

            def call() -> None:
                for raw in get(body, timeout=DEADLINE_S):
                    frame = pb.GetFrame.FromString(raw)  # every frame the daemon sends is well-formed
                    if frame.WhichOneof("part") == "header" and frame.header.found:
                        assert frame.header.meta.nbytes == 100_000

            c = code_of(call)
            codes[c] = codes.get(c, 0) + 1
        check_codes(codes, "get fuzz")
        assert health(fuzzd.address) == SERVING
    print(f"{n} get requests: {dict((c.name, k) for c, k in codes.items())}")


def test_disk_files_are_named_by_hashes_only(fuzzd: DaemonProcess) -> None:
    """After all the fuzzing: only hash-named chunk files under the disk tier's root."""
    disk = Path(fuzzd.workdir).parent / "disk"
    files = [p.relative_to(disk).as_posix() for p in disk.rglob("*") if p.is_file()]
    assert len(files) > 1
    assert all(f == ".lock" or re.fullmatch(r"[0-9a-f]{2}/[0-9a-f]{62}\.kvc", f) for f in files), files[:5]
