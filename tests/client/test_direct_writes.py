"""Puts the sync client writes straight into a real daemon's CPU tier memory
(direct writes: kvstore/client/arena_writes.py, kvstore/server/direct_writes.py).

What must hold: byte-exact values of every dtype and of sizes around the
checksum's pieces and the split copy, with a checksum that is the xxh3 of the
stored bytes; other clients (direct reads, the byte stream) see each put and
overwrite at once; changing sizes leaks no reserved block; the config switch,
the client switch and a token file each turn it off and puts still work;
threads sharing a client all get their values stored; a dead daemon gives an
error, not a hang.
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
from kvstore.chunk import checksum
from kvstore.errors import KVStoreError
from kvstore.tiers.copier import SPLIT_SUMMED, SUM_PIECE
from kvstore.tiers.shared_arena import SUPPORTED
from tests.client.test_direct_reads import DTYPES, values
from tests.server import MiB, key
from tests.support.daemon import DaemonProcess, cpu_and_disk, cpu_only
from tests.support.threads import run_workers

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
        assert c.direct_writes >= 2  # the first put registered the segment over gRPC


@pytest.mark.parametrize(
    "size", [1, 4095, SUM_PIECE - 1, SUM_PIECE + 1, 3 * SUM_PIECE + 17, SPLIT_SUMMED - 1, SPLIT_SUMMED + 4097]
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
        assert c.direct_writes == 2


def test_bytes_and_overwrites_are_seen_by_other_clients_at_once(server: DaemonProcess) -> None:
    k = key(1, model="seen")
    out = torch.empty(MiB, dtype=torch.uint8)
    with kvstore.Client(server.address) as writer, kvstore.Client(server.address) as reader:
        writer.put(key(0, model="seen"), b"first")
        for version in range(4):
            writer.put(k, bytes([version]) * MiB)
            assert reader.get_into(k, out) is not None and bool((out == version).all())
        assert writer.direct_writes == 4  # the first put registered the segment
        writer.delete([k])
        assert reader.get_into(k, out) is None


def test_changing_sizes_leaks_no_block(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, cpu_only("64MiB")) as d:
        sizes = [MiB, 3 * MiB + 5, 100, MiB, 9 * MiB, 100]
        with kvstore.Client(d.address) as c:
            for i, n in enumerate(sizes):
                c.put(key(i, model="sizes"), bytes([i]) * n)
            assert c.direct_writes == len(sizes) - 1
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
            assert c.direct_writes == 1
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
            assert c.direct_writes == 1
