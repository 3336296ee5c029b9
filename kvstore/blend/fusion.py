"""The fusion: selective recompute of reused KV, layer by layer (CacheBlend, EuroSys 2025).

Given a prompt whose tokens at positions ``reused`` have KV from the store (already moved
to their positions) and whose other tokens are new:

1. every layer up to the first check layer is recomputed for all tokens (the check layer's
   input needs all of them); those layers' KV is exact;
2. on the check layer, each reused token's KV deviation ``|K_new - K_reused|^2 + |V_new - V_reused|^2``
   ranks the reused tokens; the top ``ratio`` of them, plus every new token, are *selected*;
3. on each later layer only the selected tokens go through the layer: their queries attend
   (causally, by position) over the fused KV, which is the reused KV with the selected
   tokens' fresh KV written over it; later check layers narrow the selection further;
4. the last prompt token is always new, so its hidden state reaches the top and gives the
   next-token logits.

With ``ratio = 1`` every layer is recomputed in full (a full prefill); with no check layer
and ``ratio = 0`` only the new tokens are computed (naive reuse).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvstore.blend.config import BlendConfig
from kvstore.blend.model import DecoderModel


@dataclass(slots=True)
class LayerKV:
    """One layer's reused KV on the model's device: ``k``, ``v`` are ``[kv_heads, n_reused, head_dim]``.

    ``ready`` is set when the loader produced them on a side CUDA stream; :meth:`wait` makes
    the current stream wait for it.  ``host`` keeps the staging buffer alive until then.
    """

    k: torch.Tensor
    v: torch.Tensor
    ready: torch.cuda.Event | None = None
    host: torch.Tensor | None = None

    def wait(self) -> None:
        if self.ready is not None:
            stream = torch.cuda.current_stream(self.k.device)
            stream.wait_event(self.ready)
            self.k.record_stream(stream)
            self.v.record_stream(stream)
        self.host = None


@dataclass(slots=True)
class FusionResult:
    """Per-layer fused KV (``[kv_heads, tokens, head_dim]``), the last token's logits, and what was computed."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    logits: torch.Tensor
    selected: torch.Tensor  # positions recomputed after the last check layer
    compute_s: float


def fuse(
    model: DecoderModel,
    tokens: torch.Tensor,
    reused: torch.Tensor,
    config: BlendConfig,
    load: Callable[[int], LayerKV],
) -> FusionResult:
    """Run the prompt ``tokens`` (``[n]``) through ``model`` reusing the KV of positions ``reused``.

    ``load(layer)`` is called for every layer from the first check layer on (every layer
    when there is none), in order, and returns that layer's reused KV in the order of ``reused``.
    """
    started = time.perf_counter()
    device = model.shape.device
    n = int(tokens.shape[0])
    pos = torch.arange(n, device=device)
    reused = reused.to(device)
    is_reused = torch.zeros(n, dtype=torch.bool, device=device)
    is_reused[reused] = True
    fresh = pos[~is_reused]
    # Row of each reused position in the loaded KV (-1 for new tokens).
    row = torch.full((n,), -1, dtype=torch.long, device=device)
    row[reused] = torch.arange(reused.numel(), device=device)
    checks = list(config.check_layers)
    first_check = checks[0] if checks else -1

    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    h = model.embed_tokens(tokens)
    sel: torch.Tensor | None = None if checks else fresh  # None: all tokens
    mask: torch.Tensor | None = None if sel is None else pos[None, :] <= sel[:, None]
    if sel is not None:
        h = h[sel]
    for layer in range(model.shape.num_layers):
        if sel is None:
            q, k, v = model.qkv(layer, h, pos)
            h = model.finish(layer, h, q, k, v, None)
            if layer == first_check:
                got = load(layer)
                got.wait()
                keep = _top(_deviation(k[:, reused], v[:, reused], got.k, got.v), config.ratio_at(0), reused.numel())
                sel = torch.sort(torch.cat((fresh, reused[keep]))).values
                h = h[sel]
                mask = pos[None, :] <= sel[:, None]
            keys.append(k)
            values.append(v)
            continue
        got = load(layer)
        q, k_sel, v_sel = model.qkv(layer, h, sel)
        got.wait()
        k = torch.empty((got.k.shape[0], n, got.k.shape[2]), dtype=k_sel.dtype, device=device)
        v = torch.empty_like(k)
        k[:, reused] = got.k
        v[:, reused] = got.v
        k[:, sel] = k_sel
        v[:, sel] = v_sel
        h = model.finish(layer, h, q, k, v, mask)
        keys.append(k)
        values.append(v)
        if layer in checks[1:]:
            j = checks.index(layer)
            cand = (row[sel] >= 0).nonzero().squeeze(1)  # indices into sel of reused tokens
            rows = row[sel[cand]]
            dev = _deviation(k_sel[:, cand], v_sel[:, cand], got.k[:, rows], got.v[:, rows])
            keep = cand[_top(dev, config.ratio_at(j), reused.numel())]
            keep_mask = row[sel] < 0
            keep_mask[keep] = True
            sel = sel[keep_mask]
            h = h[keep_mask]
            mask = pos[None, :] <= sel[:, None]
    assert sel is not None and int(sel[-1]) == n - 1, "the last prompt token must be recomputed"
    logits = model.logits(h[-1:])[0]
    return FusionResult(keys, values, logits, sel if sel is not None else pos, time.perf_counter() - started)


def _deviation(k: torch.Tensor, v: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor) -> torch.Tensor:
    """Squared KV deviation per token (float32), summed over heads and dims."""
    dk = (k.float() - k_old.float()).square().sum(dim=(0, 2))
    dv = (v.float() - v_old.float()).square().sum(dim=(0, 2))
    return dk + dv


def _top(deviation: torch.Tensor, ratio: float, n_reused: int) -> torch.Tensor:
    """Indices of the ``ceil(ratio * n_reused)`` largest deviations (at most all of them)."""
    m = min(int(math.ceil(ratio * n_reused - 1e-9)), int(deviation.numel()))
    return torch.topk(deviation, m).indices if m > 0 else deviation.new_zeros(0, dtype=torch.long)
