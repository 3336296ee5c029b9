"""The fusion's invariants against transformers' own forward pass.

* ratio 1.0: every token is recomputed on every layer, so the fused KV and logits equal a
  full prefill's;
* one stored segment at position 0: its KV is exact, so CacheBlend equals plain prefix reuse;
* in between, the selection has the documented size and decoding continues on the cache.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache

from kvstore.blend import StoreSource
from tests.blend.conftest import SEP, blender, doc, tiny_model

FAMILIES = ["llama", "qwen2", "qwen3"]


def prompt(docs: list[list[int]], order: list[int], question: list[int]) -> list[int]:
    ids: list[int] = []
    for i in order:
        ids += docs[i] + [SEP]
    return ids + question


def full_prefill(model: Any, ids: list[int]) -> tuple[torch.Tensor, Any]:
    with torch.inference_mode():
        out = model(torch.tensor([ids]), use_cache=True)
    return out.logits[0, -1].float(), out.past_key_values


def cache_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    lay = cache.layers[layer]
    return lay.keys[0], lay.values[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_one_equals_full_prefill(family: str, source: StoreSource) -> None:
    model = tiny_model(family)
    docs = [doc(s, 20 + 5 * s) for s in range(3)]
    b = blender(model, source, ratio=1.0)
    for d in docs:
        assert b.store(d) == 1
    ids = prompt(docs, [2, 0, 1], doc(99, 9))
    res = b.prefill(ids)
    assert res.reused_tokens == sum(len(d) for d in docs)
    assert res.recomputed_tokens == len(ids)
    ref_logits, ref_cache = full_prefill(model, ids)
    torch.testing.assert_close(res.logits, ref_logits, atol=1e-4, rtol=1e-4)
    for layer in range(model.config.num_hidden_layers):
        k, v = cache_kv(res.cache, layer)
        rk, rv = cache_kv(ref_cache, layer)
        torch.testing.assert_close(k, rk, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v, rv, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_segment_at_position_zero_equals_prefix_reuse(family: str, source: StoreSource) -> None:
    model = tiny_model(family)
    first = doc(5, 40)
    b = blender(model, source)  # the defaults: 15 %, check layer 1
    b.store(first)
    suffix = [SEP] + doc(6, 11)
    ids = first + suffix
    res = b.prefill(ids)
    assert res.reused_tokens == len(first)
    # Prefix reuse as an engine does it: the stored KV as the cache, then the rest of the prompt.
    prefix = DynamicCache(config=model.config)
    for layer, kv in enumerate(b.segment_kv(first)):
        prefix.update(kv[0, 0].transpose(0, 1)[None], kv[0, 1].transpose(0, 1)[None], layer)
    with torch.inference_mode():
        ref = model(torch.tensor([suffix]), past_key_values=prefix, use_cache=True)
    torch.testing.assert_close(res.logits, ref.logits[0, -1].float(), atol=1e-4, rtol=1e-4)
    for layer in range(model.config.num_hidden_layers):
        k, v = cache_kv(res.cache, layer)
        rk, rv = cache_kv(ref.past_key_values, layer)
        torch.testing.assert_close(k, rk, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v, rv, atol=1e-4, rtol=1e-4)
    # reuse_only_prefix gives the same result without any check layer.
    only = b.prefill(ids, reuse_only_prefix=True)
    torch.testing.assert_close(only.logits, res.logits, atol=1e-4, rtol=1e-4)
    assert only.recomputed_tokens == len(suffix)


def test_selection_size_and_decoding_continue(source: StoreSource) -> None:
    model = tiny_model("llama")
    docs = [doc(s, 50) for s in range(4)]
    question = doc(77, 10)
    b = blender(model, source, ratio=0.2)
    for d in docs:
        b.store(d)
    ids = prompt(docs, [3, 1, 0, 2], question)
    res = b.prefill(ids)
    new_tokens = len(ids) - 200
    assert res.recomputed_tokens == new_tokens + 40  # 20 % of the 200 reused tokens, plus every new token
    assert res.cache.get_seq_length() == len(ids)
    # Decoding continues on the fused cache exactly as on any cache holding the same KV.
    nxt = int(res.logits.argmax())
    with torch.inference_mode():
        step = model(torch.tensor([[nxt]]), past_key_values=res.cache, use_cache=True)
    assert step.past_key_values.get_seq_length() == len(ids) + 1
    assert torch.isfinite(step.logits).all()


def test_recompute_moves_logits_toward_full_prefill(source: StoreSource) -> None:
    model = tiny_model("llama")
    docs = [doc(s, 40) for s in range(4)]
    ids = prompt(docs, [2, 3, 0, 1], doc(55, 8))
    ref, _ = full_prefill(model, ids)
    errors = []
    for ratio, checks in [(0.0, ()), (0.3, (1,)), (0.6, (1,)), (1.0, (1,))]:
        b = blender(model, source, ratio=ratio, check_layers=checks)
        for d in docs:
            b.store(d)
        errors.append(float((b.prefill(ids).logits - ref).abs().max()))
    assert errors[0] > 1e-2  # naive reuse is visibly wrong on this model
    assert errors[-1] < 1e-4
    assert errors[0] > errors[1] > errors[3]


def test_several_check_layers_narrow_the_selection(source: StoreSource) -> None:
    model = tiny_model("qwen2")
    docs = [doc(s, 50) for s in range(2)]
    b = blender(model, source, ratio=0.1, check_layers=(1, 2))
    for d in docs:
        b.store(d)
    ids = prompt(docs, [1, 0], doc(8, 6))
    res = b.prefill(ids)
    assert res.recomputed_tokens == (len(ids) - 100) + 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_ratio_one_equals_full_prefill_on_cuda(source: StoreSource) -> None:
    model = tiny_model("llama", device="cuda")
    docs = [doc(s, 64) for s in range(3)]
    b = blender(model, source, ratio=1.0)
    for d in docs:
        b.store(d)
    ids = prompt(docs, [1, 2, 0], doc(9, 7))
    res = b.prefill(ids)
    ref, _ = full_prefill(model, ids)
    torch.testing.assert_close(res.logits, ref, atol=1e-3, rtol=1e-3)
    assert res.cache.layers[0].keys.device.type == "cuda"
