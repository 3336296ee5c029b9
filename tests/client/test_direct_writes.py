"""Puts the sync client writes straight into a real daemon's CPU tier memory
(direct writes: kvstore/client/arena_writes.py, kvstore/server/direct_writes.py).

What must hold: byte-exact values of every dtype, of views (C order), and of sizes around the
checksum's pieces and leaves and the split copy, with a checksum that is that of the
stored bytes; other clients (direct reads, the byte stream) see each put and
overwrite at once; changing sizes leaks no reserved block; the config switch,
the client switch and a token file each turn it off and puts still work;
threads sharing a client all get their values stored; a dead daemon gives an
error, not a hang; a batch (``put_many``) takes one request per group of
chunks, in the order given, with what cannot be written directly put the
ordinary way; a group the daemon refuses mid-batch stores none of its chunks,
keeps those stored before it, and leaves the connection in step.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

import kvstore
from kvstore.admin.client import AdminClient
from kvstore.chunk import SUM_LEAF, Chunk, ChunkMeta, checksum
from kvstore.client import blocking_channel
from kvstore.client.arena_writes import GROUP_BYTES, Then
from kvstore.server.direct_writes import MAX_HELD
from kvstore.errors import InvalidArgument, KVStoreError
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.tiers.copier import SPLIT_SUMMED, SUM_PIECE
from kvstore.tiers.shared_arena import SUPPORTED
from tests.client.test_direct_reads import DTYPES, values
from tests.server import MiB, key
from tests.support.daemon import DaemonProcess, cpu_and_disk, cpu_only
from tests.support.threads import run_workers
from tests.support.metrics import free_port, scrape

pytestmark = pytest.mark.skipif(not SUPPORTED, reason="the shared arena is offered on x86-64 only")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with DaemonProcess(tmp_path_factory.mktemp("dwc"), cpu_only("256MiB")) as d:
        yield d


def used(address: str) -> tuple[int, int]:
    """The CPU tier's used bytes and chunk count."""
    with AdminClient(address) as admin:
        tier = next(t for t in admin.stats().tiers if t.name == "cpu")
    return tier.used_bytes, tier.chunks


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_puts_are_byte_exact_with_the_stored_bytes_checksum(server: DaemonProcess, dtype: torch.dtype) -> None:
    with kvstore.Client(server.address) as c, kvstore.Client(server.address, shm=False) as stream:
        for i, shape in enumerate([(4, 64), (3, 1000), (2, 5, 4096)]):
            t = values(i, shape, dtype)
            k = key(i, model=f"dw-{dtype}".replace("torch.", ""))
            assert c.put(k, t) == "cpu"
            got = stream.get(k)
            assert got is not None and got.meta.checksum == checksum(got.data)
            back = got.tensor()
            assert back.dtype == dtype and back.shape == t.shape
            assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))
        assert c.direct_writes == 3  # the first put too: it registers the segment first


@pytest.mark.parametrize(
    "size", [1, 4095, SUM_PIECE - 1, SUM_PIECE + 1, 3 * SUM_PIECE + 17, SUM_LEAF + 1, SPLIT_SUMMED - 1, SPLIT_SUMMED + 4097]
)
def test_sizes_around_the_pieces_and_the_split(server: DaemonProcess, size: int) -> None:
    g = torch.Generator().manual_seed(size)
    with kvstore.Client(server.address) as c:
        c.put(key(0, model="warm"), b"w")
        for i in range(2):
            data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g)
            k = key(size, model="sizes")
            c.put(k, data)  # the second replaces the first
            out = torch.empty(size, dtype=torch.uint8)
            meta = c.get_into(k, out)
            assert meta is not None and meta.checksum == checksum(out.numpy().data) and torch.equal(out, data)
        assert c.direct_writes == 3  # the warm-up put too


