"""Chunk keys: deterministic, chained, validated."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.errors import InvalidArgument
from kvstore.keys import ChunkKey, KeyBuilder, LayoutFingerprint, Namespace, chunk_digests, segment_digest

NS = Namespace("acme", "HuggingFaceTB/SmolLM2-135M")
LAYOUT = LayoutFingerprint("bfloat16", 30, 3, 64)


def test_known_digest_is_stable() -> None:
    # A fixed value: if this changes, every stored chunk becomes unreachable.
    assert chunk_digests(list(range(256)))[0] == "p" + hashlib.sha256(
        bytes(32) + np.arange(256, dtype="<u4").tobytes()
    ).hexdigest()
    assert chunk_digests(list(range(256)))[0] == (
        "p8c0f08d32eb37b958aba53c5f2915266a16446412f38aca2eb711c617dd50dc0"
    )


def test_same_keys_across_processes_and_hash_seeds() -> None:
    code = (
        "from kvstore.keys import *; "
        "kb=KeyBuilder(Namespace('acme','m'), LayoutFingerprint('float16',2,2,8)); "
        "print(','.join(str(k) for k in kb.prefix_keys(list(range(700)))))"
    )
    outs = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    assert len(outs) == 1


def test_chain_depends_on_whole_prefix() -> None:
    a = chunk_digests([1] * 256 + [2] * 256, 256)
    b = chunk_digests([3] * 256 + [2] * 256, 256)
    assert a[1] != b[1]  # same second chunk, different prefix
    assert segment_digest([2] * 256) == segment_digest([2] * 256)


def test_partial_tail_off_by_default() -> None:
    assert len(chunk_digests(list(range(600)), 256)) == 2
    with_tail = chunk_digests(list(range(600)), 256, include_partial=True)
    assert len(with_tail) == 3 and with_tail[:2] == chunk_digests(list(range(600)), 256)


def test_layout_changes_fingerprint() -> None:
    assert LAYOUT.digest != LayoutFingerprint("bfloat16", 30, 3, 64, tp_rank=1, tp_size=2).digest
    assert LAYOUT.digest != LayoutFingerprint("float16", 30, 3, 64).digest


@given(st.lists(st.integers(0, 2**32 - 1), max_size=1100))
def test_wire_form_round_trips(tokens: list[int]) -> None:
    kb = KeyBuilder(NS, LayoutFingerprint("float16", 2, 2, 8, chunk_size=64))
    for key in kb.prefix_keys(tokens):
        assert ChunkKey.parse(str(key)) == key
        assert key.namespace == NS


@pytest.mark.parametrize(
    "text",
    ["", "acme", "acme/m/xyz/p00", "../etc/passwd", "acme/m/" + "0" * 16 + "/q" + "0" * 64, "a" * 600],
)
def test_bad_keys_rejected(text: str) -> None:
    with pytest.raises(InvalidArgument):
        ChunkKey.parse(text)


@pytest.mark.parametrize("tokens", [[-1], [2**32], [[1, 2]], [1.5]])
def test_bad_tokens_rejected(tokens: list[object]) -> None:
    with pytest.raises(InvalidArgument):
        chunk_digests(tokens, 1)  # type: ignore[arg-type]


def test_bad_namespace_and_layout() -> None:
    with pytest.raises(InvalidArgument, match="tenant"):
        Namespace("a/b", "m")
    with pytest.raises(InvalidArgument, match="model"):
        Namespace("a", "m//x")
    with pytest.raises(InvalidArgument, match="tp_rank"):
        LayoutFingerprint("float16", 1, 1, 1, tp_rank=2, tp_size=2)
