"""TieredStore: chunks across an ordered list of tiers.

Tiers are ordered fastest first (gpu, cpu, disk, remote).  The store

* **puts** into the top tier that can hold the chunk (making room by evicting
  with that tier's policy), then writes through, asynchronously, to every lower
  tier whose settings say ``write_through``; ``durable=True`` waits for those
  writes;
* **gets** by searching tiers top-down, promoting a hit from a lower tier into
  the top tier;
* **evicts** a victim by demoting it into the next tier (unless that tier has
  it already) or dropping it, per the tier's ``on_evict``; pinned chunks (pins
  are leases that expire on their own) are never evicted;
* enforces per-namespace byte **quotas** in every managed tier, by evicting the
  namespace's own chunks first;
* answers batched **prefix lookups**: how many leading keys are present, and
  in which tier.

Concurrency: one asyncio event loop.  Admissions into a tier are serialised
by that tier's lock (evict-then-put must be atomic, or two puts would both
count the same free space); locks are always taken top-down, so demotion
chains cannot deadlock.  Operations on one key (put, delete, a write-through
of it) are serialised by a per-key lock, so a delete cannot be undone by a
write-through that was already under way.

Modules: :mod:`~kvstore.store.settings` (per-tier settings), :mod:`~kvstore.store.results`
(counters and reports), :mod:`~kvstore.store.slots` (the bookkeeping of one tier, per-key
locks), and the layers of :class:`TieredStore`, each a class built on the one before:
:mod:`~kvstore.store.admission` (the tiers, quotas, admission into a tier and eviction),
:mod:`~kvstore.store.writethrough` (write-through queues and workers),
:mod:`~kvstore.store.core` (the data path: lifecycle, put, direct writes, get, lookup, delete),
:mod:`~kvstore.store.control` (run-time control: the Admin service's calls).
"""

from kvstore.store.control import TieredStore
from kvstore.store.results import (
    Evicted,
    LookupResult,
    MoveOutcome,
    NamespaceMoves,
    NamespaceUsage,
    SlotCounters,
    StoreStats,
)
from kvstore.store.settings import OnEvict, OnFull, TierSettings

__all__ = [
    "Evicted",
    "LookupResult",
    "MoveOutcome",
    "NamespaceMoves",
    "NamespaceUsage",
    "OnEvict",
    "OnFull",
    "SlotCounters",
    "StoreStats",
    "TierSettings",
    "TieredStore",
]