@pytest.mark.parametrize("follow", [True, False], ids=["checksums-follow", "checksums-inline"])
def test_both_ways_of_sending_the_checksums(server: DaemonProcess, follow: bool) -> None:
    """A daemon that offers SUMS_FOLLOW gets the request before the copies and
    their checksums after; one that does not (an older release) gets them in
    the request.  Both store every chunk of a batch byte-exact."""
    g = torch.Generator().manual_seed(int(follow))
    values = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in (1, 5000, SUM_LEAF + 3)]
    keys = [key(i, model=f"sums-{follow}") for i in range(len(values))]
    with kvstore.Client(server.address) as c, kvstore.Client(server.address, shm=False) as stream:
        c.put(key(99, model=f"sums-{follow}"), b"attach")
        arena = c._blocking.arena if c._blocking is not None else None
        assert arena is not None and arena.sums_follow
        arena.sums_follow = follow
        assert c.put_many(list(zip(keys, values, strict=True))) == ["cpu"] * len(values)
        assert c.direct_writes == 1 + len(values)
        for k, v in zip(keys, values, strict=True):
            got = stream.get(k)
            assert got is not None and got.meta.checksum == checksum(got.data)
            assert bytes(got.data) == v.numpy().tobytes()


def test_views_are_put_as_their_values_in_c_order(server: DaemonProcess) -> None:
    """A direct write copies from the tensor's own memory: a slice that starts
    inside its storage, a transposed and an expanded view (copied to C order
    first), and a 0-d tensor each store exactly the values they show."""
    base = torch.arange(4 * 1000, dtype=torch.float32).reshape(4, 1000)
    views = {
        "slice": base[1:3],
        "transposed": base.t(),
        "expanded": torch.arange(1000, dtype=torch.float16).expand(3, 1000),
        "scalar": torch.tensor(7.5, dtype=torch.float64),
    }
    with kvstore.Client(server.address) as c, kvstore.Client(server.address, shm=False) as stream:
        for i, (name, t) in enumerate(views.items()):
            k = key(i, model=f"views-{name}")
            assert c.put(k, t) == "cpu"
            got = stream.get(k)
            assert got is not None, name
            back = got.tensor()
            assert back.shape == t.shape and back.dtype == t.dtype and torch.equal(back, t), name
        assert c.direct_writes == len(views)


def test_bytes_and_overwrites_are_seen_by_other_clients_at_once(server: DaemonProcess) -> None:
    k = key(1, model="seen")
    out = torch.empty(MiB, dtype=torch.uint8)
    with kvstore.Client(server.address) as writer, kvstore.Client(server.address) as reader:
        writer.put(key(0, model="seen"), b"first")
        for version in range(4):
            writer.put(k, bytes([version]) * MiB)
            assert reader.get_into(k, out) is not None and bool((out == version).all())
        assert writer.direct_writes == 5  # every put, the first one too
        writer.delete([k])
        assert reader.get_into(k, out) is None


def test_changing_sizes_leaks_no_block(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, cpu_only("64MiB")) as d:
        sizes = [MiB, 3 * MiB + 5, 100, MiB, 9 * MiB, 100]
        with kvstore.Client(d.address) as c:
            for i, n in enumerate(sizes):
                c.put(key(i, model="sizes"), bytes([i]) * n)
            assert c.direct_writes == len(sizes)
            for i, n in enumerate(sizes):
                assert c.get_bytes(key(i, model="sizes")) == bytes([i]) * n
        # Closed: only the chunks are left (each in a block rounded up to 256 bytes).
        nbytes, chunks = used(d.address)
        assert chunks == len(sizes) and sum(sizes) <= nbytes <= sum(sizes) + 256 * len(sizes)


@pytest.mark.parametrize("how", ["config", "client", "tokens"])
def test_direct_writes_can_be_turned_off(tmp_path: Path, how: str) -> None:
    token = "token-of-tenant-t-readwrite"
    cfg = cpu_only("64MiB", shm_direct_writes=how != "config")
    if how == "tokens":
        tokens = tmp_path / "tokens.yaml"
        tokens.write_text(yaml.safe_dump({"tokens": [{"token": token, "tenant": "t", "role": "readwrite"}]}))
        cfg["server"]["token_file"] = str(tokens)
    with DaemonProcess(tmp_path / "d", cfg) as d:
        kwargs = {"token": token} if how == "tokens" else {}
        with kvstore.Client(d.address, direct_writes=how != "client", **kwargs) as c:
            for i in range(3):
                c.put(key(i), torch.full((100_000,), i, dtype=torch.uint8))
            for i in range(3):
                assert c.get_bytes(key(i)) == bytes([i]) * 100_000
            assert c.uses_shm and c.direct_writes == 0


