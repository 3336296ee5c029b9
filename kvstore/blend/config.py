"""CacheBlend's knobs, validated once at the edge."""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.errors import ConfigError


@dataclass(frozen=True, slots=True)
class BlendConfig:
    """How a prompt is split into segments and how much of it is recomputed.

    * ``ratio``: fraction of the reused tokens whose KV is recomputed in the layers after
      the check layer(s), picked by largest KV deviation (0.15 = 15 %).  1.0 recomputes
      everything (equals a full prefill); 0.0 with ``check_layers=()`` is naive reuse.
    * ``check_layers``: layers recomputed in full to measure the deviation.  Every layer up to
      the first one is recomputed in full (its input needs all tokens); with several check
      layers the selection narrows geometrically, ``ratio ** (j / n)`` at the j-th of n.
    * ``separator``: token ids that separate segments (documents); never reused themselves.
    * ``min_segment_tokens``: shorter segments are recomputed rather than looked up.
    * ``anchor``: token ids placed before a segment when its KV is computed alone (for
      instance the chat header every prompt starts with).  Without one, a segment's first
      token becomes an attention sink of its own, a flaw the recompute must then repair;
      with one, the stored KV is that of the segment after the anchor, at positions
      ``len(anchor) ...``.  The anchor is hashed into the segment keys.
    * ``prefetch_layers``: how many layers the background loader may run ahead.
    """

    ratio: float = 0.15
    check_layers: tuple[int, ...] = (1,)
    separator: tuple[int, ...] = ()
    min_segment_tokens: int = 16
    anchor: tuple[int, ...] = ()
    prefetch_layers: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float) or not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"blend.ratio must be a number in [0, 1], got {self.ratio!r}")
        layers = self.check_layers
        if not isinstance(layers, tuple) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            raise ConfigError(f"blend.check_layers must be a tuple of layer indices, got {layers!r}")
        if any(x < 0 for x in layers) or list(layers) != sorted(set(layers)):
            raise ConfigError(
                f"blend.check_layers must be distinct non-negative layer indices in increasing order, got {layers!r}"
            )
        if not layers and self.ratio != 0.0:
            raise ConfigError(
                "blend.check_layers is empty, which means no recompute: set blend.ratio to 0 (naive reuse) "
                "or name at least one check layer"
            )
        sep = self.separator
        if not isinstance(sep, tuple) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in sep):
            raise ConfigError(f"blend.separator must be a tuple of token ids (non-negative ints), got {sep!r}")
        anchor = self.anchor
        if not isinstance(anchor, tuple) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in anchor):
            raise ConfigError(f"blend.anchor must be a tuple of token ids (non-negative ints), got {anchor!r}")
        if not isinstance(self.min_segment_tokens, int) or self.min_segment_tokens < 1:
            raise ConfigError(f"blend.min_segment_tokens must be a positive integer, got {self.min_segment_tokens!r}")
        if not isinstance(self.prefetch_layers, int) or not 1 <= self.prefetch_layers <= 64:
            raise ConfigError(f"blend.prefetch_layers must be an integer in [1, 64], got {self.prefetch_layers!r}")

    def ratio_at(self, j: int) -> float:
        """Fraction of reused tokens kept after the j-th check layer (0-based)."""
        n = len(self.check_layers)
        return float(float(self.ratio) ** ((j + 1) / n))
