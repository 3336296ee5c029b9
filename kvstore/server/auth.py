"""Bearer-token authentication and tenant authorisation.

The token file is YAML::

    tokens:
      - token: "s3cret-a"      # at least 16 characters
        tenant: acme
        role: readwrite         # read | readwrite | admin | metrics

A request carries ``authorization: Bearer <token>``.  ``read`` may get,
lookup and check existence; ``readwrite`` may also put and delete; ``admin``
may do all that for *every* tenant and use the admin service.  Other roles
act only on keys whose tenant is their own.  ``metrics`` (no tenant) may
only scrape the Prometheus endpoint, which with a token file configured
answers only ``metrics`` and ``admin`` tokens: its figures name every
tenant's namespaces.  Without a token file the daemon
runs open: every request acts as an admin of the tenant named in its keys.

An admin entry names no tenant: its reach is every tenant, and a file that
gives one a tenant (which reads as "admin of that tenant" but would act on
all of them) is refused when loaded.  A tenant's own operator gets a
``readwrite`` token of that tenant.

Tokens are compared in constant time, and stored only as their blake3 hash.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import blake3
import yaml

from kvstore.errors import ConfigError, InvalidArgument, PermissionDenied, Unauthenticated
from kvstore.keys import ChunkKey, Namespace

Role = Literal["read", "readwrite", "admin", "metrics"]
ROLES: tuple[Role, ...] = ("read", "readwrite", "admin", "metrics")
#: Roles that act on no tenant's keys in particular.
_UNSCOPED: tuple[Role, ...] = ("admin", "metrics")


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str | None  # None: an admin, or the open daemon: acts for any tenant
    role: Role

    def __post_init__(self) -> None:
        if self.role == "admin" and self.tenant is not None:
            raise ValueError(f"an admin acts on every tenant; it cannot be scoped to tenant {self.tenant!r}")
        if self.role == "metrics" and self.tenant is not None:
            raise ValueError(f"a metrics principal reads no tenant's data; it cannot be scoped to tenant {self.tenant!r}")
        if self.role not in _UNSCOPED and self.tenant is None:
            raise ValueError(f"a {self.role!r} principal needs a tenant")

    def can_write(self) -> bool:
        return self.role in ("readwrite", "admin")

    def check_key(self, key: ChunkKey, *, write: bool = False) -> None:
        self.check_namespace(key.namespace, write=write)

    def check_namespace(self, ns: Namespace, *, write: bool = False) -> None:
        if self.role == "metrics":
            raise PermissionDenied("a metrics token may only scrape metrics; use a read or readwrite token for data")
        if write and not self.can_write():
            raise PermissionDenied(f"role {self.role!r} may not write; a readwrite or admin token is needed")
        if self.role != "admin" and self.tenant is not None and ns.tenant != self.tenant:
            # Same message whether or not the key exists: no existence oracle.
            raise PermissionDenied(f"this token is for tenant {self.tenant!r} and may not access tenant {ns.tenant!r}")

    def require_admin(self) -> None:
        if self.role != "admin":
            raise PermissionDenied("this operation needs a token with the admin role")

    def may_scrape_metrics(self) -> bool:
        return self.role in _UNSCOPED


OPEN = Principal(tenant=None, role="admin")


def _digest(token: str) -> bytes:
    return blake3.blake3(token.encode()).digest()


class TokenTable:
    """token -> Principal, loaded from a YAML token file."""

    def __init__(self, entries: Sequence[tuple[str, Principal]]) -> None:
        self._by_digest = {_digest(tok): p for tok, p in entries}

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"server.token_file: cannot read {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"server.token_file: {path} is not valid YAML: {exc}") from None
        items = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(items, list) or not items:
            raise ConfigError(f"server.token_file: {path} must contain a non-empty list 'tokens'")
        entries: list[tuple[str, Principal]] = []
        for i, item in enumerate(items):
            where = f"server.token_file tokens[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(f"{where} must be a mapping with token, tenant, role")
            token, tenant, role = item.get("token"), item.get("tenant"), item.get("role", "readwrite")
            if not isinstance(token, str) or len(token) < 16:
                raise ConfigError(f"{where}.token must be a string of at least 16 characters")
            if role not in ROLES:
                raise ConfigError(f"{where}.role must be one of {list(ROLES)}, got {role!r}")
            if role == "admin":
                if tenant is not None:
                    raise ConfigError(
                        f"{where}.tenant: an admin token acts on every tenant and on the admin service, "
                        f"so it cannot be limited to tenant {tenant!r}; remove 'tenant' from this entry for "
                        f"an admin, or give it role readwrite (or read) for a token of tenant {tenant!r} only"
                    )
            elif role == "metrics":
                if tenant is not None:
                    raise ConfigError(
                        f"{where}.tenant: a metrics token scrapes the figures of every tenant and reads no "
                        f"data, so it has no tenant; remove 'tenant' from this entry"
                    )
            else:
                if not isinstance(tenant, str):
                    raise ConfigError(f"{where}.tenant must be a tenant name")
                try:
                    Namespace(tenant, "m")  # validates the tenant's spelling
                except InvalidArgument as exc:
                    raise ConfigError(f"{where}.tenant: {exc}") from None
            entries.append((token, Principal(tenant=tenant, role=role)))
        if len({t for t, _ in entries}) != len(entries):
            raise ConfigError("server.token_file: tokens must be unique")
        return cls(entries)

    def authenticate(self, header: str | None) -> Principal:
        if not header:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        digest = _digest(token.strip())
        for known, principal in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return principal
        raise Unauthenticated("unknown token")


def principal_of(tokens: TokenTable | None, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
    """Who sends a request with this gRPC ``metadata``: its bearer token's principal
    (UNAUTHENTICATED without a valid one), or :data:`OPEN` when no tokens are configured."""
    if tokens is None:
        return OPEN
    header = None
    for key, value in metadata or ():
        if key == "authorization":
            header = value if isinstance(value, str) else value.decode("latin-1")
    return tokens.authenticate(header)
