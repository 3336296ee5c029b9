"""Authentication, tenant isolation, TLS and mutual TLS against a real daemon.

Tokens (``server.token_file``) map to a tenant and a role (read, readwrite,
admin).  Without a valid token nothing is touched; a tenant's token never
reads, writes, deletes, looks up or learns the existence of another tenant's
keys (the refusal reads the same whether the key exists or not).  TLS
certificates are generated here with the ``cryptography`` package.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

import kvstore
from kvstore.client import ClientTLS
from kvstore.client.shm import ClientSegment
from kvstore.errors import PermissionDenied, RemoteUnavailable, Unauthenticated
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from tests.server import SERVING, MiB, bearer, blob, channel, exists, health, key, meta_for, raw_get, raw_put, rpc_error, stub
from tests.support.daemon import DaemonProcess, cpu_only

x509 = pytest.importorskip("cryptography.x509")
from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: E402

from tests.support.pki import cert, new_key, write_cert, write_key  # noqa: E402

A_RW = "tenant-a-readwrite-token"
A_READ = "tenant-a-read-only-token"
B_RW = "tenant-b-readwrite-token"
ADMIN = "the-admin-token-for-all"
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED

A_KEY = key(1, tenant="a")
B_KEY = key(1, tenant="b")
B_MISSING = key(2, tenant="b")
A_DATA = blob(1, 70_000)
B_DATA = blob(2, 5 * MiB)


# -- tokens --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def authd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    work = tmp_path_factory.mktemp("auth")
    tokens = work / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump(
            {
                "tokens": [
                    {"token": A_RW, "tenant": "a", "role": "readwrite"},
                    {"token": A_READ, "tenant": "a", "role": "read"},
                    {"token": B_RW, "tenant": "b", "role": "readwrite"},
                    {"token": ADMIN, "role": "admin"},
                ]
            }
        )
    )
    with DaemonProcess(work / "d", cpu_only("64MiB", token_file=str(tokens))) as d:
        with channel(d.address) as ch:
            raw_put(stub(ch), [(A_KEY, A_DATA)], metadata=bearer(A_RW))
            raw_put(stub(ch), [(B_KEY, B_DATA)], metadata=bearer(B_RW))
        yield d


@pytest.fixture
def s(authd: DaemonProcess) -> Iterator[pb_grpc.KVStoreStub]:
    """A raw stub; afterwards both tenants' data must be exactly as stored."""
    with channel(authd.address) as ch:
        yield stub(ch)
        admin = bearer(ADMIN)
        assert raw_get(stub(ch), [A_KEY, B_KEY, B_MISSING], metadata=admin) == [A_DATA, B_DATA, None]
        assert exists(stub(ch), [key(i, tenant=t) for t in "ab" for i in range(3, 8)], metadata=admin) == [False] * 10


def _every_rpc(s: pb_grpc.KVStoreStub, k: str, md: list[tuple[str, str]] | None) -> dict[str, Callable[[], object]]:
    """One call of each RPC touching ``k`` (writes would store / delete it)."""
    sl = pb.ShmSlice(segment_id=1, offset=4096, length=3)
    return {
        "Put": lambda: raw_put(s, [(k, b"new")], metadata=md),
        "Get": lambda: raw_get(s, [k], metadata=md),
        "Exists": lambda: exists(s, [k], metadata=md),
        "Lookup": lambda: s.Lookup(pb.LookupRequest(keys=[k]), metadata=md, timeout=10),
        "Delete": lambda: s.Delete(pb.DeleteRequest(keys=[k]), metadata=md, timeout=10),
        "ShmPut": lambda: s.ShmPut(
            pb.ShmPutRequest(items=[pb.ShmPutItem(key=k, meta=meta_for(b"new"), slice=sl)]), metadata=md, timeout=10
        ),
        "ShmGet": lambda: s.ShmGet(pb.ShmGetRequest(items=[pb.ShmGetItem(key=k, slice=sl)]), metadata=md, timeout=10),
    }


