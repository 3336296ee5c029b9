"""Chunk keys.

A *chunk* is the KV of ``chunk_size`` consecutive tokens for all layers of one
model shard.  Its key has three parts:

* the :class:`Namespace` (tenant + model id): the unit of isolation and quota;
* the :class:`LayoutFingerprint`: dtype, layers, KV heads, head dim, tensor
  parallel rank/size and chunk size, hashed to 16 hex digits, so that KV of a
  different shape or shard can never be mistaken for this one;
* a digest of the tokens.  Prefix keys chain: ``h_i = sha256(h_{i-1} || tok_i)``
  with ``h_{-1}`` = 32 zero bytes (sha256 rather than blake3: for 1 KiB inputs
  the CPU's SHA extensions make it about 1.5x faster here), so a chunk's key names the whole prefix that
  produced its KV.  Segment keys hash one segment's tokens alone (not chained) for
  position-independent reuse (CacheBlend); ``segment_layer_keys`` gives one such key
  per layer, for KV stored and loaded layer by layer.

Tokens are hashed as little-endian uint32, and the hashes are the same everywhere,
so keys are identical across processes, machines and Python hash seeds.

The wire form of a key is ``tenant/model/fingerprint/digest`` where digest is
``p`` (prefix) or ``s`` (segment) followed by 64 hex digits.  Models may contain
``/`` (``HuggingFaceTB/SmolLM2-135M``); the string is parsed from the right.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import blake3
import numpy as np

from kvstore.errors import InvalidArgument

DEFAULT_CHUNK_SIZE = 256
DIGEST_HEX = 64
_ZERO = bytes(32)
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/+-]{0,255}$")
_FP_RE = re.compile(r"^[0-9a-f]{16}$")
_DIGEST_RE = re.compile(r"^[ps][0-9a-f]{64}$")

KeyKind = Literal["p", "s"]


class Namespace(tuple[str, str]):
    """Tenant + model id: the unit of isolation, listing and quota.

    A tuple subclass so that keys containing it hash in C (lookups are hot).
    """

    __slots__ = ()

    def __new__(cls, tenant: str, model: str) -> Namespace:
        if not isinstance(tenant, str) or not _TENANT_RE.match(tenant):
            raise InvalidArgument(
                f"namespace.tenant {tenant!r} is invalid: use 1-64 characters "
                "from A-Z a-z 0-9 . _ - starting with a letter or digit"
            )
        if not isinstance(model, str) or not _MODEL_RE.match(model) or "//" in model or model.endswith("/"):
            raise InvalidArgument(
                f"namespace.model {model!r} is invalid: use 1-256 characters "
                "from A-Z a-z 0-9 . _ / + - (no empty path parts)"
            )
        return tuple.__new__(cls, (tenant, model))

    def __getnewargs__(self) -> tuple[str, str]:
        return (self[0], self[1])

    @property
    def tenant(self) -> str:
        return self[0]

    @property
    def model(self) -> str:
        return self[1]

    def __str__(self) -> str:
        return f"{self[0]}/{self[1]}"

    def __repr__(self) -> str:
        return f"Namespace({self[0]!r}, {self[1]!r})"

    @classmethod
    def parse(cls, text: str) -> Namespace:
        tenant, sep, model = text.partition("/")
        if not sep:
            raise InvalidArgument(f"namespace {text!r} is invalid: expected 'tenant/model'")
        return cls(tenant, model)


@dataclass(frozen=True, slots=True)
class LayoutFingerprint:
    """What must match for a chunk's KV to be usable by a reader."""

    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tp_rank: int = 0
    tp_size: int = 1
    chunk_size: int = DEFAULT_CHUNK_SIZE
    layout: str = "LKTHD"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "tp_size", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InvalidArgument(f"layout.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.tp_rank, int) or not 0 <= self.tp_rank < self.tp_size:
            raise InvalidArgument(
                f"layout.tp_rank must be in [0, tp_size={self.tp_size}), got {self.tp_rank!r}"
            )
        if not self.dtype or not isinstance(self.dtype, str):
            raise InvalidArgument("layout.dtype must be a dtype name such as 'bfloat16'")

    @property
    def digest(self) -> str:
        canon = (
            f"v1;dtype={self.dtype};layers={self.num_layers};kv_heads={self.num_kv_heads};"
            f"head_dim={self.head_dim};tp={self.tp_rank}/{self.tp_size};"
            f"chunk={self.chunk_size};layout={self.layout}"
        )
        return blake3.blake3(canon.encode()).hexdigest()[:16]


class ChunkKey(tuple[Namespace, str, str]):
    """The full key of one chunk: (namespace, fingerprint, digest).

    A tuple subclass rather than a dataclass: lookups build hundreds of
    thousands of keys per second, and a tuple is built and hashed in C.
    """

    __slots__ = ()

    def __new__(cls, namespace: Namespace, fingerprint: str, digest: str) -> ChunkKey:
        if not isinstance(namespace, Namespace):
            raise InvalidArgument(f"key namespace must be a Namespace, got {type(namespace).__name__}")
        if not isinstance(fingerprint, str) or not _FP_RE.match(fingerprint):
            raise InvalidArgument(
                f"key fingerprint {fingerprint!r} is invalid: expected 16 lowercase hex digits"
            )
        if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
            raise InvalidArgument(
                f"key digest {digest!r} is invalid: expected 'p' or 's' and 64 lowercase hex digits"
            )
        return tuple.__new__(cls, (namespace, fingerprint, digest))

    def __getnewargs__(self) -> tuple[Namespace, str, str]:  # copy support
        return (self[0], self[1], self[2])

    @property
    def namespace(self) -> Namespace:
        return self[0]

    @property
    def fingerprint(self) -> str:
        return self[1]

    @property
    def digest(self) -> str:
        return self[2]

    @property
    def kind(self) -> KeyKind:
        return "p" if self[2][0] == "p" else "s"

    def __str__(self) -> str:
        ns = self[0]
        return f"{ns.tenant}/{ns.model}/{self[1]}/{self[2]}"

    def __repr__(self) -> str:
        return f"ChunkKey({str(self)!r})"

    @classmethod
    def parse(cls, text: str) -> ChunkKey:
        """Parse the wire form; raises :class:`InvalidArgument` naming what is wrong."""
        if not isinstance(text, str) or len(text) > 512:
            raise InvalidArgument("key must be a string of at most 512 characters")
        parts = text.rsplit("/", 2)
        if len(parts) != 3:
            raise InvalidArgument(
                f"key {text[:80]!r} is invalid: expected 'tenant/model/fingerprint/digest'"
            )
        return cls(Namespace.parse(parts[0]), parts[1], parts[2])


def _token_bytes(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise InvalidArgument(f"tokens must be a flat sequence of ids, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise InvalidArgument(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 0xFFFFFFFF):
        raise InvalidArgument("token ids must be in [0, 2**32)")
    return arr.astype("<u4", copy=False)


def chunk_digests(
    tokens: Sequence[int] | np.ndarray,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    include_partial: bool = False,
) -> list[str]:
    """Chained prefix digests (``p`` + 64 hex) of each chunk of ``tokens``.

    A trailing partial chunk gets a digest only if ``include_partial``; its
    length is part of what is hashed, so it never equals a full chunk's.
    """
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise InvalidArgument(f"chunk_size must be a positive integer, got {chunk_size!r}")
    raw = _token_bytes(tokens).tobytes()
    n_tokens = len(raw) // 4
    n_full = n_tokens // chunk_size
    step = chunk_size * 4
    out: list[str] = []
    prev = _ZERO
    hasher = hashlib.sha256
    for i in range(n_full):
        prev = hasher(prev + raw[i * step : (i + 1) * step]).digest()
        out.append("p" + prev.hex())
    if include_partial and n_full * chunk_size < n_tokens:
        tail = raw[n_full * step :]
        prev = hasher(prev + tail + len(tail).to_bytes(4, "little")).digest()
        out.append("p" + prev.hex())
    return out


def segment_digest(tokens: Sequence[int] | np.ndarray) -> str:
    """Digest of one segment's tokens alone (not chained): ``s`` + 64 hex."""
    raw = _token_bytes(tokens).tobytes()
    if not raw:
        raise InvalidArgument("a segment must have at least one token")
    return "s" + blake3.blake3(b"segment" + raw).hexdigest()


def segment_layer_digests(tokens: Sequence[int] | np.ndarray, num_layers: int) -> list[str]:
    """Per-layer digests of one segment (``s`` + 64 hex each), not chained, position-free.

    blake3 in key-derivation mode (context ``"kvstore segment layer v1"``, so these can
    never collide with :func:`segment_digest`) over ``tokens || layer as uint32 LE``:
    the tokens are hashed once and the hasher state copied per layer.
    """
    if not isinstance(num_layers, int) or num_layers <= 0:
        raise InvalidArgument(f"num_layers must be a positive integer, got {num_layers!r}")
    raw = _token_bytes(tokens).tobytes()
    if not raw:
        raise InvalidArgument("a segment must have at least one token")
    base = blake3.blake3(raw, derive_key_context="kvstore segment layer v1")
    out = []
    for layer in range(num_layers):
        h = base.copy()
        h.update(layer.to_bytes(4, "little"))
        out.append("s" + h.hexdigest())
    return out


@dataclass(frozen=True, slots=True)
class KeyBuilder:
    """Makes :class:`ChunkKey` s for one namespace and layout."""

    namespace: Namespace
    layout: LayoutFingerprint
    include_partial: bool = False

    def prefix_keys(self, tokens: Sequence[int] | np.ndarray) -> list[ChunkKey]:
        fp = self.layout.digest
        ns = self.namespace
        return [
            _fast_key(ns, fp, d)
            for d in chunk_digests(
                tokens, self.layout.chunk_size, include_partial=self.include_partial
            )
        ]

    def segment_key(self, tokens: Sequence[int] | np.ndarray) -> ChunkKey:
        return ChunkKey(self.namespace, self.layout.digest, segment_digest(tokens))

    def segment_layer_keys(self, tokens: Sequence[int] | np.ndarray) -> list[ChunkKey]:
        """One key per layer for a segment stored layer by layer (CacheBlend loads layer i+1
        while it recomputes layer i): ``layout.num_layers`` keys, each naming the segment's
        tokens alone and the layer index."""
        fp = self.layout.digest
        ns = self.namespace
        return [_fast_key(ns, fp, d) for d in segment_layer_digests(tokens, self.layout.num_layers)]


def _fast_key(ns: Namespace, fp: str, digest: str) -> ChunkKey:
    # Skips re-validation of parts we produced ourselves (hot path of lookups).
    return tuple.__new__(ChunkKey, (ns, fp, digest))
