"""The CUDA path: same format both ways between GPU and CPU.  Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from kvstore.codecs import decode, get_codec
from tests.codecs.conftest import RealKV

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("name", ["raw", "zstd", "kivi", "cachegen"])
def test_gpu_encoded_decodes_on_cpu_and_back(real_kv: RealKV, name: str) -> None:
    chunk = real_kv.chunk(1)
    codec = get_codec(name)
    on_gpu = codec.encode(chunk.cuda())
    on_cpu = codec.encode(chunk)
    if name in ("raw", "zstd"):
        assert on_gpu == on_cpu  # lossless: same bytes whichever device encoded
    # Whatever encoded it, both devices decode it to the same values.
    for data in (on_gpu, on_cpu):
        a = decode(data, "cpu")
        b = decode(data, "cuda")
        assert b.device.type == "cuda"
        assert torch.equal(a, b.cpu())


def test_cachegen_decode_on_gpu_matches_cpu_at_every_level(real_kv: RealKV) -> None:
    chunk = real_kv.chunk(2, torch.bfloat16)
    codec = get_codec("cachegen")
    for level in codec.levels:
        data = codec.encode(chunk, level=level)
        assert torch.equal(codec.decode(data, "cuda").cpu(), codec.decode(data, "cpu"))
