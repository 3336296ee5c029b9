"""Values as clients put them and get them back (kvstore/client/payload.py):
the metadata and bytes of a value, and the tensor rebuilt from them."""

from __future__ import annotations

import pytest
import torch

from kvstore.chunk import checksum
from kvstore.client.payload import to_payload, to_tensor
from kvstore.errors import InvalidArgument

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_0d_tensor_comes_back_0d(dtype: torch.dtype) -> None:
    t = torch.tensor(3, dtype=dtype)
    meta, view = to_payload(t)
    assert meta.shape == () and meta.nbytes == t.element_size() and meta.checksum == checksum(view)
    back = to_tensor(meta, bytes(view))
    assert back.shape == () and back.dtype == dtype and torch.equal(back, t)


@pytest.mark.parametrize("shape", [(1,), (0,), (5,), (2, 3, 4)])
def test_tensors_keep_their_shape(shape: tuple[int, ...]) -> None:
    t = torch.arange(int(torch.tensor(shape).prod()), dtype=torch.float32).reshape(shape)
    meta, view = to_payload(t)
    back = to_tensor(meta, bytes(view))
    assert back.shape == t.shape and torch.equal(back, t)


@pytest.mark.parametrize("data", [b"", b"x", b"\x00\x01\x02" * 100])
def test_bytes_come_back_flat_uint8(data: bytes) -> None:
    meta, view = to_payload(data)
    assert meta.dtype == "uint8" and meta.shape == ()
    back = to_tensor(meta, bytes(view))
    assert back.dtype == torch.uint8 and back.shape == (len(data),) and bytes(back.numpy()) == data


def test_a_non_contiguous_tensor_is_put_in_c_order() -> None:
    t = torch.arange(12, dtype=torch.int32).reshape(3, 4).t()
    meta, view = to_payload(t)
    assert meta.shape == (4, 3)
    assert torch.equal(to_tensor(meta, bytes(view)), t)


def test_other_values_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="a value must be bytes"):
        to_payload("text")  # type: ignore[arg-type]
