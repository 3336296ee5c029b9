"""Token chunking and chunk keys, shared by every connector.

A request's tokens are cut into chunks of ``chunk_size``; chunk ``i`` covers
tokens ``[i * chunk_size, (i + 1) * chunk_size)`` and is named by the chained
prefix digest of :func:`kvstore.keys.chunk_digests`, so a chunk's key names the
whole prefix that produced its KV.  Only full chunks get keys: a trailing
partial chunk is recomputed by the engine (it is at most ``chunk_size - 1``
tokens, and its KV would be useless to a longer prompt, whose chunk at that
position has different tokens).

Digests depend on tokens only; the full key adds the namespace and the layout
fingerprint of one model shard (:class:`kvstore.keys.LayoutFingerprint`), which
each worker adds for its own tensor-parallel rank (:meth:`TokenChunker.keys`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvstore.errors import InvalidArgument
from kvstore.keys import ChunkKey, LayoutFingerprint, Namespace, chunk_digests


@dataclass(frozen=True, slots=True)
class TokenChunker:
    """Cuts token sequences into chunks of ``chunk_size`` and names them."""

    chunk_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_size, int) or not 1 <= self.chunk_size <= 1 << 20:
            raise InvalidArgument(f"chunk_size must be an integer in [1, 1048576], got {self.chunk_size!r}")

    def full_chunks(self, num_tokens: int) -> int:
        """How many full chunks ``num_tokens`` tokens make."""
        return max(0, num_tokens) // self.chunk_size

    def span(self, index: int) -> tuple[int, int]:
        """Token range ``[start, end)`` of chunk ``index``."""
        return index * self.chunk_size, (index + 1) * self.chunk_size

    def digests(self, tokens: Sequence[int] | np.ndarray, num_chunks: int | None = None) -> list[str]:
        """Chained digests of the first ``num_chunks`` full chunks (all when None)."""
        n = self.full_chunks(len(tokens))
        if num_chunks is not None:
            if num_chunks > n:
                raise InvalidArgument(f"{len(tokens)} tokens hold {n} full chunks, {num_chunks} were asked for")
            n = num_chunks
        if n == 0:
            return []
        return chunk_digests(np.asarray(tokens[: n * self.chunk_size], dtype=np.int64), self.chunk_size)

    @staticmethod
    def keys(namespace: Namespace, layout: LayoutFingerprint, digests: Sequence[str]) -> list[ChunkKey]:
        """Full keys of ``digests`` for one model shard."""
        fp = layout.digest
        return [ChunkKey(namespace, fp, d) for d in digests]
