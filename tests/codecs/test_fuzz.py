"""Fuzzing the decoders (hypothesis): random, truncated, mutated and resealed
payloads must decode or raise CodecError; never crash, hang or over-allocate.

"Resealed" mutations get a valid checksum again, so they reach each codec's
own parsing and the entropy decoder instead of stopping at the checksum.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.codecs import cachegen_native, decode, get_codec
from kvstore.codecs import format as fmt
from kvstore.errors import CodecError

FUZZ = settings(
    max_examples=1500,
    deadline=2000,  # ms per example: a hang shows up as a failure, not a stuck run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)


def _valid(name: str, level: int | None = None) -> bytes:
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 2, 24, 1, 32, generator=g).cumsum(2) * 0.2).half()
    return get_codec(name).encode(x, level=level)


PAYLOADS = {
    "raw": _valid("raw"),
    "zstd": _valid("zstd"),
    "kivi": _valid("kivi"),
    "cachegen": _valid("cachegen"),
    "cachegen0": _valid("cachegen", 0),  # near-lossless: raw bits and escapes in play
}


def _check(data: bytes) -> None:
    try:
        out = decode(data)
    except CodecError:
        return
    header, _ = fmt.unpack(data)
    assert tuple(out.shape) == header.shape and out.dtype == header.dtype


@st.composite
def mutated(draw: st.DrawFn, payload: bytes) -> bytes:
    data = bytearray(payload)
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[i] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[i:]
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[i : i + draw(st.integers(1, 16))]
    return bytes(data)


@pytest.mark.parametrize("name", list(PAYLOADS))
@FUZZ
@given(data=st.data())
def test_resealed_mutations(name: str, data: st.DataObject) -> None:
    _check(fmt.reseal(data.draw(mutated(PAYLOADS[name]))))


@pytest.mark.parametrize("name", ["cachegen", "kivi"])
@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_mutations_without_reseal_fail_the_checksum(name: str, data: st.DataObject) -> None:
    bad = data.draw(mutated(PAYLOADS[name]))
    if bad != PAYLOADS[name]:
        with pytest.raises(CodecError):
            decode(bad)


@settings(FUZZ, max_examples=1000)
@given(body=st.binary(max_size=600), codec_id=st.integers(0, 6), ndim=st.integers(0, 9))
def test_random_bodies_behind_a_plausible_header(body: bytes, codec_id: int, ndim: int) -> None:
    head = bytearray(PAYLOADS["cachegen"][:12])
    head[6], head[9] = codec_id, ndim
    _check(fmt.reseal(bytes(head) + body + b"\0" * 8))


@settings(FUZZ, max_examples=500)
@given(data=st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    _check(data)
    _check(fmt.reseal(data))


@pytest.mark.skipif(not cachegen_native.available(), reason="compares against the compiled kernel")
@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_torch_decoder_agrees_on_mutations(data: st.DataObject, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = fmt.reseal(data.draw(mutated(PAYLOADS["cachegen0"])))
    try:
        native_out: torch.Tensor | None = decode(bad)
    except CodecError:
        native_out = None
    with monkeypatch.context() as m:
        m.setattr(cachegen_native, "available", lambda: False)
        try:
            torch_out: torch.Tensor | None = decode(bad)
        except CodecError:
            torch_out = None
    assert (native_out is None) == (torch_out is None)
    if native_out is not None and torch_out is not None:
        assert torch.equal(native_out, torch_out)


def test_huge_shape_claim_is_refused_before_allocating() -> None:
    header, sections = fmt.unpack(PAYLOADS["cachegen"])
    forged = fmt.pack(fmt.Header(header.codec_id, header.level, header.dtype, (4000, 2, 4096, 8, 128), "LKTHD"), sections)
    with pytest.raises(CodecError, match="not possible|limit"):
        decode(forged)


@pytest.mark.skipif(
    not cachegen_native.available() or not cachegen_native.module().simd(), reason="needs the AVX2 coders"
)
@pytest.mark.parametrize("name", ["cachegen", "cachegen0"])
@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_simd_and_scalar_decoders_agree_on_mutations(name: str, data: st.DataObject) -> None:
    # The vector decoder hands over to the scalar steps near a stream's end;
    # on hostile words both must fail, or both decode the same values.
    bad = fmt.reseal(data.draw(mutated(PAYLOADS[name])))
    mod = cachegen_native.module()
    outs: list[torch.Tensor | None] = []
    for simd in (True, False):
        mod.set_simd(simd)
        try:
            outs.append(decode(bad))
        except CodecError:
            outs.append(None)
        finally:
            mod.set_simd(True)  # on before the test (its skip condition)
    assert (outs[0] is None) == (outs[1] is None)
    if outs[0] is not None and outs[1] is not None:
        assert torch.equal(outs[0], outs[1])
