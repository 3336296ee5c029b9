"""Loading the daemon's configuration: its sources merged into one plain tree, then built.

The embedded defaults, sized from the machine (:func:`default_tree`), a YAML
file, ``KVSTORE_*`` environment variables (:func:`env_overrides`) and flags,
each setting fields by dotted path (:func:`apply_override`), make one plain
tree; :func:`build` checks it and turns it into the dataclasses of schema.py;
:func:`load` does it all.  Precedence and the override syntax: see the
package's docstring (kvstore/config/__init__.py).
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
import yaml

from kvstore.config.schema import (
    DEFAULT_FRAME_BYTES,
    DEFAULT_PORT,
    DaemonConfig,
    LimitsConfig,
    ServerConfig,
    TierConfig,
    TLSConfig,
    parse_bool,
    parse_int,
    parse_opt_path,
    parse_seconds,
    parse_share,
    parse_str,
    parse_size,
)
from kvstore.errors import ConfigError, InvalidArgument
from kvstore.keys import Namespace
from kvstore.store import TierSettings

DEFAULT_CPU_CAP = 8 << 30
DEFAULT_DISK_CAP = 64 << 30


def _check_keys(d: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")


# -- defaults ---------------------------------------------------------------
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvstore" / "chunks"


def default_tree() -> dict[str, Any]:
    """The embedded defaults, as the same plain tree a YAML file gives."""
    avail = psutil.virtual_memory().available
    cpu_cap = max(64 << 20, min(DEFAULT_CPU_CAP, avail // 4))
    disk_dir = default_cache_dir()
    probe = disk_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    disk_cap = max(64 << 20, min(DEFAULT_DISK_CAP, shutil.disk_usage(probe).free // 2))
    return {
        "server": {"host": "127.0.0.1", "port": DEFAULT_PORT},
        "tiers": [
            {"name": "cpu", "kind": "cpu", "capacity": cpu_cap, "eviction": "lru", "on_evict": "demote"},
            {
                "name": "disk",
                "kind": "disk",
                "capacity": disk_cap,
                "path": str(disk_dir),
                "write_through": True,
                "on_evict": "drop",
            },
        ],
        "quotas": {},
        "log_level": "INFO",
    }


# -- overrides ---------------------------------------------------------------
def apply_override(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``dotted`` (e.g. ``server.port``, ``tiers.cpu.capacity``) in ``tree``."""
    parts = [p for p in dotted.split(".") if p]
    if not parts:
        raise ConfigError(f"override {dotted!r}: empty path")
    head = parts[0]
    if head == "tiers":
        if len(parts) != 3:
            raise ConfigError(f"override {dotted!r}: expected tiers.<name>.<field>")
        for tier in tree["tiers"]:
            if tier.get("name") == parts[1]:
                tier[parts[2]] = value
                return
        raise ConfigError(
            f"override {dotted!r}: no tier named {parts[1]!r}; tiers are {[t.get('name') for t in tree['tiers']]}"
        )
    if head == "quotas":
        if len(parts) < 2:
            raise ConfigError(f"override {dotted!r}: expected quotas.<tenant/model>")
        tree.setdefault("quotas", {})[".".join(parts[1:])] = value
        return
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {p} is not a section")
        node = child
    node[parts[-1]] = value


_SECTIONS = ("server", "tiers", "quotas", "log_level")


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """``KVSTORE_SERVER__PORT=1`` -> ``("server.port", "1")``.

    Only names whose first part is a config section count, so other
    ``KVSTORE_*`` variables (e.g. test settings) are left alone.
    """
    out = []
    for name, value in sorted(environ.items()):
        if not name.startswith("KVSTORE_"):
            continue
        path = name[len("KVSTORE_") :].lower().split("__")
        if path[0] in _SECTIONS:
            out.append((".".join(path), value))
    return out


# -- building ---------------------------------------------------------------
_SERVER_FIELDS = {
    "host", "port", "frame_bytes", "max_chunk_bytes", "max_batch", "token_file", "tls", "shm", "shm_direct_reads",
    "shm_direct_writes", "shm_reserved_share", "http2_get", "http2_get_port", "max_concurrent_streams", "grace_s", "metrics_port", "metrics_host", "limits",
}
_LIMITS_FIELDS = {"max_memory", "max_inflight", "max_streams_per_client", "stream_wait_s", "tenant_quotas"}
_TIER_FIELDS = {
    "name", "kind", "capacity", "path", "url", "write_through", "on_evict", "eviction", "queue_depth",
    "on_full", "workers", "codec",
    "key_prefix", "ttl", "part_size", "max_connections", "timeout", "token_file", "tls_ca", "tls_cert", "tls_key",
}


