"""The token file (kvstore/server/auth.py): an admin token names no tenant.

An admin acts on every tenant and on the admin service.  A token file entry
``{role: admin, tenant: acme}`` reads as "admin of acme" but would act on
every tenant, so it is refused when the file is loaded, and the daemon does
not start with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from kvstore.errors import ConfigError, PermissionDenied
from kvstore.keys import ChunkKey
from kvstore.server.auth import Principal, TokenTable
from kvstore.v1 import admin_pb2 as apb
from kvstore.v1 import admin_pb2_grpc as apb_grpc
from tests.server import bearer, blob, channel, key, raw_get, raw_put, stub
from tests.support.daemon import DaemonProcess, cpu_only

ADMIN = "admin-token-0123456789"
ACME = "acme-token-0123456789"


def _file(tmp_path: Path, tokens: list[dict[str, Any]]) -> Path:
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump({"tokens": tokens}))
    return path


def test_admin_token_with_a_tenant_is_refused_at_load(tmp_path: Path) -> None:
    path = _file(tmp_path, [{"token": ACME, "tenant": "acme"}, {"token": ADMIN, "tenant": "acme", "role": "admin"}])
    with pytest.raises(ConfigError) as info:
        TokenTable.load(path)
    text = str(info.value)
    # Names the entry, says why, and what to write instead.
    assert "server.token_file tokens[1].tenant" in text
    assert "every tenant" in text and "'acme'" in text
    assert "remove 'tenant'" in text and "role readwrite" in text


def test_admin_token_without_a_tenant_acts_on_every_tenant(tmp_path: Path) -> None:
    table = TokenTable.load(_file(tmp_path, [{"token": ACME, "tenant": "acme"}, {"token": ADMIN, "role": "admin"}]))
    admin = table.authenticate(f"Bearer {ADMIN}")
    assert admin == Principal(tenant=None, role="admin")
    for tenant in ("acme", "other"):
        admin.check_key(ChunkKey.parse(key(1, tenant=tenant)), write=True)
    admin.require_admin()
    acme = table.authenticate(f"Bearer {ACME}")
    acme.check_key(ChunkKey.parse(key(1, tenant="acme")), write=True)
    with pytest.raises(PermissionDenied, match="tenant 'acme' and may not access tenant 'other'"):
        acme.check_key(ChunkKey.parse(key(1, tenant="other")))
    with pytest.raises(PermissionDenied, match="admin role"):
        acme.require_admin()


def test_a_principal_cannot_be_an_admin_of_one_tenant() -> None:
    with pytest.raises(ValueError, match="admin acts on every tenant"):
        Principal(tenant="acme", role="admin")
    with pytest.raises(ValueError, match="needs a tenant"):
        Principal(tenant=None, role="readwrite")


def test_badly_spelt_tenant_is_a_config_error_naming_the_entry(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tokens\[0\]\.tenant: .*'bad tenant!'"):
        TokenTable.load(_file(tmp_path, [{"token": ACME, "tenant": "bad tenant!"}]))


def test_daemon_does_not_start_with_a_tenant_scoped_admin(tmp_path: Path) -> None:
    path = _file(tmp_path, [{"token": ADMIN, "tenant": "acme", "role": "admin"}])
    d = DaemonProcess(tmp_path / "refused", cpu_only("8MiB", token_file=str(path)))
    try:
        with pytest.raises(RuntimeError, match="exited with 2") as info:
            d.start()
    finally:
        d.stop()  # had it started, it must not outlive the test
    assert "tokens[0].tenant: an admin token acts on every tenant" in str(info.value)
    # The same file without the tenant: the daemon starts, and the admin reaches both tenants.
    path = _file(tmp_path, [{"token": ACME, "tenant": "acme"}, {"token": ADMIN, "role": "admin"}])
    with DaemonProcess(tmp_path / "started", cpu_only("8MiB", token_file=str(path))) as d2:
        with channel(d2.address) as ch:
            for tenant in ("acme", "other"):
                raw_put(stub(ch), [(key(1, tenant=tenant), blob(1, 1000))], metadata=bearer(ADMIN))
                assert raw_get(stub(ch), [key(1, tenant=tenant)], metadata=bearer(ADMIN)) == [blob(1, 1000)]
            apb_grpc.AdminStub(ch).Stats(apb.StatsRequest(), metadata=bearer(ADMIN), timeout=10)
            with pytest.raises(grpc.RpcError) as denied:
                apb_grpc.AdminStub(ch).Stats(apb.StatsRequest(), metadata=bearer(ACME), timeout=10)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