@pytest.mark.parametrize("k", [B_KEY, key(3, tenant="b")], ids=["existing", "missing"])
def test_no_token_is_unauthenticated_and_touches_nothing(s: pb_grpc.KVStoreStub, k: str) -> None:
    for name, call in _every_rpc(s, k, None).items():
        err = rpc_error(call, UNAUTH, "authorization")
        assert "Bearer" in (err.details() or ""), name
    rpc_error(
        lambda: s.RegisterSegment(pb.RegisterSegmentRequest(name="kvstore-abcdefgh", size=8192, nonce=bytes(16))),
        UNAUTH,
    )
    rpc_error(lambda: s.ReleaseSegment(pb.ReleaseSegmentRequest(segment_id=1)), UNAUTH)


@pytest.mark.parametrize(
    ("md", "what"),
    [
        (bearer("not-a-token-anyone-has"), "unknown token"),
        (bearer(A_RW + "x"), "unknown token"),
        ([("authorization", f"Basic {A_RW}")], "must be 'Bearer <token>'"),
        ([("authorization", "Bearer")], "must be 'Bearer <token>'"),
    ],
    ids=["unknown", "near-miss", "scheme", "empty"],
)
def test_wrong_token_is_unauthenticated(s: pb_grpc.KVStoreStub, md: list[tuple[str, str]], what: str) -> None:
    for call in _every_rpc(s, key(4, tenant="a"), md).values():
        rpc_error(call, UNAUTH, what)


def test_tenant_cannot_touch_another_tenants_keys(s: pb_grpc.KVStoreStub) -> None:
    """A's token on B's keys: refused by every RPC, with one message whether or not the key exists."""
    for name in ("Put", "Get", "Exists", "Lookup", "Delete", "ShmPut", "ShmGet"):
        present = rpc_error(_every_rpc(s, B_KEY, bearer(A_RW))[name], DENIED, "tenant 'a'", "tenant 'b'")
        absent = rpc_error(_every_rpc(s, B_MISSING, bearer(A_RW))[name], DENIED)
        assert present.details() == absent.details(), name
    # A batch mixing one's own key with another tenant's is refused whole.
    rpc_error(lambda: exists(s, [A_KEY, B_KEY], metadata=bearer(A_RW)), DENIED)
    rpc_error(lambda: raw_get(s, [A_KEY, B_KEY], metadata=bearer(A_RW)), DENIED)
    # A Put stream commits chunk by chunk: the own chunk before the refused header
    # is stored, the other tenant's is not (the fixture checks B's data).
    rpc_error(lambda: raw_put(s, [(key(3, tenant="a"), b"x"), (B_KEY, b"x")], metadata=bearer(A_RW)), DENIED)
    assert list(s.Delete(pb.DeleteRequest(keys=[key(3, tenant="a")]), metadata=bearer(A_RW)).found) == [True]


def test_tenant_reads_and_writes_its_own_keys(s: pb_grpc.KVStoreStub) -> None:
    md = bearer(A_RW)
    assert raw_get(s, [A_KEY], metadata=md) == [A_DATA]
    k = key(5, tenant="a")
    raw_put(s, [(k, b"mine")], metadata=md)
    assert exists(s, [A_KEY, k], metadata=md) == [True, True]
    assert s.Lookup(pb.LookupRequest(keys=[A_KEY, k]), metadata=md, timeout=10).count == 2
    assert list(s.Delete(pb.DeleteRequest(keys=[k]), metadata=md, timeout=10).found) == [True]


def test_read_role_cannot_write(s: pb_grpc.KVStoreStub) -> None:
    md = bearer(A_READ)
    assert raw_get(s, [A_KEY], metadata=md) == [A_DATA]
    assert exists(s, [A_KEY], metadata=md) == [True]
    assert s.Lookup(pb.LookupRequest(keys=[A_KEY]), metadata=md, timeout=10).count == 1
    for name in ("Put", "Delete", "ShmPut"):
        rpc_error(_every_rpc(s, A_KEY, md)[name], DENIED, "role 'read' may not write")
    rpc_error(_every_rpc(s, key(6, tenant="a"), md)["Put"], DENIED, "may not write")
    rpc_error(_every_rpc(s, B_KEY, md)["Get"], DENIED, "tenant 'a'")