def _build_server(d: Mapping[str, Any]) -> ServerConfig:
    _check_keys(d, _SERVER_FIELDS, "server")
    tls = d.get("tls") or {}
    if not isinstance(tls, Mapping):
        raise ConfigError("server.tls must be a mapping with cert, key, client_ca")
    _check_keys(tls, {"cert", "key", "client_ca"}, "server.tls")
    return ServerConfig(
        host=parse_str(d.get("host", "127.0.0.1"), "server.host"),
        port=parse_int(d.get("port", DEFAULT_PORT), "server.port", 0, 65535),
        frame_bytes=parse_size(d.get("frame_bytes", DEFAULT_FRAME_BYTES), "server.frame_bytes"),
        max_chunk_bytes=parse_size(d.get("max_chunk_bytes", 4 << 30), "server.max_chunk_bytes"),
        max_batch=parse_int(d.get("max_batch", 65536), "server.max_batch", 1, 1 << 24),
        token_file=parse_opt_path(d.get("token_file"), "server.token_file"),
        tls=TLSConfig(
            cert=parse_opt_path(tls.get("cert"), "server.tls.cert"),
            key=parse_opt_path(tls.get("key"), "server.tls.key"),
            client_ca=parse_opt_path(tls.get("client_ca"), "server.tls.client_ca"),
        ),
        shm=parse_bool(d.get("shm", True), "server.shm"),
        shm_direct_reads=parse_bool(d.get("shm_direct_reads", True), "server.shm_direct_reads"),
        shm_direct_writes=parse_bool(d.get("shm_direct_writes", True), "server.shm_direct_writes"),
        shm_reserved_share=parse_share(d.get("shm_reserved_share", 0.5), "server.shm_reserved_share"),
        http2_get=parse_bool(d.get("http2_get", True), "server.http2_get"),
        http2_get_port=parse_int(d.get("http2_get_port", 0), "server.http2_get_port", 0, 65535),
        max_concurrent_streams=parse_int(d.get("max_concurrent_streams", 256), "server.max_concurrent_streams", 1, 1 << 16),
        grace_s=float(parse_int(d.get("grace_s", 30), "server.grace_s", 0, 3600)),
        metrics_port=parse_int(d.get("metrics_port", 0), "server.metrics_port", 0, 65535),
        metrics_host=parse_str(d.get("metrics_host", "127.0.0.1"), "server.metrics_host"),
        limits=_build_limits(d.get("limits") or {}),
    )


def _build_limits(d: object) -> LimitsConfig:
    if not isinstance(d, Mapping):
        raise ConfigError("server.limits must be a mapping (max_memory, max_inflight, ...)")
    _check_keys(d, _LIMITS_FIELDS, "server.limits")
    quotas = d.get("tenant_quotas") or {}
    if not isinstance(quotas, Mapping):
        raise ConfigError("server.limits.tenant_quotas must be a mapping of tenant to a size")
    defaults = LimitsConfig()
    return LimitsConfig(
        max_memory_bytes=parse_size(d.get("max_memory", 0), "server.limits.max_memory"),
        max_inflight_bytes=parse_size(d.get("max_inflight", defaults.max_inflight_bytes), "server.limits.max_inflight"),
        max_streams_per_client=parse_int(
            d.get("max_streams_per_client", defaults.max_streams_per_client), "server.limits.max_streams_per_client",
            1, 1 << 16,
        ),
        stream_wait_s=parse_seconds(d.get("stream_wait_s", defaults.stream_wait_s), "server.limits.stream_wait_s"),
        tenant_quotas=tuple(
            (str(t), parse_size(q, f"server.limits.tenant_quotas.{t}")) for t, q in quotas.items()
        ),
    )


