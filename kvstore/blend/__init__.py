"""CacheBlend: reuse the KV of non-prefix segments with selective recompute.

Modules, one concept each: :mod:`~kvstore.blend.config` (knobs), :mod:`~kvstore.blend.segments`
(splitting a prompt), :mod:`~kvstore.blend.rope` (moving keys to new positions),
:mod:`~kvstore.blend.model` (a Llama-family model layer by layer), :mod:`~kvstore.blend.fusion`
(selective recompute), :mod:`~kvstore.blend.loader` (background layer loading),
:mod:`~kvstore.blend.source` (daemon or TieredStore), :mod:`~kvstore.blend.api` (the entry point).
See docs/cacheblend.md.
"""

from kvstore.blend.api import BlendResult, CacheBlend, SegmentHit
from kvstore.blend.config import BlendConfig
from kvstore.blend.errors import SegmentMissing, UnsupportedModel
from kvstore.blend.segments import Segment, split
from kvstore.blend.source import ClientSource, KVSource, StoreSource

__all__ = [
    "BlendConfig",
    "BlendResult",
    "CacheBlend",
    "ClientSource",
    "KVSource",
    "Segment",
    "SegmentHit",
    "SegmentMissing",
    "StoreSource",
    "UnsupportedModel",
    "split",
]
