"""Page geometry: every host layout's page is read in the canonical layout."""

from __future__ import annotations

import pytest
import torch

from kvstore.connectors.sglang.pages import geometry_of
from kvstore.errors import InvalidArgument
from tests.connectors.sglang.host_pool import HostPoolTwin, real_pool_class

MHA_LAYOUTS = ["layer_first", "page_first", "page_first_direct", "page_head"]
MLA_LAYOUTS = ["layer_first", "page_first", "page_first_direct"]
CASES = [(False, x) for x in MHA_LAYOUTS] + [(True, x) for x in MLA_LAYOUTS]


def pool(mla: bool, layout: str) -> HostPoolTwin:
    return HostPoolTwin(mla=mla, layout=layout, layers=3, page_size=4, pages=5, heads=2, head_dim=8)


@pytest.mark.parametrize(("mla", "layout"), CASES)
def test_canonical_view_of_every_layout(mla: bool, layout: str) -> None:
    p = pool(mla, layout)
    g = geometry_of(p, mla=mla)
    assert g.chunk_layout == ("LTHD" if mla else "LKTHD")
    ref = p.fill_page(8, seed=1)  # slot 8 = third page
    view = g.canonical_view(p.get_data_page(8, flat=False))
    assert view.shape == g.shape
    assert torch.equal(view, ref)
    # the flat page SGLang's generic path moves converts the same way
    assert torch.equal(g.flat_to_canonical(p.get_data_page(8, flat=True)), ref)
    # and writing through the view lands in the pool (it is a view, no copy)
    new = torch.randn(g.shape).to(g.dtype)
    g.canonical_view(p.get_data_page(8, flat=False)).copy_(new)
    assert torch.equal(p.read_page(8), new)


def test_mha_geometry_and_size() -> None:
    g = geometry_of(pool(False, "page_first"), mla=False)
    assert g.shape == (3, 2, 4, 2, 8)
    assert g.nbytes == 3 * 2 * 4 * 2 * 8 * 2


def test_unsupported_layout_is_refused_with_advice() -> None:
    p = pool(False, "layer_first")
    p.layout = "page_unified"
    with pytest.raises(InvalidArgument, match="page_unified.*--hicache-mem-layout"):
        geometry_of(p, mla=False)
    p = pool(True, "layer_first")
    p.layout = "page_head"  # exists for MHA only
    with pytest.raises(InvalidArgument, match="page_head"):
        geometry_of(p, mla=True)


def test_asymmetric_kv_is_refused() -> None:
    p = pool(False, "layer_first")
    p.v_head_dim = 4
    with pytest.raises(InvalidArgument, match="K and V widths differ"):
        geometry_of(p, mla=False)


def test_not_a_host_pool() -> None:
    with pytest.raises(InvalidArgument, match="has no attribute 'layout'"):
        geometry_of(object(), mla=False)


def test_wrong_page_shape_is_refused() -> None:
    p = pool(False, "layer_first")
    g = geometry_of(p, mla=False)
    with pytest.raises(InvalidArgument, match="host page has shape"):
        g.canonical_view(torch.zeros(2, 3, 5, 2, 8))


@pytest.mark.parametrize(("mla", "layout"), CASES)
def test_twin_matches_sglang_page_accessors(mla: bool, layout: str) -> None:
    """Where SGLang's pool module imports (a full install), its own
    get_data_page, run on the twin's buffer, must slice the same page."""
    cls = real_pool_class(mla)
    if cls is None:
        pytest.skip("SGLang's host pool module needs the full (CUDA) SGLang install")
    p = pool(mla, layout)
    p.dcp_size = 1  # type: ignore[attr-defined]  # read by MLA's page index helper
    p.fill_page(4, seed=2)
    assert torch.equal(cls.get_data_page(p, 4, flat=False), p.get_data_page(4, flat=False))
