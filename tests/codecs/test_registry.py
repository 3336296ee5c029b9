"""The codec registry: names, wire ids, lazy imports, dispatch by header."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kvstore.codecs import codec_name_for_id, codec_names, decode, get_codec
from kvstore.errors import CodecError, InvalidArgument


def test_every_codec_round_trips_its_wire_id() -> None:
    assert set(codec_names()) == {"raw", "zstd", "kivi", "cachegen"}
    for name in codec_names():
        codec = get_codec(name)
        assert codec.name == name
        assert codec_name_for_id(codec.codec_id) == name
        assert codec.default_level in codec.levels


def test_unknown_names_and_ids_are_typed_errors() -> None:
    with pytest.raises(InvalidArgument, match="unknown codec"):
        get_codec("lz4")
    with pytest.raises(CodecError):
        codec_name_for_id(200)
    with pytest.raises(CodecError):
        decode(b"not a payload")


def test_bad_level_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="no level"):
        get_codec("cachegen").encode(torch.zeros(1, 2, 4, 1, 8, dtype=torch.float16), level=42)


def test_decode_dispatches_on_the_header(small_kv: torch.Tensor) -> None:
    for name in codec_names():
        data = get_codec(name).encode(small_kv)
        assert decode(data).shape == small_kv.shape


def test_importing_the_package_loads_no_codec() -> None:
    code = (
        "import sys, kvstore.codecs; "
        "print(any(m in sys.modules for m in ('zstandard', 'kvstore.codecs.cachegen', 'kvstore.codecs._cachegen')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_layout_aware_codecs_refuse_other_layouts() -> None:
    x = torch.zeros(2, 4, 8, dtype=torch.float16)
    for name in ("kivi", "cachegen"):
        with pytest.raises(InvalidArgument, match="LKTHD"):
            get_codec(name).encode(x, layout="TXD")
    assert decode(get_codec("zstd").encode(x, layout="TXD")).shape == x.shape
