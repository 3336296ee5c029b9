"""Security: tenant isolation (data and admin services), no code-executing
deserialisation anywhere in the package.

Complements tests/server/test_auth_tls.py (tokens, per-RPC isolation, TLS and
mutual TLS with generated certificates), tests/admin/test_rpc.py (admin role
on every admin RPC) and tests/tiers/test_disk.py (file names from hashes).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from kvstore.v1 import admin_pb2 as apb
from kvstore.v1 import admin_pb2_grpc as apb_grpc
from kvstore.v1 import kvstore_pb2 as pb
from tests.server import bearer, blob, exists, key, raw_get, raw_put, stub
from tests.support.daemon import DaemonProcess, cpu_and_disk

ROOT = Path(__file__).resolve().parents[2]
A_RW, A_READ, B_RW, ADMIN = "tenant-a-rw-token-0001", "tenant-a-read-token-01", "tenant-b-rw-token-0001", "admin-token-000000001"
B_KEYS = [key(i, tenant="b") for i in range(3)]


@pytest.fixture(scope="module")
def secd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    work = tmp_path_factory.mktemp("sec")
    tokens = work / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": [
        {"token": A_RW, "tenant": "a", "role": "readwrite"},
        {"token": A_READ, "tenant": "a", "role": "read"},
        {"token": B_RW, "tenant": "b", "role": "readwrite"},
        {"token": ADMIN, "role": "admin"},
    ]}))
    with DaemonProcess(work / "d", cpu_and_disk(work / "disk", cpu="32MiB", disk="64MiB", token_file=str(tokens))) as d:
        with grpc.insecure_channel(d.address) as ch:
            raw_put(stub(ch), [(B_KEYS[0], blob(1, 5000))], metadata=bearer(B_RW))
        yield d


def _details(fn: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()  # type: ignore[operator]
    return info.value.code(), info.value.details() or ""


@pytest.mark.parametrize("token", [A_RW, A_READ])
def test_admin_service_reveals_nothing_to_a_tenant_token(secd: DaemonProcess, token: str) -> None:
    """Every admin RPC, naming B's existing or missing keys: the same refusal, nothing changed."""
    with grpc.insecure_channel(secd.address) as ch:
        admin = apb_grpc.AdminStub(ch)
        md = bearer(token)
        answers = set()
        for k in (B_KEYS[0], B_KEYS[1]):  # exists / does not exist
            sel = apb.Selector(keys=[k])
            for call in (
                lambda: admin.Stats(apb.StatsRequest(), metadata=md, timeout=10),
                lambda: admin.ListChunks(apb.ListChunksRequest(selector=sel), metadata=md, timeout=10),
                lambda: admin.ListChunks(apb.ListChunksRequest(selector=apb.Selector(namespace="b/m")), metadata=md),
                lambda: admin.Evict(apb.EvictRequest(selector=sel, drop=True), metadata=md, timeout=10),
                lambda: admin.Pin(apb.PinRequest(selector=sel, ttl_s=60), metadata=md, timeout=10),
                lambda: admin.Move(apb.MoveRequest(selector=sel, to_tier="disk"), metadata=md, timeout=10),
                lambda: admin.Clear(apb.ClearRequest(namespace="b/m", confirm=True), metadata=md, timeout=10),
            ):
                answers.add(_details(call))
        assert answers == {(grpc.StatusCode.PERMISSION_DENIED, "this operation needs a token with the admin role")}
        # B's chunk is untouched and still in both tiers.
        listed = admin.ListChunks(apb.ListChunksRequest(selector=apb.Selector(keys=[B_KEYS[0]])), metadata=bearer(ADMIN))
        assert list(listed.chunks[0].tiers) == ["cpu", "disk"]


def test_mixed_batches_are_refused_whole(secd: DaemonProcess) -> None:
    """A batch with one foreign key reveals nothing about the others (no partial answers)."""
    with grpc.insecure_channel(secd.address) as ch:
        s = stub(ch)
        raw_put(s, [(key(0, tenant="a"), b"mine")], metadata=bearer(A_RW))
        md = bearer(A_RW)
        for present, missing in ((B_KEYS[0], B_KEYS[2]),):
            for call in (
                lambda k: exists(s, [key(0, tenant="a"), k], metadata=md),
                lambda k: s.Lookup(pb.LookupRequest(keys=[key(0, tenant="a"), k]), metadata=md, timeout=10),
                lambda k: raw_get(s, [key(0, tenant="a"), k], metadata=md),
                lambda k: s.Delete(pb.DeleteRequest(keys=[key(0, tenant="a"), k]), metadata=md, timeout=10),
            ):
                assert _details(lambda: call(present)) == _details(lambda: call(missing))
                assert _details(lambda: call(present))[0] == grpc.StatusCode.PERMISSION_DENIED
        assert raw_get(s, [key(0, tenant="a")], metadata=md) == [b"mine"]  # the refused Delete removed nothing
        assert raw_get(s, [B_KEYS[0]], metadata=bearer(B_RW)) == [blob(1, 5000)]


# -- no code-executing deserialisation ----------------------------------------------------------------------
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "jsonpickle", "joblib"}


def _violations(path: Path) -> list[str]:
    out = []
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            out += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
            out.append(f"{where} from {node.module} import")
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            kw = {k.arg: k.value for k in node.keywords}
            if name in ("eval", "exec") and not owner:
                out.append(f"{where} {name}()")
            elif owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
                out.append(f"{where} yaml.{name} (use yaml.safe_load)")
            elif owner == "torch" and name == "load":
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    out.append(f"{where} torch.load without weights_only=True")
            elif name == "load" and owner in ("np", "numpy"):
                ap = kw.get("allow_pickle")
                if isinstance(ap, ast.Constant) and ap.value is True:
                    out.append(f"{where} numpy.load(allow_pickle=True)")
    return out


def test_no_pickle_or_code_executing_deserialisation_in_the_package() -> None:
    files = [p for d in ("kvstore", "codecs", "connectors") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 50
    found = [v for p in files for v in _violations(p)]
    assert not found, "\n".join(found)


def test_the_scanner_catches_what_it_forbids(tmp_path: Path) -> None:
    bad = tmp_path / "probe.py"
    bad.write_text("import pickle\nimport yaml, torch\nyaml.load(x)\ntorch.load(f)\neval('1')\nfrom marshal import loads\n")
    assert len(_violations(bad)) == 5
    good = tmp_path / "fine.py"
    good.write_text("import yaml, torch\nyaml.safe_load(x)\ntorch.load(f, weights_only=True)\n")
    assert _violations(good) == []
