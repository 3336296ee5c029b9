"""Per-layer segment keys (kvstore.keys.KeyBuilder.segment_layer_keys), as CacheBlend uses them."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore.errors import InvalidArgument
from kvstore.keys import ChunkKey, KeyBuilder, LayoutFingerprint, Namespace

KB = KeyBuilder(Namespace("t", "m"), LayoutFingerprint("float32", 4, 2, 16))


def test_one_distinct_key_per_layer_naming_only_the_tokens() -> None:
    keys = KB.segment_layer_keys([5, 6, 7])
    assert len(keys) == 4 and len(set(keys)) == 4
    assert all(k.kind == "s" and ChunkKey.parse(str(k)) == k for k in keys)
    assert KB.segment_layer_keys(np.array([5, 6, 7], dtype=np.int32)) == keys  # dtype-independent
    assert KB.segment_layer_keys([5, 6, 8]) != keys
    assert KB.segment_key([5, 6, 7]) not in keys  # domain-separated from whole-segment keys
    # Same tokens, another layout: other keys (KV of another shape is never mistaken for this one).
    other = KeyBuilder(Namespace("t", "m"), LayoutFingerprint("bfloat16", 4, 2, 16))
    assert set(other.segment_layer_keys([5, 6, 7])).isdisjoint(keys)


def test_known_digest_is_stable() -> None:
    # Keys must be identical across processes and releases: pin one.
    assert KB.segment_layer_keys([1, 2, 3])[0].digest == (
        "s" + __import__("blake3").blake3(
            np.array([1, 2, 3], dtype="<u4").tobytes() + (0).to_bytes(4, "little"),
            derive_key_context="kvstore segment layer v1",
        ).hexdigest()
    )


def test_empty_segment_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="at least one token"):
        KB.segment_layer_keys([])