def test_threads_sharing_a_client_all_store_their_values(server: DaemonProcess) -> None:
    """One client, four threads: whichever finds the control channel busy takes
    another path; every value is stored whole."""
    with kvstore.Client(server.address) as c:
        c.put(key(0, model="threads"), b"warm")

        def work(t: int) -> None:
            for i in range(20):
                c.put(key(100 * t + i, model="threads"), bytes([t * 20 + i]) * (256 * 1024 + t))

        run_workers(work, 4)
        for t in range(4):
            for i in range(20):
                assert c.get_bytes(key(100 * t + i, model="threads")) == bytes([t * 20 + i]) * (256 * 1024 + t)
        assert c.direct_writes > 0


def test_a_dead_daemon_gives_an_error(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, cpu_only("64MiB")) as d:
        with kvstore.Client(d.address, timeout_s=2, retries=0) as c:
            c.put(key(1), b"a" * 1000)
            c.put(key(2), b"b" * 1000)
            assert c.direct_writes == 2
            d.send_signal(signal.SIGKILL)
            d.wait()
            with pytest.raises(KVStoreError):
                c.put(key(3), b"c" * 1000)


def test_a_value_larger_than_the_cpu_tier_goes_below_it(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path / "d", cpu_and_disk(tmp_path / "disk", cpu="4MiB", disk="64MiB")) as d:
        with kvstore.Client(d.address) as c:
            c.put(key(0, model="big"), b"warm")
            assert c.put(key(1, model="big"), bytes([7]) * (6 * MiB)) == "disk"  # no block: through the daemon
            assert c.get_bytes(key(1, model="big")) == bytes([7]) * (6 * MiB)
            assert c.put(key(2, model="big"), bytes([8]) * MiB) == "cpu"
            assert c.direct_writes == 2  # the warm-up put and this one


def test_a_batch_is_one_request_per_group(tmp_path: Path) -> None:
    port = free_port()
    with DaemonProcess(tmp_path, cpu_only("256MiB", metrics_port=port)) as d:

        def requests() -> float:
            samples = scrape(port)  # no series before the first
            return samples.get(("kvstore_rpc_duration_seconds_count", (("method", "KVStore/ArenaPut"),)), 0.0)

        g = torch.Generator().manual_seed(5)
        with kvstore.Client(d.address) as c:
            c.put(key(0, model="batch"), b"a first put")
            n = 3 * MAX_HELD + 1  # four groups
            for rnd in range(3):
                values = [torch.randint(0, 256, (MiB + 256,), dtype=torch.uint8, generator=g) for _ in range(n)]
                keys = [key(1000 * rnd + i, model="batch") for i in range(n)]
                before = requests()
                assert c.put_many(list(zip(keys, values, strict=True))) == ["cpu"] * n
                # The first group reserves its blocks first; every other finds them reserved.
                assert requests() - before == (5 if rnd == 0 else 4)
                for k, v in zip(keys, values, strict=True):
                    out = torch.empty_like(v)
                    meta = c.get_into(k, out)
                    assert meta is not None and meta.checksum == checksum(out.numpy().data) and torch.equal(out, v)
            assert c.direct_writes == 1 + 3 * n  # the first put too


