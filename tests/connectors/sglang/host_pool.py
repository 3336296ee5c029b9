"""SGLang host pools with the real layouts, buildable on CPU.

SGLang's own ``MHATokenToKVPoolHost`` / ``MLATokenToKVPoolHost``
(``sglang/srt/mem_cache/pool_host/{mha,mla}.py``) cannot be imported on a
CPU-only install: their module imports the device memory pool, which imports
the model configs, which import torchvision and CUDA kernels.  The issue allows
"a tensor with the same layout" then; this is that tensor plus the pool's page
accessors, written from SGLang 0.5.23's ``init_kv_buffer``,
``get_data_page``, ``get_dummy_flat_data_page`` and
``set_from_flat_data_page`` (same shapes, same slicing).  The backend only uses
the attributes and ``get_data_page(i, flat=False)``; the tests use the rest to
play SGLang's part.  :func:`real_pool_class` returns SGLang's class when it can
be imported, and a test checks the twins against it then.
"""

from __future__ import annotations

from typing import Any

import torch


class HostPoolTwin:
    def __init__(
        self,
        *,
        mla: bool,
        layout: str,
        layers: int,
        page_size: int,
        pages: int,
        heads: int = 1,
        head_dim: int = 8,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        self.layout = layout
        self.page_size = page_size
        self.page_num = pages
        self.size = pages * page_size
        self.layer_num = layers
        self.dtype = dtype
        self.device = "cpu"
        self.pin_memory = False
        self.mla = mla
        if mla:
            self.kv_cache_dim = head_dim
            dims = {
                "layer_first": (layers, self.size, 1, head_dim),
                "page_first": (self.size, layers, 1, head_dim),
                "page_first_direct": (pages, layers, page_size, 1, head_dim),
            }[layout]
        else:
            self.head_num = heads
            self.head_dim = head_dim
            self.v_head_dim = head_dim
            dims = {
                "layer_first": (2, layers, self.size, heads, head_dim),
                "page_first": (2, self.size, layers, heads, head_dim),
                "page_first_direct": (2, pages, layers, page_size, heads, head_dim),
                "page_head": (2, pages, heads, page_size, layers, head_dim),
            }[layout]
        self.kv_buffer = torch.zeros(dims, dtype=dtype)

    # -- SGLang's page accessors (same slicing as mha.py / mla.py) -------------
    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        P = self.page_size
        b = self.kv_buffer
        if self.mla:
            page = {
                "layer_first": lambda: b[:, index : index + P, :, :],
                "page_first": lambda: b[index : index + P, :, :, :],
                "page_first_direct": lambda: b[index // P : index // P + 1, :, :, :, :],
            }[self.layout]()
        elif self.layout == "layer_first":
            page = b[:, :, index : index + P, :, :]
        elif self.layout == "page_first":
            page = b[:, index : index + P, :, :, :]
        else:
            page = b[:, index // P : index // P + 1, :, :, :, :]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        if self.mla:
            return torch.zeros((self.layer_num, self.page_size, 1, self.kv_cache_dim), dtype=self.dtype).flatten()
        return torch.zeros(
            (2, self.layer_num, self.page_size, self.head_num, self.head_dim), dtype=self.dtype
        ).flatten()

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        view = self.get_data_page(index, flat=False)
        view.copy_(data_page.reshape(view.shape))

    # -- test helpers ------------------------------------------------------------
    def fill_page(self, index: int, seed: int) -> torch.Tensor:
        """Random values in the page at slot ``index``; returns them as
        [layers, 2 or 1, page, heads, dim] computed from the layout by hand."""
        g = torch.Generator().manual_seed(seed)
        P, L = self.page_size, self.layer_num
        b = self.kv_buffer
        if self.mla:
            ref = torch.randn((L, P, 1, self.kv_cache_dim), generator=g).to(self.dtype)
            if self.layout == "layer_first":
                b[:, index : index + P] = ref
            elif self.layout == "page_first":
                b[index : index + P] = ref.transpose(0, 1)
            else:
                b[index // P] = ref
            return ref
        H, D = self.head_num, self.head_dim
        ref = torch.randn((L, 2, P, H, D), generator=g).to(self.dtype)
        for kv in range(2):
            r = ref[:, kv]  # [L, P, H, D]
            if self.layout == "layer_first":
                b[kv, :, index : index + P] = r
            elif self.layout == "page_first":
                b[kv, index : index + P] = r.transpose(0, 1)
            elif self.layout == "page_first_direct":
                b[kv, index // P] = r
            else:  # page_head: [H, P, L, D]
                b[kv, index // P] = r.permute(2, 1, 0, 3)
        return ref

    def read_page(self, index: int) -> torch.Tensor:
        """Inverse of :meth:`fill_page`: the page at ``index`` in reference order."""
        P = self.page_size
        b = self.kv_buffer
        if self.mla:
            if self.layout == "layer_first":
                return b[:, index : index + P].clone()
            if self.layout == "page_first":
                return b[index : index + P].transpose(0, 1).clone()
            return b[index // P].clone()
        parts = []
        for kv in range(2):
            if self.layout == "layer_first":
                parts.append(b[kv, :, index : index + P])
            elif self.layout == "page_first":
                parts.append(b[kv, index : index + P].transpose(0, 1))
            elif self.layout == "page_first_direct":
                parts.append(b[kv, index // P])
            else:
                parts.append(b[kv, index // P].permute(2, 1, 0, 3))
        return torch.stack(parts, dim=1).clone()


def real_pool_class(mla: bool) -> Any:
    """SGLang's own host pool class, or None where it cannot be imported (CPU)."""
    try:
        if mla:
            from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

            return MLATokenToKVPoolHost
        from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

        return MHATokenToKVPoolHost
    except Exception:  # noqa: BLE001 - ImportError, or CUDA-only kernels failing to load
        return None
