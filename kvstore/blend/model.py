"""A Llama-family causal LM run one decoder layer at a time, on all tokens or on a subset.

CacheBlend needs what a normal forward pass hides: the keys and values of each layer, and a
way to push only *some* tokens through a layer while they attend to the KV of all tokens.
:class:`DecoderModel` wraps a transformers model of a supported family and exposes those
steps, built from the model's own modules (projections, norms, rotary embedding, MLP), so
the weights and numerics are the model's.

Supported (``config.model_type``): ``llama`` (SmolLM2, Llama 2/3 with rope scaling),
``mistral`` and ``qwen2`` without sliding-window layers, ``qwen3`` (per-head q/k norms).
Grouped-query attention is handled by the attention kernel (``enable_gqa``).  Tensors are
per sequence (no batch dimension): hidden states ``[n, hidden]``, keys/values
``[kv_heads, n, head_dim]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kvstore.blend.errors import UnsupportedModel
from kvstore.blend.rope import Rope, rotate_half

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_QK_NORM = ("qwen3",)


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the stored KV of one layer looks like."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device


class DecoderModel:
    """Layer-by-layer access to a transformers Llama-family causal LM (in eval mode, no grad)."""

    def __init__(self, model: Any) -> None:
        config: Any = getattr(model, "config", None)
        family = getattr(config, "model_type", None)
        if family not in FAMILIES:
            raise UnsupportedModel(
                f"model type {family!r} is not supported by CacheBlend; supported: {', '.join(FAMILIES)}"
            )
        layer_types = getattr(config, "layer_types", None) or ()
        if "sliding_attention" in layer_types or (family == "mistral" and getattr(config, "sliding_window", None)):
            raise UnsupportedModel(
                f"{family} model uses sliding-window attention, which CacheBlend does not support; "
                "load it with sliding_window=None"
            )
        self.model = model
        self.config = config
        inner = model.model
        self.layers = list(inner.layers)
        self.embed = inner.embed_tokens
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.qk_norm = family in _QK_NORM
        rotary = inner.rotary_emb
        self.rope = Rope(rotary, float(rotary.attention_scaling))
        attn = self.layers[0].self_attn
        weight = self.lm_head.weight
        self.scaling = float(attn.scaling)
        self.shape = ModelShape(
            num_layers=len(self.layers),
            num_heads=int(config.num_attention_heads),
            num_kv_heads=int(config.num_key_value_heads),
            head_dim=int(attn.head_dim),
            dtype=weight.dtype,
            device=weight.device,
        )

    # -- pieces ------------------------------------------------------------------
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Input hidden states ``[n, hidden]`` of token ids ``[n]``."""
        out: torch.Tensor = self.embed(tokens.to(self.shape.device))
        return out

    def qkv(self, layer: int, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries ``[heads, n, d]`` and keys/values ``[kv_heads, n, d]`` of layer ``layer`` (RoPE applied)."""
        block = self.layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(h)
        n, d = x.shape[0], self.shape.head_dim
        q = attn.q_proj(x).view(n, -1, d)
        k = attn.k_proj(x).view(n, -1, d)
        v = attn.v_proj(x).view(n, -1, d)
        if self.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        cos, sin = self.rope.tables(positions, x.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k.contiguous(), v.contiguous()

    def finish(
        self,
        layer: int,
        h: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The rest of layer ``layer`` for the tokens of ``h``/``q``: attention over ``k``/``v``, MLP.

        ``mask`` is a boolean ``[n_q, n_kv]`` (True = may attend) or None for plain causal
        attention over the same tokens.
        """
        block = self.layers[layer]
        o = F.scaled_dot_product_attention(
            q[None], k[None], v[None], attn_mask=mask, is_causal=mask is None, scale=self.scaling, enable_gqa=True
        )[0]
        o = o.transpose(0, 1).reshape(h.shape[0], -1)
        h = h + block.self_attn.o_proj(o)
        out: torch.Tensor = h + block.mlp(block.post_attention_layernorm(h))
        return out

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token logits (float32) of hidden states ``[n, hidden]``."""
        out: torch.Tensor = self.lm_head(self.norm(h)).float()
        return out
