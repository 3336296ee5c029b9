"""Tenant quotas of the daemon (``server.limits.tenant_quotas``): a tenant's
chunks, all its models together, stay under its quota in each managed tier.

:meth:`TenantQuotas.make_room_for_tenant` runs before a chunk is admitted (a
put, a shared-memory put, a direct write): a tenant with a quota evicts its
own chunks, largest namespace first, to make room, and is refused
(QuotaExceeded: RESOURCE_EXHAUSTED) only when what is left is pinned or the
chunk alone is over the quota.  The daemon's
:class:`~kvstore.server.limits.Limits` holds one, as ``Limits.quotas``.  (A
namespace's own quota is the store's: kvstore/store/.)
"""

from __future__ import annotations

from collections import Counter

from kvstore.config import LimitsConfig
from kvstore.errors import QuotaExceeded
from kvstore.keys import ChunkKey, Namespace
from kvstore.store import TieredStore


class TenantQuotas:
    """The tenants' quotas; see the module docstring."""

    def __init__(self, config: LimitsConfig, store: TieredStore, refused: Counter[str]) -> None:
        self._store = store
        self._quotas = dict(config.tenant_quotas)
        #: Refusals by reason (Limits.refused, shared): a refusal here is "tenant_quota".
        self.refused = refused

    def tenant_quota(self, tenant: str) -> int | None:
        return self._quotas.get(tenant)

    def tenant_usage(self, tenant: str) -> dict[str, dict[Namespace, int]]:
        """tier -> namespace -> bytes, for ``tenant``'s namespaces in managed tiers."""
        out: dict[str, dict[Namespace, int]] = {}
        for u in self._store.stats().namespaces:
            ns = Namespace.parse(u.namespace)
            if ns.tenant == tenant:
                out.setdefault(u.tier, {})[ns] = u.bytes
        return out

    async def make_room_for_tenant(self, key: ChunkKey, n: int) -> None:
        """Evict ``key``'s tenant's own chunks until ``n`` more bytes fit under its
        quota in every managed tier (top-down, so demotions are counted below);
        QuotaExceeded when what is left is pinned or the chunk alone is too big."""
        tenant = key.namespace.tenant
        quota = self._quotas.get(tenant)
        if quota is None:
            return
        if n > quota:
            self.refused["tenant_quota"] += 1
            raise QuotaExceeded(
                f"chunk of {n} bytes exceeds tenant {tenant!r}'s quota of {quota} bytes "
                "(server.limits.tenant_quotas)"
            )
        for tier in self._store.tiers:
            if not tier.managed:
                continue
            usage = self.tenant_usage(tenant).get(tier.name, {})
            excess = sum(usage.values()) + n - quota
            # Largest namespace first: it has the most to give.
            for ns, held in sorted(usage.items(), key=lambda kv: -kv[1]):
                if excess <= 0:
                    break
                freed, _ = await self._store.evict_to(tier.name, max(0, held - excess), namespace=ns)
                excess -= sum(e.nbytes for e in freed)
            if excess > 0:
                self.refused["tenant_quota"] += 1
                raise QuotaExceeded(
                    f"tenant {tenant!r} is at its quota of {quota} bytes in tier {tier.name!r} "
                    "and the rest of what it holds there is pinned or being read"
                )
