"""CacheBlend's public API: what a connector (or a script) calls.

::

    blend = CacheBlend(model, ClientSource(client), KeyBuilder(namespace, layout), BlendConfig(separator=sep))
    blend.store(doc_tokens)                 # once per document: its KV, alone, layer by layer
    result = blend.prefill(prompt_tokens)   # segments looked up wherever they sit, KV fused
    result.logits                           # next-token logits of the last prompt token
    model(next_token, past_key_values=result.cache)   # decoding continues on the fused cache

The layout fingerprint of ``keys`` must describe the model (dtype, layers, KV heads, head
dim): it is checked here, so KV of another model can never be blended in.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvstore.blend.config import BlendConfig
from kvstore.blend.errors import SegmentMissing
from kvstore.blend.fusion import FusionResult, LayerKV, fuse
from kvstore.blend.loader import LayerLoader
from kvstore.blend.model import DecoderModel
from kvstore.blend.segments import Segment, split
from kvstore.blend.source import KVSource
from kvstore.client.payload import dtype_name
from kvstore.errors import ConfigError, InvalidArgument
from kvstore.keys import ChunkKey, KeyBuilder


@dataclass(frozen=True, slots=True)
class SegmentHit:
    """A reusable segment of a prompt, its per-layer keys, and whether the store has all of them."""

    segment: Segment
    keys: list[ChunkKey]
    stored: bool


@dataclass(slots=True)
class BlendResult:
    """The outcome of :meth:`CacheBlend.prefill`.

    ``cache`` is a transformers ``DynamicCache`` holding the fused KV of every prompt token:
    pass it as ``past_key_values`` with the next token to continue decoding.  ``logits`` are
    the next-token logits (float32, ``[vocab]``) of the last prompt token.
    """

    cache: Any
    logits: torch.Tensor
    num_tokens: int
    reused_tokens: int
    recomputed_tokens: int
    segments: list[SegmentHit]
    lookup_s: float
    compute_s: float
    load_s: float
    wait_s: float


class CacheBlend:
    """Reuse of stored segment KV wherever the segment sits in a prompt, with selective recompute."""

    def __init__(self, model: Any, source: KVSource, keys: KeyBuilder, config: BlendConfig) -> None:
        if not isinstance(config, BlendConfig):
            raise InvalidArgument(f"config must be a BlendConfig, got {type(config).__name__}")
        if not isinstance(source, KVSource):
            raise InvalidArgument(f"source must be a KVSource (ClientSource, StoreSource), got {type(source).__name__}")
        if not isinstance(keys, KeyBuilder):
            raise InvalidArgument(f"keys must be a KeyBuilder, got {type(keys).__name__}")
        if not config.separator:
            raise ConfigError("blend.separator is empty: set it to the token ids that separate documents")
        self.model = DecoderModel(model)
        shape = self.model.shape
        bad = [c for c in config.check_layers if c >= shape.num_layers]
        if bad:
            raise ConfigError(f"blend.check_layers {bad} out of range: the model has {shape.num_layers} layers")
        layout = keys.layout
        want = {
            "dtype": dtype_name(shape.dtype),
            "num_layers": shape.num_layers,
            "num_kv_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim,
        }
        have = {name: getattr(layout, name) for name in want}
        if have != want or layout.tp_size != 1:
            raise ConfigError(f"keys.layout {have} (tp_size={layout.tp_size}) does not describe the model {want} (tp_size=1)")
        self.source = source
        self.keys = keys
        self.config = config
        self._side_stream: torch.cuda.Stream | None = None
        if shape.device.type == "cuda":
            self._side_stream = torch.cuda.Stream(shape.device)  # type: ignore[no-untyped-call]

    # -- segments ------------------------------------------------------------------
    def segments(self, tokens: Sequence[int] | torch.Tensor) -> list[Segment]:
        """The prompt's segments under this config's separator and minimum length."""
        ids = _token_list(tokens)
        return split(ids, self.config.separator, self.config.min_segment_tokens)

    def lookup(self, tokens: Sequence[int] | torch.Tensor) -> list[SegmentHit]:
        """Reusable segments of the prompt and whether each is stored (one ``exists`` round trip)."""
        ids = _token_list(tokens)
        return self._hits(ids, [s for s in self.segments(ids) if s.reusable])

    def _hits(self, ids: list[int], segments: list[Segment]) -> list[SegmentHit]:
        keyed = [(s, self.segment_keys(ids[s.start : s.end], at_start=s.start == 0)) for s in segments]
        present = self.source.exists([k for _, ks in keyed for k in ks])
        out: list[SegmentHit] = []
        at = 0
        for seg, ks in keyed:
            out.append(SegmentHit(seg, ks, all(present[at : at + len(ks)])))
            at += len(ks)
        return out

    def segment_keys(self, tokens: Sequence[int], *, at_start: bool = False) -> list[ChunkKey]:
        """The per-layer keys of one segment: its tokens behind the configured anchor, or alone
        when ``at_start`` (a segment that opens the prompt is stored as exact prefix KV)."""
        lead = () if at_start else self.config.anchor
        return self.keys.segment_layer_keys(np.asarray([*lead, *tokens], dtype=np.int64))

    # -- storing ---------------------------------------------------------------------
    @torch.inference_mode()
    def segment_kv(self, tokens: Sequence[int] | torch.Tensor, *, at_start: bool = False) -> list[torch.Tensor]:
        """KV of ``tokens`` computed alone behind the anchor (or from position 0 when ``at_start``),
        one ``[1, 2, n, kv_heads, head_dim]`` CPU tensor per layer."""
        ids = _token_list(tokens)
        if not ids:
            raise InvalidArgument("a segment must have at least one token")
        m = self.model
        lead = () if at_start else self.config.anchor
        skip = len(lead)
        t = torch.tensor([*lead, *ids], dtype=torch.long, device=m.shape.device)
        pos = torch.arange(t.shape[0], device=m.shape.device)
        h = m.embed_tokens(t)
        out = []
        for layer in range(m.shape.num_layers):
            q, k, v = m.qkv(layer, h, pos)
            h = m.finish(layer, h, q, k, v, None)
            kv = torch.stack((k[:, skip:].transpose(0, 1), v[:, skip:].transpose(0, 1)))
            out.append(kv[None].to("cpu").contiguous())
        return out

    def store(self, tokens: Sequence[int] | torch.Tensor, *, at_start: bool = False) -> int:
        """Compute and store the KV of every reusable segment of ``tokens`` the store lacks.

        ``tokens`` may be a whole prompt (split at the separator; its first segment is stored
        as prefix KV) or one document (stored behind the anchor, or as prefix KV when
        ``at_start``: for a system prompt that opens every prompt).  Returns the number of
        segments stored.
        """
        ids = _token_list(tokens)
        if _contains(ids, self.config.separator):
            items = [(seg, seg.start == 0) for seg in self.segments(ids) if seg.reusable]
        elif len(ids) >= self.config.min_segment_tokens:
            items = [(Segment(0, len(ids), True), at_start)]
        else:
            items = []
        keyed = [self.segment_keys(ids[seg.start : seg.end], at_start=first) for seg, first in items]
        present = self.source.exists([k for ks in keyed for k in ks])
        stored = 0
        for i, ((seg, first), ks) in enumerate(zip(items, keyed, strict=True)):
            if all(present[i * len(ks) : (i + 1) * len(ks)]):
                continue
            kv = self.segment_kv(ids[seg.start : seg.end], at_start=first)
            self.source.put_many(list(zip(ks, kv, strict=True)))
            stored += 1
        return stored

    # -- prefill ---------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, tokens: Sequence[int] | torch.Tensor, *, reuse_only_prefix: bool = False) -> BlendResult:
        """Prefill ``tokens`` reusing every stored segment's KV, wherever it sits.

        ``reuse_only_prefix`` restricts reuse to a stored segment at position 0 (plain prefix
        reuse, for comparison).  Raises :class:`SegmentMissing` if a segment disappears from
        the store while it loads, and the store's own typed errors if it fails.
        """
        ids = _token_list(tokens)
        if not ids:
            raise InvalidArgument("the prompt is empty")
        m = self.model
        started = time.perf_counter()
        hits = [h for h in self.lookup(ids) if h.stored]
        if reuse_only_prefix:
            hits = [h for h in hits if h.segment.start == 0]
        lookup_s = time.perf_counter() - started
        device = m.shape.device
        reused = torch.cat([torch.arange(h.segment.start, h.segment.end) for h in hits]) if hits else torch.zeros(0, dtype=torch.long)
        skip = len(self.config.anchor)
        old = torch.cat([torch.arange(h.segment.length) + (0 if h.segment.start == 0 else skip) for h in hits]) \
            if hits else torch.zeros(0, dtype=torch.long)
        checks = self.config.check_layers
        layers = range(checks[0] if checks else 0, m.shape.num_layers)
        if reuse_only_prefix:
            # The prefix's KV is exact: no check layer, only the tokens after it are computed.
            config = BlendConfig(ratio=0.0, check_layers=(), separator=self.config.separator,
                                 min_segment_tokens=self.config.min_segment_tokens, anchor=self.config.anchor)
            layers = range(m.shape.num_layers)
        else:
            config = self.config
        tensor = torch.tensor(ids, dtype=torch.long, device=device)

        def fetch(layer: int) -> LayerKV:
            return self._fetch(layer, hits, old.to(device), reused.to(device))

        with LayerLoader(fetch, layers, depth=self.config.prefetch_layers) as loader:
            result: FusionResult = fuse(m, tensor, reused, config, loader.get)
            load_s, wait_s = loader.load_s, loader.wait_s
        return BlendResult(
            cache=self._cache(result),
            logits=result.logits,
            num_tokens=len(ids),
            reused_tokens=int(reused.numel()),
            recomputed_tokens=int(result.selected.numel()),
            segments=hits,
            lookup_s=lookup_s,
            compute_s=result.compute_s,
            load_s=load_s,
            wait_s=wait_s,
        )

    def _fetch(self, layer: int, hits: list[SegmentHit], old: torch.Tensor, new: torch.Tensor) -> LayerKV:
        """Load one layer of every hit segment, place it at its new positions (runs in the loader thread)."""
        shape = self.model.shape
        pin = shape.device.type == "cuda"
        parts = []
        for hit in hits:
            buf = torch.empty((1, 2, hit.segment.length, shape.num_kv_heads, shape.head_dim), dtype=shape.dtype,
                              pin_memory=pin)
            if not self.source.get_into(hit.keys[layer], buf):
                raise SegmentMissing(
                    f"the KV of segment [{hit.segment.start}, {hit.segment.end}) layer {layer} is no longer stored "
                    f"(key {hit.keys[layer]}); prefill again to recompute it"
                )
            parts.append(buf[0])
        host = torch.cat(parts, dim=1) if parts else torch.empty((2, 0, shape.num_kv_heads, shape.head_dim), dtype=shape.dtype)
        if self._side_stream is None:
            kv = host.transpose(1, 2)  # [2, kv_heads, n, head_dim]
            k = self.model.rope.rerotate(kv[0], old, new).contiguous()
            return LayerKV(k, kv[1].contiguous())
        with torch.inference_mode(), torch.cuda.stream(self._side_stream):
            dev = host.to(shape.device, non_blocking=True).transpose(1, 2)
            k = self.model.rope.rerotate(dev[0], old, new).contiguous()
            v = dev[1].contiguous()
            ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
            ready.record(self._side_stream)
        return LayerKV(k, v, ready, host)

    def _cache(self, result: FusionResult) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer, (k, v) in enumerate(zip(result.keys, result.values, strict=True)):
            cache.update(k[None], v[None], layer)
        return cache


def _token_list(tokens: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1 or tokens.dtype.is_floating_point:
            raise InvalidArgument(f"tokens must be a 1-D integer tensor, got {tokens.dtype} of shape {tuple(tokens.shape)}")
        return [int(t) for t in tokens.tolist()]
    if isinstance(tokens, str | bytes):
        raise InvalidArgument("tokens must be token ids, not text: tokenize first")
    out = []
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, int | np.integer) or t < 0:
            raise InvalidArgument(f"tokens must be non-negative integer ids, got {t!r}")
        out.append(int(t))
    return out


def _contains(ids: list[int], sep: Sequence[int]) -> bool:
    m = len(sep)
    s = list(sep)
    return any(ids[i : i + m] == s for i in range(len(ids) - m + 1))
