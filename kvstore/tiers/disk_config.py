"""Configuration of the ``disk`` tier (:class:`~kvstore.tiers.disk.DiskTier`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvstore.errors import ConfigError

__all__ = ["DiskTierConfig"]


@dataclass(frozen=True, slots=True)
class DiskTierConfig:
    """Where and how much the disk tier stores.

    ``capacity_bytes`` counts on-disk bytes (headers included).  ``fsync``
    makes every put durable before it returns; turn it off only for scratch
    data.  ``io_threads`` is the number of blocking file operations in flight
    at once; SSDs want several for full bandwidth.  ``direct_reads`` reads
    with ``O_DIRECT`` where the file system allows it: the tier sits below a
    memory tier, so a second copy in the page cache only wastes memory, and
    cold reads measured faster that way (docs/benchmarks/disk.md).
    """

    path: Path
    capacity_bytes: int
    fsync: bool = True
    io_threads: int = 4
    direct_reads: bool = True

    def __post_init__(self) -> None:
        path: object = self.path
        if isinstance(path, str) and path:
            object.__setattr__(self, "path", Path(path))
        elif not isinstance(path, Path):
            raise ConfigError(f"disk.path must be a directory path (str or Path), got {path!r}")
        cap: object = self.capacity_bytes
        if isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0:
            raise ConfigError(f"disk.capacity_bytes must be a positive integer (bytes), got {cap!r}")
        if not isinstance(self.fsync, bool):
            raise ConfigError(f"disk.fsync must be true or false, got {self.fsync!r}")
        threads: object = self.io_threads
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 256:
            raise ConfigError(f"disk.io_threads must be an integer in [1, 256], got {threads!r}")
        if not isinstance(self.direct_reads, bool):
            raise ConfigError(f"disk.direct_reads must be true or false, got {self.direct_reads!r}")
