"""PageKeys (connectors/sglang/page_keys.py): which kvstore key each SGLang page key becomes."""

from __future__ import annotations

import hashlib

import pytest
import torch

from kvstore.connectors.sglang.page_keys import PageKeys, model_id
from kvstore.connectors.sglang.pages import PageGeometry
from kvstore.errors import InvalidArgument
from tests.connectors.sglang.conftest import storage_config

HEX = hashlib.sha256(b"page").hexdigest()
GEOM = PageGeometry(mla=False, host_layout="page_first", dtype=torch.float16, page_size=16, num_layers=4,
                    num_heads=2, head_dim=32)


def keys(**kw: object) -> PageKeys:
    return PageKeys(storage_config({}, **kw), "t", None)


def test_a_hex_page_key_is_the_digest_and_other_text_is_hashed() -> None:
    k = keys()
    assert k.raw(HEX).digest == "p" + HEX
    assert k.raw("not hex").digest == "p" + hashlib.sha256(b"not hex").hexdigest()
    assert str(k.namespace) == "t/HuggingFaceTB/SmolLM2-135M"


@pytest.mark.parametrize("bad", ["", None, 7])
def test_a_key_that_is_not_text_is_refused(bad: object) -> None:
    with pytest.raises(InvalidArgument, match="non-empty string"):
        keys().pages([bad])  # type: ignore[list-item]


def test_pages_use_the_raw_fingerprint_until_a_pool_is_registered() -> None:
    k = keys()
    assert k.pages([HEX]) == [k.raw(HEX)] and k.both(HEX) == [k.raw(HEX)]
    k.register(GEOM, None)
    (page,) = k.pages([HEX])
    assert page != k.raw(HEX) and page.digest == k.raw(HEX).digest
    assert k.both(HEX) == [page, k.raw(HEX)]
    tagged = keys()
    tagged.register(GEOM, "fmt1")
    assert tagged.pages([HEX]) != [page]  # the pool's storage format is part of the layout


def test_shards_and_stages_get_their_own_keys_but_mla_is_shared_across_tp() -> None:
    def page(**kw: object) -> object:
        k = keys(**kw)
        k.register(GEOM, None)
        return k.pages([HEX])[0]

    assert page(tp_rank=0, tp_size=2) != page(tp_rank=1, tp_size=2)
    assert page(pp=(0, 2)) != page(pp=(1, 2)) != page()
    assert keys(pp=(1, 2)).stage == "pp=1/2" and keys().stage == ""
    assert page(tp_rank=0, tp_size=2, mla=True) == page(tp_rank=1, tp_size=2, mla=True)


def test_model_names_become_valid_namespace_models() -> None:
    assert model_id("/models/Llama 3 (8B)//instruct/") == "models/Llama-3-8B-/instruct"
    assert model_id(None) == model_id("") == model_id("///") == "unnamed"
    assert len(model_id("m" * 1000)) == 256