def test_admin_accesses_every_tenant(s: pb_grpc.KVStoreStub) -> None:
    md = bearer(ADMIN)
    assert raw_get(s, [A_KEY, B_KEY], metadata=md) == [A_DATA, B_DATA]
    ks = [key(7, tenant="a"), key(7, tenant="b")]
    raw_put(s, [(ks[0], b"by admin"), (ks[1], b"by admin")], metadata=md)
    assert raw_get(s, ks, metadata=md) == [b"by admin"] * 2
    assert raw_get(s, [ks[1]], metadata=bearer(B_RW)) == [b"by admin"]
    assert list(s.Delete(pb.DeleteRequest(keys=ks), metadata=md, timeout=10).found) == [True, True]


def test_clients_raise_typed_errors(authd: DaemonProcess) -> None:
    with kvstore.Client(authd.address, shm=False) as anon:
        with pytest.raises(Unauthenticated):
            anon.get(A_KEY)
    with kvstore.Client(authd.address, token="wrong-token-wrong-token", shm=False) as wrong:
        with pytest.raises(Unauthenticated, match="unknown token"):
            wrong.exists([A_KEY])
    with kvstore.Client(authd.address, token=A_READ, shm=False) as reader:
        assert reader.get_bytes(A_KEY) == A_DATA
        with pytest.raises(PermissionDenied, match="may not write"):
            reader.put(key(3, tenant="a"), b"x")
        with pytest.raises(PermissionDenied, match="tenant 'b'"):
            reader.get(B_KEY)


def test_shared_memory_segments_belong_to_their_tenant(authd: DaemonProcess, s: pb_grpc.KVStoreStub) -> None:
    # A client of tenant a over shared memory works ...
    with kvstore.Client(authd.address, token=A_RW, shm=True) as c:
        assert c.get_bytes(A_KEY) == A_DATA
        c.put(key(3, tenant="a"), blob(3, 2 * MiB))
        assert c.uses_shm
        assert c.get_bytes(key(3, tenant="a")) == blob(3, 2 * MiB)
        assert c.delete([key(3, tenant="a")]) == [True]
    # ... and tenant b cannot use (or release) a segment tenant a registered.
    seg = ClientSegment(64 << 10)
    try:
        req = pb.RegisterSegmentRequest(name=seg.name, size=seg.size, nonce=seg.nonce)
        seg_id = s.RegisterSegment(req, metadata=bearer(A_RW), timeout=10).segment_id
        sl = pb.ShmSlice(segment_id=seg_id, offset=4096, length=100)
        get = pb.ShmGetRequest(items=[pb.ShmGetItem(key=B_KEY, slice=sl)])
        rpc_error(lambda: s.ShmGet(get, metadata=bearer(B_RW), timeout=10), DENIED, "another tenant")
        put = pb.ShmPutRequest(items=[pb.ShmPutItem(key=key(4, tenant="b"), meta=meta_for(bytes(100)), slice=sl)])
        rpc_error(lambda: s.ShmPut(put, metadata=bearer(B_RW), timeout=10), DENIED, "another tenant")
        release = pb.ReleaseSegmentRequest(segment_id=seg_id)
        rpc_error(lambda: s.ReleaseSegment(release, metadata=bearer(B_RW), timeout=10), DENIED, "another tenant")
        s.ReleaseSegment(release, metadata=bearer(A_RW), timeout=10)
    finally:
        seg.close()


@pytest.mark.parametrize(
    ("tokens", "what"),
    [
        ([{"token": "short", "tenant": "a"}], "tokens[0].token must be a string of at least 16 characters"),
        ([{"token": A_RW, "tenant": "a", "role": "root"}], "tokens[0].role must be one of"),
        ([{"token": A_RW, "role": "read"}], "tokens[0].tenant"),
        ([{"token": A_RW, "tenant": "a"}, {"token": A_RW, "tenant": "b"}], "tokens must be unique"),
    ],
    ids=["short", "role", "tenant", "duplicate"],
)
def test_bad_token_file_stops_the_daemon_from_starting(tmp_path: Path, tokens: list[dict[str, str]], what: str) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump({"tokens": tokens}))
    d = DaemonProcess(tmp_path / "d", cpu_only("8MiB", token_file=str(path)))
    with pytest.raises(RuntimeError, match="exited with 2") as info:
        d.start()
    assert what in str(info.value)
    assert "server.token_file" in str(info.value)


