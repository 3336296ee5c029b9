"""Re-rotation of stored keys is exact: equal to computing the keys at the new positions."""

from __future__ import annotations

import pytest
import torch

from kvstore.blend.model import DecoderModel
from tests.blend.conftest import doc, tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("shift", [1, 37, 300])
def test_rerotated_keys_equal_keys_computed_at_new_positions(family: str, shift: int) -> None:
    m = DecoderModel(tiny_model(family))
    tokens = torch.tensor(doc(7, 48))
    h = m.embed_tokens(tokens)
    old = torch.arange(48)
    new = old + shift
    with torch.inference_mode():
        _, k_old, _ = m.qkv(0, h, old)
        _, k_new, _ = m.qkv(0, h, new)
        moved = m.rope.rerotate(k_old, old, new)
    assert not torch.allclose(k_old, k_new, atol=1e-3)  # the positions really matter
    torch.testing.assert_close(moved, k_new, atol=2e-5, rtol=1e-5)


def test_rerotation_is_exact_in_float64_with_llama3_scaling() -> None:
    m = DecoderModel(tiny_model("llama", dtype=torch.float64))
    assert m.rope.module.rope_type == "llama3"
    tokens = torch.tensor(doc(3, 64))
    old = torch.arange(64)
    new = torch.arange(64) * 3 + 5  # any mapping, not only a shift
    with torch.inference_mode():
        h = m.embed_tokens(tokens)
        _, k_old, _ = m.qkv(0, h, old)
        _, k_new, _ = m.qkv(0, h, new)
        moved = m.rope.rerotate(k_old, old, new)
    # The tables come out of the rotary module in float32: exact to float32 rounding.
    torch.testing.assert_close(moved, k_new, atol=1e-5, rtol=0)


def test_rerotate_rejects_mismatched_positions() -> None:
    m = DecoderModel(tiny_model("llama"))
    with pytest.raises(ValueError, match="positions must have shape"):
        m.rope.rerotate(torch.zeros(2, 5, 16), torch.arange(4), torch.arange(5))
