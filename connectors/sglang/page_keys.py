"""How one HiCache backend (one rank) names SGLang's pages in kvstore.

SGLang's page key (a 64-hex chained sha256 of the page's tokens; any other
string is hashed to one) becomes the digest of a :class:`~kvstore.keys.ChunkKey`
in the namespace ``tenant/model``, with a layout fingerprint over dtype,
layers, heads, head dim, page size, the tensor-parallel shard (TP rank/size;
for MLA, whose latent is the same on every TP rank, the decode-context-parallel
shard instead) and the pipeline / context-parallel stage.  Until a host pool is
registered, and for values that are not pages of it, the fingerprint is a raw
one (bytes as they are, per shard and stage).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

from kvstore.client.payload import dtype_name
from kvstore.errors import InvalidArgument
from kvstore.keys import ChunkKey, LayoutFingerprint, Namespace

from .pages import PageGeometry

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MODEL_BAD = re.compile(r"[^A-Za-z0-9._/+-]+")


class PageKeys:
    """The keys of one backend's pages; ``config`` is SGLang's ``HiCacheStorageConfig``."""

    def __init__(self, config: Any, tenant: str, model: str | None) -> None:
        self.namespace = Namespace(tenant, model_id(model or config.model_name))
        if config.is_mla_model:
            # The latent is replicated across TP ranks: every rank shares one copy
            # (SGLang lets only the writer rank store it); DCP ranks hold slices.
            self.shard: tuple[int, int] = (config.dcp_rank, config.dcp_size)
        else:
            self.shard = (config.tp_rank, config.tp_size)
        stage = []
        if config.pp_size > 1:
            stage.append(f"pp={config.pp_rank}/{config.pp_size}")
        if config.attn_cp_size > 1:
            stage.append(f"cp={config.attn_cp_rank}/{config.attn_cp_size}")
        #: The pipeline / context-parallel stage ("" with neither).
        self.stage = ";".join(stage)
        self._raw_fp = LayoutFingerprint("uint8", 1, 1, 1, *self.shard, 1, self._layout_tag("sglang-raw")).digest
        self._page_fp: str | None = None

    def _layout_tag(self, name: str) -> str:
        return f"{name};{self.stage}" if self.stage else name

    def register(self, geom: PageGeometry, format_tag: str | None) -> None:
        """Pages of ``geom`` (the host pool's, with its storage format tag) get their own fingerprint."""
        layout = self._layout_tag(geom.chunk_layout + (f";fmt={format_tag}" if format_tag else ""))
        self._page_fp = LayoutFingerprint(
            dtype_name(geom.dtype), geom.num_layers, geom.num_heads, geom.head_dim, *self.shard, geom.page_size, layout,
        ).digest

    def _key(self, key: str, fp: str) -> ChunkKey:
        if not isinstance(key, str) or not key:
            raise InvalidArgument(f"a HiCache key must be a non-empty string, got {key!r}")
        digest = key if _HEX64.match(key) else hashlib.sha256(key.encode()).hexdigest()
        return ChunkKey(self.namespace, fp, "p" + digest)

    def pages(self, keys: Sequence[str]) -> list[ChunkKey]:
        """The keys of pages (raw keys before a pool is registered)."""
        fp = self._page_fp or self._raw_fp
        return [self._key(k, fp) for k in keys]

    def raw(self, key: str) -> ChunkKey:
        """The key of a value stored as it is (not a page of the pool)."""
        return self._key(key, self._raw_fp)

    def both(self, key: str) -> list[ChunkKey]:
        """Every key ``key`` may be stored under: as a page, then raw."""
        return [*self.pages([key]), self.raw(key)] if self._page_fp is not None else [self.raw(key)]


def model_id(name: str | None) -> str:
    """SGLang's model name (a path or hub id) as a valid namespace model."""
    text = _MODEL_BAD.sub("-", name or "").strip("/")
    text = re.sub(r"/{2,}", "/", text).lstrip("._+-/")
    return text[:256] or "unnamed"