def test_a_group_refused_mid_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon refuses the second group's request (a key spoilt on its way
    out): its chunks are not stored, the first group's are, the error is
    raised, and the connection stays in step: the blocks the refused request
    named are given back, and the next batch is stored."""
    sent: list[int] = []
    call = blocking_channel.BlockingControlChannel._arena_call

    def spoils_the_second(
        self: blocking_channel.BlockingControlChannel, request: pb.ArenaPutRequest, then: Then | None = None
    ) -> pb.ArenaPutReply:
        if request.items:
            sent.append(len(request.items))
            if len(sent) == 2:
                request.items[0].key = "not/a/key"
        return call(self, request, then)

    n = 2 * MAX_HELD
    g = torch.Generator().manual_seed(9)
    values = [torch.randint(0, 256, (MiB,), dtype=torch.uint8, generator=g) for _ in range(n)]
    keys = [key(i, model="refused") for i in range(n)]
    with DaemonProcess(tmp_path, cpu_only("256MiB")) as d:
        with kvstore.Client(d.address) as c:
            c.put(key(100, model="refused"), b"a first put")
            monkeypatch.setattr(blocking_channel.BlockingControlChannel, "_arena_call", spoils_the_second)
            with pytest.raises(InvalidArgument, match=r"items\[0\]\.key"):
                c.put_many(list(zip(keys, values, strict=True)))
            assert sent == [MAX_HELD, MAX_HELD]
            out = torch.empty(MiB, dtype=torch.uint8)
            for i, (k, v) in enumerate(zip(keys, values, strict=True)):
                meta = c.get_into(k, out)
                if i >= MAX_HELD:
                    assert meta is None, i
                else:
                    assert meta is not None and torch.equal(out, v), i
            monkeypatch.undo()
            again = [v.flip(0) for v in values]
            assert c.put_many(list(zip(keys, again, strict=True))) == ["cpu"] * n
            assert c.direct_writes == 1 + MAX_HELD + n  # the first put, the first group, then all
            for k, v in zip(keys, again, strict=True):
                assert c.get_into(k, out) is not None and torch.equal(out, v)
        nbytes, chunks = used(d.address)
        assert chunks == n + 1 and n * MiB <= nbytes <= n * MiB + 4096


def test_puts_past_the_reserved_share_go_through_the_daemon(tmp_path: Path) -> None:
    """A 64 MiB tier with shm_reserved_share 0.125: 8 MiB reserved at most,
    all clients together. A batch that needs more, or a client that would
    pass it because another holds blocks, is stored through the daemon."""
    g = torch.Generator().manual_seed(13)

    def tensors(n: int, size: int) -> list[torch.Tensor]:
        return [torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g) for _ in range(n)]

    def stored(c: kvstore.Client, items: list[tuple[str, torch.Tensor]]) -> bool:
        out = torch.empty_like(items[0][1])
        return all(c.get_into(k, out) is not None and torch.equal(out, v) for k, v in items)

    with DaemonProcess(tmp_path, cpu_only("64MiB", shm_reserved_share=0.125)) as d:
        with kvstore.Client(d.address) as a, kvstore.Client(d.address) as b:
            for c in (a, b):
                c.put(key(0, model="share"), b"a small first put")
                assert c.direct_writes == 1  # it holds a 256-byte block reserved
            big = [(key(1 + i, model="share"), v) for i, v in enumerate(tensors(8, 2 * MiB))]  # 16 MiB
            assert a.put_many(big) == ["cpu"] * 8 and a.direct_writes == 1 and stored(a, big)
            small = [(key(10 + i, model="share"), v) for i, v in enumerate(tensors(3, 2 * MiB))]
            assert a.put_many(small) == ["cpu"] * 3 and a.direct_writes == 4  # a now holds 6 MiB reserved
            other = (key(20, model="share"), tensors(1, 4 * MiB)[0])
            assert b.put(*other) == "cpu" and b.direct_writes == 1 and stored(b, [other])
        with kvstore.Client(d.address) as b:  # a is gone, and its blocks with it
            b.put(key(0, model="share"), b"a small first put")
            again = (key(21, model="share"), tensors(1, 4 * MiB)[0])
            assert b.put(*again) == "cpu" and b.direct_writes == 2 and stored(b, [again])


def test_a_batch_of_mixed_sizes_and_values(tmp_path: Path) -> None:
    """Sizes that change within a batch and between batches, groups cut by
    bytes, values that are not written directly: all stored, in order, and
    nothing left reserved once the client closes."""
    big = GROUP_BYTES // 3 + 1  # three do not fit in a group
    with DaemonProcess(tmp_path, cpu_only("512MiB")) as d:
        expect: dict[str, bytes] = {}
        with kvstore.Client(d.address) as c:
            c.put(key(0, model="mixed"), b"w")
            expect[key(0, model="mixed")] = b"w"
            batches = [
                [100, MiB, 100, 3 * MiB + 1, big, big, big, 5],
                [MiB, MiB, 7, big],
                [3 * MiB + 1] * (MAX_HELD + 2),
            ]
            for b, sizes in enumerate(batches):
                items = [(key(100 * b + i, model="mixed"), bytes([b * 16 + i]) * n) for i, n in enumerate(sizes)]
                assert c.put_many(items) == ["cpu"] * len(items)
                expect.update(items)
            written = c.direct_writes
            assert written == 1 + sum(len(s) for s in batches)  # every put, the first one too
            # A Chunk, or an empty value, in the batch: the whole batch goes the ordinary way.
            chunk = Chunk(ChunkMeta(nbytes=4, checksum=checksum(b"abcd")), memoryview(b"abcd"))
            odd = [(key(900, model="mixed"), b"x" * 1000), (key(901, model="mixed"), chunk), (key(902, model="mixed"), b"")]
            assert c.put_many(odd) == ["cpu"] * 3
            expect.update({key(900, model="mixed"): b"x" * 1000, key(901, model="mixed"): b"abcd", key(902, model="mixed"): b""})
            # A key named twice: the later value wins, as it would one put at a time.
            twice = [(key(910, model="mixed"), b"first" * 100), (key(910, model="mixed"), b"second" * 100)]
            assert c.put_many(twice) == ["cpu", "cpu"]
            expect[key(910, model="mixed")] = b"second" * 100
            assert c.direct_writes == written
            for k, v in expect.items():
                assert c.get_bytes(k) == v, k
        nbytes, chunks = used(d.address)
        total = sum(len(v) for v in expect.values())
        assert chunks == len(expect) and total <= nbytes <= total + 256 * len(expect)


def test_a_batch_with_a_value_larger_than_the_cpu_tier(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path / "d", cpu_and_disk(tmp_path / "disk", cpu="4MiB", disk="64MiB")) as d:
        with kvstore.Client(d.address) as c:
            c.put(key(0, model="big"), b"warm")
            items = [(key(1, model="big"), bytes([1]) * MiB), (key(2, model="big"), bytes([2]) * (6 * MiB)),
                     (key(3, model="big"), bytes([3]) * 1000)]
            # No block for the 6 MiB value: through the daemon, which stores it below.
            assert c.put_many(items) == ["cpu", "disk", "cpu"]
            for k, v in items:
                assert c.get_bytes(k) == v
            assert c.direct_writes == 3  # the warm-up put, then the 1 MiB and the 1000-byte values


async def test_the_async_client_writes_directly(server: DaemonProcess) -> None:
    g = torch.Generator().manual_seed(11)
    values = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in (MiB, 5000, 3 * MiB, MiB)]
    keys = [key(i, model="async-dw") for i in range(len(values))]
    async with kvstore.AsyncClient(server.address) as c, kvstore.AsyncClient(server.address, shm=False) as stream:
        # The segment is registered before the first put: every put is written directly.
        assert await c.put(keys[0], b"first") == "cpu" and c.direct_writes == 1
        for rnd in range(2):
            assert await c.put_many(list(zip(keys, values, strict=True))) == ["cpu"] * len(values)
            assert c.direct_writes == 1 + (rnd + 1) * len(values)
            for k, v in zip(keys, values, strict=True):
                got = await stream.get(k)
                assert got is not None and got.meta.checksum == checksum(got.data)
                assert torch.equal(got.tensor(), v)
            values = [v.flip(0) for v in values]
        assert await c.put(keys[0], values[0]) == "cpu" and c.direct_writes == 2 * len(values) + 2
    async with kvstore.AsyncClient(server.address, direct_writes=False) as off:
        await off.put(keys[1], b"x")
        assert await off.put(keys[1], values[1]) == "cpu" and off.direct_writes == 0
        assert (await off.get(keys[1])) is not None and off.direct_reads == 1
    with pytest.raises(kvstore.InvalidArgument, match="direct_writes must be True or False"):
        kvstore.AsyncClient(server.address, direct_writes="yes")  # type: ignore[arg-type]
