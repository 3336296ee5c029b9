"""Token chunking and chunk keys."""

from __future__ import annotations

import pytest

from kvstore.connectors.chunking import TokenChunker
from kvstore.errors import InvalidArgument
from kvstore.keys import KeyBuilder, LayoutFingerprint, Namespace


def test_digests_are_the_store_key_scheme() -> None:
    ns = Namespace("t", "m")
    layout = LayoutFingerprint("bfloat16", 30, 3, 64, chunk_size=16)
    tokens = list(range(1000, 1070))
    chunker = TokenChunker(16)
    keys = chunker.keys(ns, layout, chunker.digests(tokens))
    assert keys == KeyBuilder(ns, layout).prefix_keys(tokens)
    assert len(keys) == 4  # 70 tokens: 4 full chunks, the tail gets no key


def test_prefix_digests_do_not_depend_on_what_follows() -> None:
    chunker = TokenChunker(16)
    a = chunker.digests(list(range(64)))
    b = chunker.digests(list(range(48)) + [7] * 16)
    assert a[:3] == b[:3] and a[3] != b[3]
    assert chunker.digests(list(range(64)), 2) == a[:2]


def test_spans_and_counts() -> None:
    chunker = TokenChunker(256)
    assert chunker.span(3) == (768, 1024)
    assert chunker.full_chunks(1023) == 3
    assert chunker.full_chunks(-5) == 0
    assert chunker.digests([1, 2, 3]) == []


def test_invalid_arguments() -> None:
    with pytest.raises(InvalidArgument, match="chunk_size"):
        TokenChunker(0)
    with pytest.raises(InvalidArgument, match="full chunks"):
        TokenChunker(4).digests([1, 2, 3, 4], 2)
