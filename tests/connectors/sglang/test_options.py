"""HiCacheOptions: SGLang's extra config validated at the edge."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvstore.connectors.sglang.options import HiCacheOptions
from kvstore.errors import ConfigError

SGLANG_PART = {"backend_name": "kvstore", "module_path": "kvstore.connectors.sglang",
               "class_name": "KVStoreHiCacheStorage", "interface_v1": 1}


def test_defaults_and_sglang_keys_accepted() -> None:
    o = HiCacheOptions.from_extra_config(SGLANG_PART, environ={})
    assert o.mode == "daemon" and o.address == "127.0.0.1:51061" and o.shm == "auto"
    assert o.model is None and o.token is None and o.timeout_s == 5.0


def test_environment_supplies_address_and_token() -> None:
    o = HiCacheOptions.from_extra_config({}, environ={"KVSTORE_ADDRESS": "10.0.0.1:7000", "KVSTORE_TOKEN": "t"})
    assert (o.address, o.token) == ("10.0.0.1:7000", "t")
    # the extra config wins over the environment
    o = HiCacheOptions.from_extra_config({"address": "h:1"}, environ={"KVSTORE_ADDRESS": "10.0.0.1:7000"})
    assert o.address == "h:1"


def test_every_option_parses() -> None:
    o = HiCacheOptions.from_extra_config(
        {**SGLANG_PART, "mode": "local", "address": "h:2", "tenant": "t1", "model": "m/x", "token": "tok",
         "timeout_s": 2, "retries": 0, "shm": False, "shm_bytes": "64MiB", "batch_bytes": "8MiB",
         "breaker_failures": 2, "breaker_reset_s": 0.5, "durable": True, "skip_existing": False,
         "local_config": "~/k.yaml", "local_capacity": "1GiB"},
        environ={},
    )
    assert o.mode == "local" and o.shm is False and o.shm_bytes == 64 << 20 and o.batch_bytes == 8 << 20
    assert o.local_config == Path("~/k.yaml").expanduser() and o.local_capacity == 1 << 30
    assert o.durable and not o.skip_existing and o.breaker_failures == 2 and o.timeout_s == 2.0


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"adress": "h:1"}, "unknown key(s) ['adress']"),
        ({"mode": "remote"}, "extra_config.mode"),
        ({"address": "nohost"}, "extra_config.address"),
        ({"timeout_s": 0}, "extra_config.timeout_s"),
        ({"timeout_s": "5"}, "extra_config.timeout_s"),
        ({"retries": 1.5}, "extra_config.retries"),
        ({"shm": "yes"}, "extra_config.shm"),
        ({"shm_bytes": "1MiB"}, "extra_config.shm_bytes"),
        ({"batch_bytes": "lots"}, "extra_config.batch_bytes"),
        ({"tenant": ""}, "extra_config.tenant"),
        ({"breaker_reset_s": 100}, "extra_config.breaker_reset_s"),
    ],
)
def test_bad_values_name_the_field(extra: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)):
        HiCacheOptions.from_extra_config(extra, environ={})