# -- TLS --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    named_cert: Path  # for "kvstore.test" only
    named_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    server, client = [ExtendedKeyUsageOID.SERVER_AUTH], [ExtendedKeyUsageOID.CLIENT_AUTH]
    ca_key, rogue_key = new_key(), new_key()
    ca = cert("kvstore test CA", ca_key)
    rogue = cert("rogue CA", rogue_key)
    srv_key, named_key, cli_key, rcli_key = new_key(), new_key(), new_key(), new_key()
    local = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    return Pki(
        ca=write_cert(d / "ca.pem", ca),
        server_cert=write_cert(d / "server.pem", cert("localhost", srv_key, (ca, ca_key), usages=server, sans=local)),
        server_key=write_key(d / "server.key", srv_key),
        named_cert=write_cert(
            d / "named.pem",
            cert("kvstore.test", named_key, (ca, ca_key), usages=server, sans=[x509.DNSName("kvstore.test")]),
        ),
        named_key=write_key(d / "named.key", named_key),
        client_cert=write_cert(d / "client.pem", cert("client", cli_key, (ca, ca_key), usages=client)),
        client_key=write_key(d / "client.key", cli_key),
        rogue_ca=write_cert(d / "rogue-ca.pem", rogue),
        rogue_cert=write_cert(d / "rogue.pem", cert("client", rcli_key, (rogue, rogue_key), usages=client)),
        rogue_key=write_key(d / "rogue.key", rcli_key),
    )


def _tls_daemon(tmp: Path, pki: Pki, *, mutual: bool = False, named: bool = False) -> DaemonProcess:
    tls = {
        "cert": str(pki.named_cert if named else pki.server_cert),
        "key": str(pki.named_key if named else pki.server_key),
    }
    if mutual:
        tls["client_ca"] = str(pki.ca)
    return DaemonProcess(tmp, cpu_only("16MiB", tls=tls))


def _works(address: str, **kw: object) -> None:
    with kvstore.Client(address, shm=False, **kw) as c:  # type: ignore[arg-type]
        c.put(key(1, model="tls"), blob(9, 5 * MiB))
        assert c.get_bytes(key(1, model="tls")) == blob(9, 5 * MiB)


def _fails(address: str, **kw: object) -> None:
    with kvstore.Client(address, shm=False, retries=0, timeout_s=5, **kw) as c:  # type: ignore[arg-type]
        with pytest.raises(RemoteUnavailable):
            c.exists([key(1, model="tls")])


def test_tls(tmp_path: Path, pki: Pki) -> None:
    with _tls_daemon(tmp_path / "d", pki) as d:
        _works(d.address, tls=ClientTLS(ca=pki.ca))
        _fails(d.address)  # plaintext client to a TLS daemon
        _fails(d.address, tls=ClientTLS(ca=pki.rogue_ca))  # a CA that did not sign the daemon's certificate
        # The health service is behind TLS too.
        creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        with grpc.secure_channel(d.address, creds) as ch:
            assert health(d.address, ch=ch) == SERVING


def test_tls_server_name_override(tmp_path: Path, pki: Pki) -> None:
    with _tls_daemon(tmp_path / "d", pki, named=True) as d:
        _works(d.address, tls=ClientTLS(ca=pki.ca, server_name="kvstore.test"))
        _fails(d.address, tls=ClientTLS(ca=pki.ca))  # 127.0.0.1 is not in the certificate


def test_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    with _tls_daemon(tmp_path / "d", pki, mutual=True) as d:
        _works(d.address, tls=ClientTLS(ca=pki.ca, cert=pki.client_cert, key=pki.client_key))
        _fails(d.address, tls=ClientTLS(ca=pki.ca))  # no client certificate
        _fails(d.address, tls=ClientTLS(ca=pki.ca, cert=pki.rogue_cert, key=pki.rogue_key))  # from another CA
        _fails(d.address)


def test_tls_client_to_plaintext_daemon_fails(daemon: DaemonProcess, pki: Pki) -> None:
    _fails(daemon.address, tls=ClientTLS(ca=pki.ca))
