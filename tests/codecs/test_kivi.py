"""kivi: per-channel keys, per-token values, exact sizes, bounded error."""

from __future__ import annotations

import pytest
import torch

from kvstore.codecs import get_codec
from kvstore.codecs.kivi import BITS
from kvstore.errors import InvalidArgument
from tests.codecs.conftest import RealKV


@pytest.mark.parametrize("group", [32, 128, 50])
@pytest.mark.parametrize("level", [0, 1, 2])
def test_size_and_error_bound(real_kv: RealKV, group: int, level: int) -> None:
    chunk = real_kv.chunk(3)
    codec = get_codec("kivi", group_size=group)
    data = codec.encode(chunk, level=level)
    out = codec.decode(data)
    bits = BITS[level]
    # Codes + an fp16 scale and minimum per group (+ header); group 50 leaves partial groups.
    assert len(data) * 8 / chunk.numel() < bits + 32 / group + 0.5
    x = chunk.float()
    L, _, T, H, D = x.shape
    k, v = x[:, 0].reshape(L, T, H * D), x[:, 1].reshape(L, T, H * D)
    # Worst case error: half a step of the widest group, plus fp16 rounding of the output.
    k_range = (k.amax(1) - k.amin(1)).max()
    v_range = (v.amax(2) - v.amin(2)).max()
    bound = torch.maximum(k_range, v_range) / (2**bits - 1) * 0.5 + 0.05
    assert (out.float() - x).abs().max() <= bound


def test_keys_are_quantized_per_channel() -> None:
    # One key channel with a huge constant offset must not hurt the others.
    x = torch.randn(1, 2, 64, 1, 8) * 0.1
    x[:, 0, :, :, 3] += 100.0
    out = get_codec("kivi", group_size=32).decode(get_codec("kivi", group_size=32).encode(x.half(), level=1))
    err = (out.float() - x.half().float()).abs()[:, 0]
    assert err[..., :3].max() < 0.05


def test_odd_shapes_round_trip() -> None:
    x = torch.randn(2, 2, 7, 1, 5, dtype=torch.float32)
    for group in (1, 3, 32):
        out = get_codec("kivi", group_size=group).decode(get_codec("kivi", group_size=group).encode(x, level=0))
        assert out.shape == x.shape and (out - x).abs().max() < 0.05


def test_group_size_is_validated() -> None:
    with pytest.raises(InvalidArgument, match="group_size"):
        get_codec("kivi", group_size=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_encode_leaves_its_input_untouched(dtype: torch.dtype) -> None:
    # The quantizer works in place on a float32 scratch copy; float32 input must not be that copy.
    x = torch.randn(2, 2, 64, 1, 32).to(dtype)
    before = x.clone()
    for level in (0, 2):
        get_codec("kivi", group_size=32).encode(x, level=level)
    assert torch.equal(x, before)
