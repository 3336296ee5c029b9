"""The eviction-policy interface.

A policy orders the chunks of one tier for eviction.  The store calls:

* :meth:`EvictionPolicy.insert` after a chunk is stored in the tier (a key
  already present counts as an access);
* :meth:`EvictionPolicy.access` on every hit;
* :meth:`EvictionPolicy.remove` when a chunk leaves the tier for any reason
  (evicted, deleted, demoted, dropped as corrupt);
* :meth:`EvictionPolicy.victim` when room is needed: the policy returns the
  key it would evict next among those for which ``skip(key)`` is false
  (pinned chunks, chunks of other namespaces when enforcing a quota), or
  ``None`` if every key is skipped.  It does not remove the key: the store
  calls :meth:`remove` once the chunk is really gone.

Policies work on keys and sizes only; they never touch payloads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

from kvstore.keys import ChunkKey

Skip = Callable[[ChunkKey], bool]


def never(_key: ChunkKey) -> bool:
    return False


class EvictionPolicy(ABC):
    name: ClassVar[str]

    @abstractmethod
    def insert(self, key: ChunkKey, nbytes: int) -> None: ...

    @abstractmethod
    def access(self, key: ChunkKey) -> None: ...

    @abstractmethod
    def remove(self, key: ChunkKey) -> None: ...

    @abstractmethod
    def victim(self, skip: Skip = never) -> ChunkKey | None: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...
