"""Errors of CacheBlend: the expected ones are kvstore's typed errors (:mod:`kvstore.errors`)."""

from __future__ import annotations

from kvstore.errors import InvalidArgument, NotFound


class UnsupportedModel(InvalidArgument):
    """The model is not one CacheBlend knows how to run layer by layer (see :mod:`kvstore.blend.model`)."""


class SegmentMissing(NotFound):
    """A segment's KV vanished from the store between the lookup and the load (evicted, deleted)."""
