"""The ``cpu`` tier: host memory, pinned when CUDA is present."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.errors import ConfigError
from kvstore.tiers.memory import MemoryTier


@dataclass(frozen=True, slots=True)
class CpuTierConfig:
    capacity_bytes: int
    #: Pin the arena (page-locked) for fast DMA; "auto" = only when CUDA is available.
    pin: bool | None = None
    prefault: bool = True
    copy_threads: int = 2
    #: Keep the arena in a memfd that local clients may map read-only (kvstore/tiers/shared_arena.py);
    #: the daemon offers it only without a token file.  Not with a pinned arena.
    shared: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.capacity_bytes, int) or self.capacity_bytes < 1 << 20:
            raise ConfigError(
                f"cpu.capacity_bytes must be an integer of at least 1 MiB, got {self.capacity_bytes!r}"
            )
        if not isinstance(self.copy_threads, int) or not 1 <= self.copy_threads <= 64:
            raise ConfigError(f"cpu.copy_threads must be in [1, 64], got {self.copy_threads!r}")


class CpuTier(MemoryTier):
    kind = "cpu"

    def __init__(self, name: str, config: CpuTierConfig) -> None:
        pin = torch.cuda.is_available() if config.pin is None else config.pin
        super().__init__(
            name,
            config.capacity_bytes,
            device="cpu",
            pin=pin,
            prefault=config.prefault,
            copy_threads=config.copy_threads,
            shared=config.shared,
        )
