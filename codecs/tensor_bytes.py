"""Tensor <-> bytes without copies where possible (torch has no buffer protocol)."""

from __future__ import annotations

import numpy as np
import torch

def as_numpy_bits(t: torch.Tensor) -> np.ndarray:
    """A CPU, contiguous numpy view of ``t``'s bits (integers of the same width)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return t.view(_int_dtype(t.dtype)).numpy() if t.dtype in (torch.float16, torch.bfloat16) else t.numpy()


def _int_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.int16 if dtype.itemsize == 2 else torch.int32


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """C-order bytes of a tensor on any device."""
    return as_numpy_bits(t).tobytes()


def bytes_to_tensor(
    data: bytes | bytearray | memoryview, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """A new tensor (owning its memory) from C-order bytes; the caller checked the size."""
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    out = buf.view(dtype).reshape(shape)
    return out.to(device) if device.type != "cpu" else out
