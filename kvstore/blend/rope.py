"""Moving RoPE-encoded keys to new positions.

RoPE rotates each pair of a key's dimensions by ``position * inv_freq``.  A key computed
at position ``p`` is moved to ``q`` by one more rotation of ``(q - p) * inv_freq``; no
unrotated copy is needed.  The angle of that rotation comes from the model's own rotary
module, so rope scaling (llama3, linear, yarn, longrope, ...) is honoured: it only changes
``inv_freq`` and multiplies cos/sin by ``attention_scaling`` (``a``).  With the model's
tables ``c_p = a cos(p w)``, ``s_p = a sin(p w)`` the angle-difference identities give
``cos((q - p) w) = (c_q c_p + s_q s_p) / a**2`` and ``sin((q - p) w) = (s_q c_p - c_q s_p) / a**2``.
Old and new positions go through the rotary module in one call, so a dynamic rope sees
one sequence length for both.  All of it runs in float32 and casts back at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The RoPE pair swap used by Llama-family models: ``[-x2, x1]``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass(frozen=True, slots=True)
class Rope:
    """A model's rotary module and the factor its cos/sin tables carry (``attention_scaling``)."""

    module: Any
    attention_scaling: float = 1.0

    def tables(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (float32, ``[n, head_dim]``, scaling included) at ``positions``."""
        probe = torch.empty(0, device=device, dtype=torch.float32)
        cos, sin = self.module(probe, positions.to(device)[None, :])
        return cos[0].float(), sin[0].float()

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE on ``x`` (``[..., n, head_dim]``) at ``positions``, as the model itself does it."""
        cos, sin = self.tables(positions, x.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return x * cos + rotate_half(x) * sin

    def rerotate(self, k: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor) -> torch.Tensor:
        """Keys ``k`` (``[..., n, head_dim]``, post-RoPE at ``old_pos``) as if computed at ``new_pos``."""
        n = k.shape[-2]
        if old_pos.shape != (n,) or new_pos.shape != (n,):
            raise ValueError(
                f"positions must have shape ({n},), got {tuple(old_pos.shape)} and {tuple(new_pos.shape)}"
            )
        if n == 0:
            return k
        cos, sin = self.tables(torch.cat((old_pos, new_pos)), k.device)
        c_old, c_new = cos[:n], cos[n:]
        s_old, s_new = sin[:n], sin[n:]
        scale = self.attention_scaling**2
        cos_d = (c_new * c_old + s_new * s_old) / scale
        sin_d = (s_new * c_old - c_new * s_old) / scale
        kf = k.float()
        return (kf * cos_d + rotate_half(kf) * sin_d).to(k.dtype)
