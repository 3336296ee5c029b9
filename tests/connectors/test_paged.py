"""Gather/scatter between paged KV buffers and canonical LKTHD chunks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.connectors.paged import KVLayout, PagedKV, slot_mapping
from kvstore.errors import InvalidArgument

L, NB, H, N, D = 3, 12, 2, 16, 8


def layers(dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(NB, H, N, 2 * D, generator=gen).to(dtype).to(device) for _ in range(L)]


def reference(layers: list[torch.Tensor], layout: KVLayout, slots: list[int]) -> torch.Tensor:
    """Token by token, straight from the definition of each layout."""
    out = torch.empty(L, 2, len(slots), H, D, dtype=layers[0].dtype)
    for li, t in enumerate(layers):
        t = t.cpu()
        for i, s in enumerate(slots):
            b, o = divmod(s, N)
            if layout is KVLayout.CHANNELS:
                out[li, 0, i] = t[b, :, o, :D]
                out[li, 1, i] = t[b, :, o, D:]
            else:
                page = t[b].reshape(H, 2 * N, D)  # the CPU kernel's view of a page
                out[li, 0, i] = page[:, o]
                out[li, 1, i] = page[:, N + o]
    return out


@pytest.mark.parametrize("layout", list(KVLayout))
@pytest.mark.parametrize("span", [(0, 32), (16, 48), (3, 29), (5, 6), (0, 0)])
def test_gather_matches_layout_definition(layout: KVLayout, span: tuple[int, int]) -> None:
    ls = layers()
    paged = PagedKV.from_layers(ls, layout)
    blocks = [7, 2, 9, 4]
    slots = slot_mapping(blocks, N, *span)
    assert torch.equal(paged.gather(slots), reference(ls, layout, slots.tolist()))


@pytest.mark.parametrize("layout", list(KVLayout))
def test_scatter_writes_only_its_slots(layout: KVLayout) -> None:
    ls = layers()
    before = [t.clone() for t in ls]
    paged = PagedKV.from_layers(ls, layout)
    slots = slot_mapping([5, 1], N, 3, 27)
    chunk = torch.randn(L, 2, 24, H, D).to(torch.bfloat16)
    paged.scatter(slots, chunk)
    assert torch.equal(paged.gather(slots), chunk)
    # Every other slot is untouched.
    others = [s for s in range(NB * N) if s not in set(slots.tolist())]
    assert torch.equal(reference(ls, layout, others), reference(before, layout, others))


@settings(max_examples=40, deadline=None)
@given(
    layout=st.sampled_from(list(KVLayout)),
    blocks=st.lists(st.integers(0, NB - 1), min_size=1, max_size=NB, unique=True),
    data=st.data(),
)
def test_scatter_then_gather_roundtrips(layout: KVLayout, blocks: list[int], data: st.DataObject) -> None:
    start = data.draw(st.integers(0, len(blocks) * N))
    end = data.draw(st.integers(start, len(blocks) * N))
    paged = PagedKV.from_layers(layers(), layout)
    slots = slot_mapping(blocks, N, start, end)
    chunk = torch.randn(L, 2, end - start, H, D).to(torch.bfloat16)
    paged.scatter(slots, chunk)
    assert torch.equal(paged.gather(slots), chunk)


def test_two_layouts_place_kv_differently() -> None:
    """The same bytes read as CHANNELS and as ROWS give different K: the layout matters."""
    ls = layers()
    slots = slot_mapping([0], N, 0, N)
    assert not torch.equal(PagedKV.from_layers(ls, KVLayout.CHANNELS).gather(slots),
                           PagedKV.from_layers(ls, KVLayout.ROWS).gather(slots))


def test_from_kv_token_major_views() -> None:
    gen = torch.Generator().manual_seed(2)
    k = [torch.randn(NB, N, H, D, generator=gen) for _ in range(L)]
    v = [torch.randn(NB, N, H, D, generator=gen) for _ in range(L)]
    paged = PagedKV.from_kv(k, v, heads_first=False)
    out = paged.gather(slot_mapping([3], N, 0, N))
    assert torch.equal(out[1, 0], k[1][3])
    assert torch.equal(out[2, 1], v[2][3])


def test_bad_inputs_are_rejected_with_reasons() -> None:
    paged = PagedKV.from_layers(layers(), KVLayout.ROWS)
    with pytest.raises(InvalidArgument, match="int64"):
        paged.gather(torch.arange(4, dtype=torch.int32))
    with pytest.raises(InvalidArgument, match="expected"):
        paged.scatter(slot_mapping([0], N, 0, 4), torch.zeros(L, 2, 5, H, D, dtype=torch.bfloat16))
    with pytest.raises(InvalidArgument, match="dtype"):
        paged.scatter(slot_mapping([0], N, 0, 4), torch.zeros(L, 2, 4, H, D))
    with pytest.raises(InvalidArgument, match="blocks"):
        slot_mapping([0, 1], N, 0, 2 * N + 1)
    with pytest.raises(InvalidArgument, match="2\\*head_dim"):
        PagedKV.from_layers([torch.zeros(2, 2, 4, 5)], KVLayout.CHANNELS)
    with pytest.raises(InvalidArgument, match="dense"):
        PagedKV.from_layers([torch.zeros(2, 2, 8, 4).transpose(2, 3)], KVLayout.ROWS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout", list(KVLayout))
def test_cuda_gather_to_pinned_host_and_scatter(layout: KVLayout) -> None:
    ls = layers(device="cuda")
    paged = PagedKV.from_layers(ls, layout)
    slots = slot_mapping([7, 2], N, 0, 2 * N)
    host = torch.empty(L, 2, 2 * N, H, D, dtype=torch.bfloat16, pin_memory=True)
    event = paged.gather_to_host(slots, host)
    assert event is not None
    event.synchronize()
    assert torch.equal(host, reference(ls, layout, slots.tolist()))
    chunk = torch.randn(L, 2, 2 * N, H, D).to(torch.bfloat16).pin_memory()
    paged.scatter(slots, chunk)
    assert torch.equal(paged.gather(slots).cpu(), chunk)
