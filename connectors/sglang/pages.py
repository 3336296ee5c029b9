"""One SGLang host-pool page <-> one kvstore chunk in a canonical layout.

SGLang's host pool (``sglang.srt.mem_cache.pool_host``) keeps KV in one of
several layouts, and its "flat" pages (``get_data_page(i, flat=True)``, what the
generic ``set``/``get`` path moves) are that layout's bytes.  Stored as such, a
page written by a ``page_first`` engine would be garbage to a ``layer_first``
one.  So every page is stored in one canonical layout and converted with a
single strided copy on the way in and out:

* MHA (``MHATokenToKVPoolHost``): ``LKTHD`` = ``[layers, 2 (K, V), page, heads, head_dim]``,
  kvstore's own canonical chunk layout (the codecs understand it);
* MLA (``MLATokenToKVPoolHost``, one latent shared by K and V): ``LTHD`` =
  ``[layers, page, 1, kv_cache_dim]``.

Host layouts handled (shapes of ``get_data_page(i, flat=False)`` in SGLang 0.5.23):

=================== ========================== ====================
layout              MHA page view              MLA page view
=================== ========================== ====================
layer_first         [2, L, P, H, D]            [L, P, 1, D]
page_first          [2, P, L, H, D]            [P, L, 1, D]
page_first_direct   [2, 1, L, P, H, D]         [1, L, P, 1, D]
page_head           [2, 1, H, P, L, D]         --
=================== ========================== ====================

Others (``page_unified``, ``page_first_kv_split``, asymmetric K/V widths) are
refused at registration with an error naming the layout.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any

import torch

from kvstore.errors import InvalidArgument

#: layout -> (dimension to squeeze from the page view or None, permutation to canonical)
_MHA: dict[str, tuple[int | None, tuple[int, ...]]] = {
    "layer_first": (None, (1, 0, 2, 3, 4)),
    "page_first": (None, (2, 0, 1, 3, 4)),
    "page_first_direct": (1, (1, 0, 2, 3, 4)),
    "page_head": (1, (3, 0, 2, 1, 4)),
}
_MLA: dict[str, tuple[int | None, tuple[int, ...]]] = {
    "layer_first": (None, (0, 1, 2, 3)),
    "page_first": (None, (1, 0, 2, 3)),
    "page_first_direct": (0, (0, 1, 2, 3)),
}


@dataclass(frozen=True, slots=True)
class PageGeometry:
    """What a stored page is: its canonical shape and dtype, and the host layout."""

    mla: bool
    host_layout: str
    dtype: torch.dtype
    page_size: int
    num_layers: int
    num_heads: int  # 1 for MLA
    head_dim: int  # kv_cache_dim for MLA

    @property
    def chunk_layout(self) -> str:
        return "LTHD" if self.mla else "LKTHD"

    @property
    def shape(self) -> tuple[int, ...]:
        if self.mla:
            return (self.num_layers, self.page_size, 1, self.head_dim)
        return (self.num_layers, 2, self.page_size, self.num_heads, self.head_dim)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def native_shape(self) -> tuple[int, ...]:
        """Shape of the host pool's own page view (see the module table)."""
        L, P, H, D = self.num_layers, self.page_size, self.num_heads, self.head_dim
        if self.mla:
            return {
                "layer_first": (L, P, 1, D),
                "page_first": (P, L, 1, D),
                "page_first_direct": (1, L, P, 1, D),
            }[self.host_layout]
        return {
            "layer_first": (2, L, P, H, D),
            "page_first": (2, P, L, H, D),
            "page_first_direct": (2, 1, L, P, H, D),
            "page_head": (2, 1, H, P, L, D),
        }[self.host_layout]

    def canonical_view(self, native: torch.Tensor) -> torch.Tensor:
        """A (strided) view of a native page in canonical dimension order; no copy."""
        squeeze, perm = (_MLA if self.mla else _MHA)[self.host_layout]
        if tuple(native.shape) != self.native_shape():
            raise InvalidArgument(
                f"host page has shape {tuple(native.shape)}, expected {self.native_shape()} "
                f"for a {self.host_layout} {'MLA' if self.mla else 'MHA'} pool"
            )
        v = native if squeeze is None else native.squeeze(squeeze)
        return v.permute(perm)

    def flat_to_canonical(self, flat: torch.Tensor) -> torch.Tensor:
        """Canonical view of a flat native page (what the generic path passes)."""
        return self.canonical_view(flat.reshape(self.native_shape()))


def geometry_of(pool: Any, *, mla: bool) -> PageGeometry:
    """Read a SGLang host pool's page geometry; refuses what it cannot convert."""
    kind = type(pool).__name__
    layout = _attr(pool, "layout", kind)
    table = _MLA if mla else _MHA
    if layout not in table:
        raise InvalidArgument(
            f"kvstore cannot store pages of a {layout!r} {'MLA' if mla else 'MHA'} host pool ({kind}); "
            f"use --hicache-mem-layout {' or '.join(sorted(table))}"
        )
    dtype = _attr(pool, "dtype", kind)
    if not isinstance(dtype, torch.dtype):
        raise InvalidArgument(f"{kind}.dtype must be a torch.dtype, got {dtype!r}")
    page_size = int(_attr(pool, "page_size", kind))
    layers = int(_attr(pool, "layer_num", kind))
    if mla:
        heads, dim = 1, int(_attr(pool, "kv_cache_dim", kind))
    else:
        heads, dim = int(_attr(pool, "head_num", kind)), int(_attr(pool, "head_dim", kind))
        v_dim = int(getattr(pool, "v_head_dim", dim))
        if v_dim != dim:
            raise InvalidArgument(f"{kind}: K and V widths differ ({dim} vs {v_dim}); kvstore stores symmetric KV only")
    for name, value in (("page_size", page_size), ("layer_num", layers), ("head_num", heads), ("head_dim", dim)):
        if value <= 0:
            raise InvalidArgument(f"{kind}.{name} must be positive, got {value}")
    return PageGeometry(mla, layout, dtype, page_size, layers, heads, dim)


def _attr(pool: Any, name: str, kind: str) -> Any:
    try:
        return getattr(pool, name)
    except AttributeError:
        raise InvalidArgument(
            f"host pool {kind} has no attribute {name!r}: kvstore supports SGLang's "
            "MHATokenToKVPoolHost and MLATokenToKVPoolHost"
        ) from None
