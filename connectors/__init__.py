"""Connectors: plug kvstore into inference engines.

The engine-agnostic core (no engine imported):

* :mod:`.chunking`: token chunks and their keys (:class:`TokenChunker`);
* :mod:`.paged`: gather a chunk's KV out of paged KV buffers into the canonical
  ``LKTHD`` layout and scatter it back (:class:`PagedKV`, :class:`KVLayout`);
* :mod:`.saver`: encode and put gathered chunks on a background thread (:class:`Saver`);
* :mod:`.embedded`: a daemon inside the engine process (:class:`EmbeddedDaemon`).

Engine connectors: :mod:`kvstore.connectors.vllm` (``KVStoreConnector``) and
:mod:`kvstore.connectors.sglang`.  Each imports its engine; this package does not.
"""

from kvstore.connectors.chunking import TokenChunker
from kvstore.connectors.paged import KVLayout, PagedKV, PagedShape, slot_mapping

__all__ = ["KVLayout", "PagedKV", "PagedShape", "TokenChunker", "slot_mapping"]
