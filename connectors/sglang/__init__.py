"""kvstore as SGLang's HiCache storage backend (``--hicache-storage-backend dynamic``).

Importing this package imports SGLang's ``hicache_storage`` module (the base
class); it is loaded only by SGLang's backend factory or by code that uses it.
See docs/sglang.md.
"""

from .options import HiCacheOptions
from .pages import PageGeometry, geometry_of
from .stats import HiCacheStats
from .storage import KVStoreHiCacheStorage

__all__ = ["HiCacheOptions", "HiCacheStats", "KVStoreHiCacheStorage", "PageGeometry", "geometry_of"]
