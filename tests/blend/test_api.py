"""CacheBlend's entry points: bad input is refused with errors that say what to fix; the real model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvstore.blend import BlendConfig, CacheBlend, StoreSource, UnsupportedModel
from kvstore.errors import ConfigError, InvalidArgument
from kvstore.keys import KeyBuilder, LayoutFingerprint, Namespace
from tests.blend.conftest import SEP, blender, doc, keys_for, tiny_model


def test_unsupported_models_are_refused(source: StoreSource) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModel, match="'gpt2' is not supported"):
        CacheBlend(gpt2, source, keys_for(tiny_model("llama")), BlendConfig(separator=(SEP,)))
    sliding = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, use_sliding_window=True, sliding_window=16, max_window_layers=0,
    ))
    with pytest.raises(UnsupportedModel, match="sliding-window"):
        CacheBlend(sliding, source, keys_for(sliding), BlendConfig(separator=(SEP,)))


def test_layout_must_describe_the_model(source: StoreSource) -> None:
    model = tiny_model("llama")
    wrong = KeyBuilder(Namespace("t", "m"), LayoutFingerprint("bfloat16", 4, 2, 16))
    with pytest.raises(ConfigError, match="does not describe the model"):
        CacheBlend(model, source, wrong, BlendConfig(separator=(SEP,)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"check_layers": (9,)}, "out of range: the model has 4 layers"),
        ({"separator": ()}, "separator is empty"),
    ],
)
def test_config_is_checked_against_the_model(source: StoreSource, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        blender(tiny_model("llama"), source, **kwargs)


def test_wrong_argument_types(source: StoreSource) -> None:
    model = tiny_model("llama")
    with pytest.raises(InvalidArgument, match="config must be a BlendConfig"):
        CacheBlend(model, source, keys_for(model), {"ratio": 0.1})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="source must be a KVSource"):
        CacheBlend(model, object(), keys_for(model), BlendConfig(separator=(SEP,)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([], "prompt is empty"),
        ("some text", "not text: tokenize first"),
        ([1, -2, 3], "non-negative integer ids"),
        ([1, 2.5], "non-negative integer ids"),
        (torch.zeros(2, 3, dtype=torch.long), "1-D integer tensor"),
        (torch.zeros(3), "1-D integer tensor"),
    ],
)
def test_bad_prompts_are_refused(source: StoreSource, tokens: Any, message: str) -> None:
    b = blender(tiny_model("llama"), source)
    with pytest.raises(InvalidArgument, match=message):
        b.prefill(tokens)


def test_nothing_stored_is_a_full_prefill(source: StoreSource) -> None:
    model = tiny_model("qwen3")
    b = blender(model, source)
    ids = doc(1, 20) + [SEP] + doc(2, 20) + [SEP] + doc(3, 5)
    res = b.prefill(torch.tensor(ids))
    assert res.reused_tokens == 0 and res.recomputed_tokens == len(ids)
    with torch.inference_mode():
        ref = model(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(res.logits, ref, atol=1e-4, rtol=1e-4)


def test_real_smollm2_blend(smol: tuple[Any, Any], source: StoreSource) -> None:
    """On the real model: ratio 1 equals full prefill; 15 % beats naive reuse by far."""
    from kvstore.testing import corpus

    model, tok = smol
    sep = tuple(tok("\n\n")["input_ids"])
    docs = [tok(p)["input_ids"] for p in corpus.PARAGRAPHS[:3]]
    question = list(sep) + tok("Question: what did the keepers write at the end of every night? Answer:")["input_ids"]
    ids = docs[2] + list(sep) + docs[0] + list(sep) + docs[1] + question
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
    kl = {}
    for name, ratio, checks in [("full", 1.0, (1,)), ("blend", 0.15, (1,)), ("naive", 0.0, ())]:
        b = CacheBlend(model, source, keys_for(model), BlendConfig(ratio=ratio, check_layers=checks, separator=sep))
        for d in docs:
            b.store(d)
        lq = torch.log_softmax(b.prefill(ids).logits, -1)
        kl[name] = float((ref.exp() * (ref - lq)).sum())
    assert abs(kl["full"]) < 1e-5
    assert kl["naive"] > 1e-2
    assert kl["blend"] < kl["naive"] / 5, kl
