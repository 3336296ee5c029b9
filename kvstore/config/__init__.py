"""Daemon configuration: frozen dataclasses built once, at the edge.

Sources, lowest precedence first: embedded defaults, a YAML file
(``--config``), ``KVSTORE_*`` environment variables, command-line flags.
Overrides address fields by dotted path: ``server.port``, ``tiers.cpu.capacity``
(tiers by name), ``quotas.acme/llama``.  In the environment, ``__`` separates
the parts: ``KVSTORE_SERVER__PORT=51062``, ``KVSTORE_TIERS__CPU__CAPACITY=2GiB``.
Every value is validated here, and an error names the field and what it accepts.

Sizes accept integers of bytes or strings such as ``512MiB``, ``4GiB``, ``1.5GB``.

The schema (the dataclasses, their checks, the parsers of single values) is in
schema.py; reading the sources and building a :class:`DaemonConfig` from them
(:func:`load`, :func:`build`) in loading.py.  Import from here.
"""

from kvstore.config.loading import (
    DEFAULT_CPU_CAP,
    DEFAULT_DISK_CAP,
    apply_override,
    build,
    default_cache_dir,
    default_tree,
    env_overrides,
    load,
)
from kvstore.config.schema import (
    DEFAULT_FRAME_BYTES,
    DEFAULT_PORT,
    TIER_KINDS,
    DaemonConfig,
    LimitsConfig,
    ServerConfig,
    TierConfig,
    TLSConfig,
    format_size,
    parse_size,
)

__all__ = [
    "DEFAULT_CPU_CAP",
    "DEFAULT_DISK_CAP",
    "DEFAULT_FRAME_BYTES",
    "DEFAULT_PORT",
    "TIER_KINDS",
    "DaemonConfig",
    "LimitsConfig",
    "ServerConfig",
    "TLSConfig",
    "TierConfig",
    "apply_override",
    "build",
    "default_cache_dir",
    "default_tree",
    "env_overrides",
    "format_size",
    "load",
    "parse_size",
]
