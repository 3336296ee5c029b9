"""Background saves into a real daemon; the embedded daemon."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from kvstore.client import Client
from kvstore.connectors.embedded import EmbeddedDaemon
from kvstore.connectors.saver import Saver
from kvstore.errors import ConfigError
from kvstore.keys import ChunkKey, KeyBuilder, LayoutFingerprint, Namespace
from tests.support.daemon import DaemonProcess, cpu_only
from tests.support.redis import free_port

LAYOUT = LayoutFingerprint("bfloat16", 4, 2, 32, chunk_size=64)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for the module (a start costs seconds on a loaded machine)."""
    with DaemonProcess(tmp_path_factory.mktemp("saver"), cpu_only()) as d:
        yield d


def chunks(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 2, 64, 2, 32, generator=gen).to(torch.bfloat16) for _ in range(n)]


def keys(n: int, tag: str = "saver") -> list[ChunkKey]:
    return KeyBuilder(Namespace("t", tag), LAYOUT).prefix_keys(list(range(64 * n)))


@pytest.mark.parametrize("codec", ["raw", "zstd", "cachegen"])
def test_saved_chunks_read_back(daemon: DaemonProcess, codec: str) -> None:
    data = chunks(3)
    with Client(daemon.address) as client:
        # cachegen at level 0 (near-lossless): its error is at most half a grid step.
        saver = Saver(client.put_many, codec=codec, level=0 if codec == "cachegen" else None)
        assert saver.submit(list(zip(keys(3, codec), data)))
        saver.close()
        assert saver.stats.chunks_saved == 3 and saver.stats.chunks_failed == 0
        for key, want in zip(keys(3, codec), data):
            got = client.get(key)
            assert got is not None and got.meta.codec == codec
            kv = got.tensor()
            assert kv.shape == want.shape
            if codec == "cachegen":
                err = (kv.float() - want.float()).pow(2).mean().sqrt() / want.float().pow(2).mean().sqrt()
                assert err < 0.05
            else:
                assert torch.equal(kv, want)


def test_backlog_drop_and_block(daemon: DaemonProcess) -> None:
    gate = threading.Event()
    with Client(daemon.address) as client:

        def slow_put(items: object) -> object:
            gate.wait(10)
            return client.put_many(items)  # type: ignore[arg-type]

        one = chunks(1)[0].numel() * 2
        saver = Saver(slow_put, max_pending_bytes=max(one, 1 << 20), backlog="drop")
        ks = keys(2, "backlog")
        assert saver.submit([(ks[0], chunks(1)[0])])
        big = [(ks[1], torch.zeros(1 << 20, dtype=torch.uint8))]
        assert not saver.submit(big)  # over the bound while the first is pending
        assert saver.stats.chunks_dropped == 1
        gate.set()
        saver.close()
        assert saver.stats.chunks_saved == 1


def test_failed_puts_are_counted_not_raised() -> None:
    client = Client(f"127.0.0.1:{free_port()}", timeout_s=2.0, retries=0, shm=False)  # nothing listens
    saver = Saver(client.put_many)
    saver.submit(list(zip(keys(2), chunks(2))))
    saver.close()
    assert saver.stats.chunks_failed == 2 and saver.stats.chunks_saved == 0
    client.close()


def test_embedded_daemon_serves_and_stops() -> None:
    port = free_port()
    emb = EmbeddedDaemon("127.0.0.1", port, 64 << 20)
    try:
        with Client(f"127.0.0.1:{port}") as client:
            k = keys(1)[0]
            client.put(k, chunks(1)[0])
            assert client.lookup([k]).count == 1
    finally:
        emb.close()
    with pytest.raises(ConfigError, match="loopback"):
        EmbeddedDaemon("0.0.0.0", port, 64 << 20)
