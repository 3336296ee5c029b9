"""The issue's goals on a real model: size and perplexity of a held-out continuation
when the 2,048-token context's KV (chunks of 256) is replaced by the decoded KV."""

from __future__ import annotations

import torch

from kvstore.codecs import decode, get_codec
from kvstore.testing import smollm2
from tests.codecs.conftest import CHUNK_TOKENS, RealKV


def _roundtrip(real_kv: RealKV, name: str, level: int, **options: int) -> tuple[float, float]:
    """Bits per element (all-in) and perplexity with the decoded fp16 KV."""
    codec = get_codec(name, **options)
    parts, nbytes = [], 0
    kv16 = real_kv.kv.half()
    for start in range(0, kv16.shape[2], CHUNK_TOKENS):
        data = codec.encode(kv16[:, :, start : start + CHUNK_TOKENS].contiguous(), level=level)
        nbytes += len(data)
        parts.append(decode(data))
    lp = smollm2.continuation_logprobs(real_kv.model, torch.cat(parts, 2), real_kv.continuation)
    return nbytes * 8 / kv16.numel(), smollm2.perplexity(lp, real_kv.continuation)


def test_default_level_is_small_and_keeps_perplexity(real_kv: RealKV) -> None:
    codec = get_codec("cachegen")
    bits, ppl = _roundtrip(real_kv, "cachegen", codec.default_level)
    assert bits <= 2.0, bits
    assert ppl <= real_kv.exact_ppl * 1.03, (ppl, real_kv.exact_ppl)
    # The 8-bit uniform baseline is at least 4x larger.
    int8_bits, _ = _roundtrip(real_kv, "kivi", 0, group_size=128)
    assert int8_bits >= 4 * bits, (int8_bits, bits)


def test_cachegen_beats_kivi_at_equal_or_smaller_size(real_kv: RealKV) -> None:
    kivi_bits, kivi_ppl = _roundtrip(real_kv, "kivi", 2, group_size=32)  # KIVI-2, 3 bits
    cg_bits, cg_ppl = _roundtrip(real_kv, "cachegen", 3)
    assert cg_bits <= kivi_bits and cg_ppl < kivi_ppl, (cg_bits, cg_ppl, kivi_bits, kivi_ppl)
