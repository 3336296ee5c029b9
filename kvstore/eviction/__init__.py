"""Eviction policies, and the one registry that names them.

The interface is :class:`EvictionPolicy` (``base.py``); each policy lives in
its own module.  Tiers name their policy in the configuration
(``eviction: lru``); :func:`make_policy` turns that name into an instance.
The policies are pure Python with no optional dependencies, so the registry
imports them directly.
"""

from __future__ import annotations

from kvstore.errors import ConfigError
from kvstore.eviction.arc import ARCPolicy
from kvstore.eviction.base import EvictionPolicy, Skip, never
from kvstore.eviction.lfu import LFUPolicy
from kvstore.eviction.lru import LRUPolicy
from kvstore.eviction.s3fifo import S3FIFOPolicy

__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "ARCPolicy",
    "EvictionPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "S3FIFOPolicy",
    "Skip",
    "make_policy",
    "never",
]

#: Every policy by its configuration name.
POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (LRUPolicy, LFUPolicy, S3FIFOPolicy, ARCPolicy)
}

#: The policy of a tier whose configuration names none.
DEFAULT_POLICY = LRUPolicy.name


def make_policy(name: str) -> EvictionPolicy:
    """A new instance of the policy called ``name``.

    Raises :class:`ConfigError` naming the allowed values when ``name`` is unknown.
    """
    cls = POLICIES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"eviction policy {name!r} is unknown; choose one of {', '.join(sorted(POLICIES))}")
    return cls()
