"""AdminClient: a blocking client of the daemon's ``kvstore.v1.Admin`` service.

Replies are the protobuf messages of ``proto/kvstore/v1/admin.proto`` (their
fields are documented there); :func:`to_plain` turns one into plain data for
JSON.  Errors reach the caller as typed :class:`~kvstore.errors.KVStoreError`
(``PermissionDenied`` without the admin role, ``RemoteUnavailable`` when the
daemon cannot be reached, ...).  Importing this module does not import torch,
so ``kvstore admin`` starts fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from kvstore.errors import InvalidArgument, error_for_status
from kvstore.v1 import admin_pb2 as apb
from kvstore.v1 import admin_pb2_grpc as apb_grpc

T = TypeVar("T")
DEFAULT_ADDRESS = "127.0.0.1:51061"


def selector(
    keys: Sequence[str] = (), *, prefix: str = "", namespace: str = "", tier: str = ""
) -> apb.Selector:
    """A chunk selector; fields combine with AND, an empty one selects everything."""
    return apb.Selector(keys=list(keys), key_prefix=prefix, namespace=namespace, tier=tier)


class AdminClient:
    """See the module docstring.  Use ``with AdminClient(...) as admin:``.

    ``tls_ca`` (the CA of the daemon's certificate) turns TLS on; ``tls_cert``
    and ``tls_key`` add a client certificate for mutual TLS; ``server_name``
    overrides the name expected in the daemon's certificate.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        server_name: str | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.address = address
        self._timeout = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if tls_ca is None:
            if tls_cert or tls_key:
                raise InvalidArgument("a client certificate needs the CA of the daemon's certificate (tls_ca, --tls-ca)")
            self._channel = grpc.insecure_channel(address)
        else:
            creds = grpc.ssl_channel_credentials(
                root_certificates=tls_ca.read_bytes(),
                private_key=tls_key.read_bytes() if tls_key else None,
                certificate_chain=tls_cert.read_bytes() if tls_cert else None,
            )
            opts = [("grpc.ssl_target_name_override", server_name)] if server_name else []
            self._channel = grpc.secure_channel(address, creds, options=opts)
        self._stub = apb_grpc.AdminStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., Any], request: Message, reply: type[T]) -> T:
        try:
            out = method(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as exc:
            call: Any = exc  # a grpc.Call as well
            code = call.code()
            raise error_for_status(code.name, call.details() or code.name) from None
        assert isinstance(out, reply)
        return out

    # -- the operations (see admin.proto) ---------------------------------------------
    def stats(self) -> apb.StatsReply:
        return self._call(self._stub.Stats, apb.StatsRequest(), apb.StatsReply)

    def list_chunks(
        self, sel: apb.Selector | None = None, *, page_size: int = 0, page_token: str = ""
    ) -> apb.ListChunksReply:
        req = apb.ListChunksRequest(selector=sel, page_size=page_size, page_token=page_token)
        return self._call(self._stub.ListChunks, req, apb.ListChunksReply)

    def iter_chunks(self, sel: apb.Selector | None = None, *, page_size: int = 1000) -> Iterator[apb.ChunkInfo]:
        """Every selected chunk, page after page."""
        token = ""
        while True:
            page = self.list_chunks(sel, page_size=page_size, page_token=token)
            yield from page.chunks
            token = page.next_page_token
            if not token:
                return

    def evict(
        self, sel: apb.Selector, *, watermark_bytes: int | None = None, drop: bool = False, force: bool = False
    ) -> apb.EvictReply:
        req = apb.EvictRequest(selector=sel, drop=drop, force=force)
        if watermark_bytes is not None:
            req.use_watermark = True
            req.watermark_bytes = watermark_bytes
        return self._call(self._stub.Evict, req, apb.EvictReply)

    def pin(self, sel: apb.Selector, ttl_s: float) -> apb.PinReply:
        return self._call(self._stub.Pin, apb.PinRequest(selector=sel, ttl_s=ttl_s), apb.PinReply)

    def unpin(self, sel: apb.Selector | None = None) -> apb.UnpinReply:
        return self._call(self._stub.Unpin, apb.UnpinRequest(selector=sel), apb.UnpinReply)

    def move(self, sel: apb.Selector, to_tier: str, from_tier: str = "") -> apb.MoveReply:
        req = apb.MoveRequest(selector=sel, to_tier=to_tier, from_tier=from_tier)
        return self._call(self._stub.Move, req, apb.MoveReply)

    def set_policy(
        self,
        tier: str = "",
        *,
        eviction_policy: str = "",
        capacity_bytes: int | None = None,
        quotas: dict[str, int] | None = None,
    ) -> apb.SetPolicyReply:
        """Change at run time; ``capacity_bytes=0`` restores the tier's own
        capacity, a quota of 0 removes it."""
        req = apb.SetPolicyRequest(
            tier=tier,
            eviction_policy=eviction_policy,
            quotas=[apb.QuotaChange(namespace=ns, bytes=n) for ns, n in (quotas or {}).items()],
        )
        if capacity_bytes is not None:
            req.set_capacity = True
            req.capacity_bytes = capacity_bytes
        return self._call(self._stub.SetPolicy, req, apb.SetPolicyReply)

    def recode(self, sel: apb.Selector, codec: str, level: int | None = None) -> apb.RecodeReply:
        req = apb.RecodeRequest(selector=sel, codec=codec)
        if level is not None:
            req.set_level = True
            req.level = level
        return self._call(self._stub.Recode, req, apb.RecodeReply)

    def clear(
        self, *, tier: str = "", namespace: str = "", everything: bool = False, confirm: bool = False
    ) -> apb.ClearReply:
        req = apb.ClearRequest(tier=tier, namespace=namespace, all=everything, confirm=confirm)
        return self._call(self._stub.Clear, req, apb.ClearReply)


def to_plain(msg: Message) -> dict[str, Any]:
    """Every field of ``msg`` (defaults included) as plain Python data: numbers
    stay numbers (protobuf's own JSON mapping turns 64-bit integers into strings)."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            out[f.name] = dict(value)
        elif f.is_repeated:
            out[f.name] = [to_plain(v) if isinstance(v, Message) else v for v in value]
        elif isinstance(value, Message):
            out[f.name] = to_plain(value)
        else:
            out[f.name] = value
    return out
