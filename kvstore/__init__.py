"""kvstore: a tiered KV-cache storage service for LLM inference.

The public surface: keys (:class:`Namespace`, :class:`LayoutFingerprint`,
:class:`KeyBuilder`, :class:`ChunkKey`), chunk values (:class:`Chunk`,
:class:`ChunkMeta`), the in-process :class:`TieredStore`, the daemon's
clients (:class:`Client`, :class:`AsyncClient`) and the typed errors.
Heavy pieces (the store, clients) are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvstore.chunk import Chunk, ChunkMeta
from kvstore.errors import (
    CapacityError,
    ConfigError,
    CorruptChunk,
    InvalidArgument,
    KVStoreError,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    RemoteUnavailable,
    Unauthenticated,
)
from kvstore.keys import ChunkKey, KeyBuilder, LayoutFingerprint, Namespace

if TYPE_CHECKING:
    from kvstore.client import AsyncClient, Client
    from kvstore.store import TieredStore

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "CapacityError",
    "Chunk",
    "ChunkKey",
    "ChunkMeta",
    "Client",
    "ConfigError",
    "CorruptChunk",
    "InvalidArgument",
    "KVStoreError",
    "KeyBuilder",
    "LayoutFingerprint",
    "Namespace",
    "NotFound",
    "PermissionDenied",
    "QuotaExceeded",
    "RemoteUnavailable",
    "TieredStore",
    "Unauthenticated",
]

_LAZY = {"AsyncClient": "kvstore.client", "Client": "kvstore.client", "TieredStore": "kvstore.store"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvstore' has no attribute {name!r}")
