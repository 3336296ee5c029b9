"""The ``gpu`` tier: chunks kept in CUDA memory through torch.

Enabled only where a GPU exists: constructing it without CUDA raises a
:class:`ConfigError` saying so.  ``get`` copies to a pinned host buffer (for
the daemon's wire path); in-process users take the device slice directly with
:meth:`MemoryTier.get_tensor`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.errors import ConfigError
from kvstore.tiers.memory import MemoryTier


@dataclass(frozen=True, slots=True)
class GpuTierConfig:
    capacity_bytes: int
    device: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.capacity_bytes, int) or self.capacity_bytes < 1 << 20:
            raise ConfigError(
                f"gpu.capacity_bytes must be an integer of at least 1 MiB, got {self.capacity_bytes!r}"
            )
        if not isinstance(self.device, int) or self.device < 0:
            raise ConfigError(f"gpu.device must be a CUDA device index >= 0, got {self.device!r}")


class GpuTier(MemoryTier):
    kind = "gpu"

    def __init__(self, name: str, config: GpuTierConfig) -> None:
        if not torch.cuda.is_available():
            raise ConfigError(
                f"tier {name!r}: kind 'gpu' needs a CUDA device and none is available; "
                "remove the gpu tier from the config or run on a GPU host"
            )
        if config.device >= torch.cuda.device_count():
            raise ConfigError(
                f"gpu.device {config.device} does not exist (this host has {torch.cuda.device_count()})"
            )
        super().__init__(name, config.capacity_bytes, device=f"cuda:{config.device}", prefault=False)