def _build_tier(d: Mapping[str, Any], i: int) -> TierConfig:
    if not isinstance(d, Mapping):
        raise ConfigError(f"tiers[{i}] must be a mapping")
    name = parse_str(d.get("name", ""), f"tiers[{i}].name")
    where = f"tiers.{name or i}"
    _check_keys(d, _TIER_FIELDS, where)
    defaults = TierSettings()
    try:
        settings = TierSettings(
            write_through=parse_bool(d.get("write_through", False), f"{where}.write_through"),
            on_evict=parse_str(d.get("on_evict", defaults.on_evict), f"{where}.on_evict"),  # type: ignore[arg-type]
            eviction=parse_str(d.get("eviction", defaults.eviction), f"{where}.eviction"),
            queue_depth=parse_int(d.get("queue_depth", defaults.queue_depth), f"{where}.queue_depth", 1, 1_000_000),
            on_full=parse_str(d.get("on_full", defaults.on_full), f"{where}.on_full"),  # type: ignore[arg-type]
            workers=parse_int(d.get("workers", defaults.workers), f"{where}.workers", 1, 64),
        )
    except ConfigError as exc:
        msg = str(exc)
        # TierSettings' own checks (on_evict, on_full) do not know which tier they are in.
        raise ConfigError(msg if msg.startswith(where) else f"{where}.{msg}") from None
    from kvstore.eviction import POLICIES

    if settings.eviction not in POLICIES:
        raise ConfigError(f"{where}.eviction must be one of {sorted(POLICIES)}, got {settings.eviction!r}")
    return TierConfig(
        name=name,
        kind=parse_str(d.get("kind", ""), f"{where}.kind"),
        capacity_bytes=parse_size(d.get("capacity", 0), f"{where}.capacity"),
        path=parse_opt_path(d.get("path"), f"{where}.path"),
        url=d.get("url"),
        settings=settings,
        codec=parse_str(d.get("codec", "raw"), f"{where}.codec"),
        key_prefix=None if d.get("key_prefix") is None else parse_str(d["key_prefix"], f"{where}.key_prefix"),
        ttl_s=None if d.get("ttl") is None else float(parse_int(d["ttl"], f"{where}.ttl", 0, 365 * 86400)),
        part_bytes=None if d.get("part_size") is None else parse_size(d["part_size"], f"{where}.part_size"),
        max_connections=(
            None if d.get("max_connections") is None
            else parse_int(d["max_connections"], f"{where}.max_connections", 1, 4096)
        ),
        timeout_s=None if d.get("timeout") is None else parse_seconds(d["timeout"], f"{where}.timeout"),
        token_file=parse_opt_path(d.get("token_file"), f"{where}.token_file"),
        tls_ca=parse_opt_path(d.get("tls_ca"), f"{where}.tls_ca"),
        tls_cert=parse_opt_path(d.get("tls_cert"), f"{where}.tls_cert"),
        tls_key=parse_opt_path(d.get("tls_key"), f"{where}.tls_key"),
    )


def build(tree: Mapping[str, Any]) -> DaemonConfig:
    """Validate a plain tree (defaults + file + overrides) into a DaemonConfig."""
    _check_keys(tree, {"server", "tiers", "quotas", "log_level"}, "config")
    server = tree.get("server") or {}
    if not isinstance(server, Mapping):
        raise ConfigError("server must be a mapping")
    tiers = tree.get("tiers")
    if not isinstance(tiers, list):
        raise ConfigError("tiers must be a list of tier mappings")
    quotas_in = tree.get("quotas") or {}
    if not isinstance(quotas_in, Mapping):
        raise ConfigError("quotas must be a mapping of 'tenant/model' to a size")
    quotas = []
    for ns, size in quotas_in.items():
        try:
            Namespace.parse(str(ns))
        except InvalidArgument as exc:
            raise ConfigError(f"quotas: {exc}") from None
        limit = parse_size(size, f"quotas.{ns}")
        if limit <= 0:
            raise ConfigError(f"quotas.{ns}: a quota must be a positive size, got {size!r}")
        quotas.append((str(ns), limit))
    return DaemonConfig(
        server=_build_server(server),
        tiers=tuple(_build_tier(t, i) for i, t in enumerate(tiers)),
        quotas=tuple(quotas),
        log_level=parse_str(tree.get("log_level", "INFO"), "log_level").upper(),
    )


def load(
    config_file: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: list[tuple[str, Any]] | None = None,
) -> DaemonConfig:
    """Defaults < YAML file < KVSTORE_* environment < ``overrides`` (flags)."""
    tree = copy.deepcopy(default_tree())
    if config_file is not None:
        try:
            text = Path(config_file).read_text()
        except OSError as exc:
            raise ConfigError(f"--config: cannot read {config_file}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config: {config_file} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config: {config_file} must hold a mapping at the top level")
        for key, value in loaded.items():
            tree[key] = value  # a file's `tiers:` replaces the default list whole
    for dotted, value in env_overrides(os.environ if environ is None else environ):
        apply_override(tree, dotted, value)
    for dotted, value in overrides or []:
        apply_override(tree, dotted, value)
    return build(tree)
