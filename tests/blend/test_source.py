"""Segment KV in a real kvstore daemon (ClientSource) and in a TieredStore (StoreSource)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kvstore.blend import ClientSource, SegmentMissing, StoreSource
from kvstore.client import Client
from kvstore.errors import CorruptChunk, InvalidArgument
from tests.blend.conftest import SEP, blender, doc, keys_for, tiny_model
from tests.support.daemon import DaemonProcess


def test_blend_through_the_daemon_equals_blend_through_a_tiered_store(
    daemon: DaemonProcess, source: StoreSource
) -> None:
    model = tiny_model("llama")
    docs = [doc(s, 30) for s in range(3)]
    ids = docs[2] + [SEP] + docs[0] + [SEP] + docs[1] + [SEP] + doc(50, 5)
    local = blender(model, source)
    with Client(daemon.address) as client:
        remote = blender(model, ClientSource(client))
        assert [h.stored for h in remote.lookup(ids)] == [False, False, False]
        assert remote.store(ids) == 3  # a whole prompt: each reusable segment stored alone
        assert remote.store(ids) == 0  # already there
        assert [h.stored for h in remote.lookup(ids)] == [True, True, True]
        local.store(ids)
        a, b = remote.prefill(ids), local.prefill(ids)
    assert a.reused_tokens == 90
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)


def test_segments_are_found_wherever_they_sit(daemon: DaemonProcess) -> None:
    model = tiny_model("qwen2")
    docs = [doc(s, 20) for s in range(3)]
    with Client(daemon.address) as client:
        b = blender(model, ClientSource(client))
        for d in docs:
            b.store(d)
        for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
            ids = sum((docs[i] + [SEP] for i in order), []) + doc(9, 4)
            hits = b.lookup(ids)
            assert [h.stored for h in hits] == [True] * 3
            assert [h.segment.start for h in hits] == [0, 21, 42]
        unknown = doc(123, 20) + [SEP] + docs[0] + [SEP] + doc(9, 4)
        assert [h.stored for h in b.lookup(unknown)] == [False, True]


def test_a_segment_deleted_before_its_load_raises_segment_missing(daemon: DaemonProcess) -> None:
    model = tiny_model("llama")
    docs = [doc(s, 20) for s in range(2)]
    ids = docs[0] + [SEP] + docs[1] + [SEP] + doc(4, 4)
    with Client(daemon.address) as client:
        src = ClientSource(client)
        b = blender(model, src)
        b.store(ids)
        keys = b.lookup(ids)[1].keys

        class Vanishing(ClientSource):
            """Deletes a late layer's chunk right after the lookup (an eviction in between)."""

            def exists(self, k: object) -> list[bool]:
                present = super().exists(k)  # type: ignore[arg-type]
                client.delete([keys[3]])
                return present

        b2 = blender(model, Vanishing(client))
        with pytest.raises(SegmentMissing, match="layer 3 is no longer stored"):
            b2.prefill(ids)


def test_kv_of_another_shape_is_refused_as_corrupt(source: StoreSource) -> None:
    model = tiny_model("llama")
    d = doc(1, 20)
    b = blender(model, source)
    keys = keys_for(model).segment_layer_keys(d)
    source.put_many([(k, torch.zeros(1, 2, 19, 2, 16)) for k in keys])  # one token short
    with pytest.raises(CorruptChunk, match="expected"):
        b.prefill(d + [SEP] + doc(2, 3))


def test_store_source_refuses_calls_from_its_own_loop(source: StoreSource) -> None:
    async def inside() -> None:
        source.exists([])  # empty: answered without the loop
        with pytest.raises(InvalidArgument, match="own event loop"):
            source.exists(keys_for(tiny_model("llama")).segment_layer_keys([5, 6]))

    import asyncio

    asyncio.run_coroutine_threadsafe(inside(), source.loop).result()


def test_client_source_factory_matches(daemon_factory: Callable[..., DaemonProcess]) -> None:
    d = daemon_factory()
    with Client(d.address) as client:
        src = ClientSource(client)
        assert src.exists([]) == []
        src.close()  # the client stays the caller's
        assert client.exists([]) == []
