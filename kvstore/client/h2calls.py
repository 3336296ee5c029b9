"""Gets and puts over a client's own HTTP/2 connection to the daemon, as both
clients make them: :class:`~kvstore.client.sync.Client` on its calling thread,
:class:`~kvstore.client.aio.AsyncClient` in a worker thread
(:func:`in_thread`).  The connection is :class:`~kvstore.client.h2channel.H2GetChannel`
(one call at a time); these functions turn its results into the clients'.
Each returns None when the channel cannot carry the call now (busy with
another call, closed, the connection failing): the caller then takes the
gRPC way, whose retries report what is wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from collections.abc import Callable
from typing import TypeVar

import torch

from kvstore.client.channel import ClientTLS
from kvstore.client.h2channel import H2GetChannel, parse_address
from kvstore.client.h2wire import Target
from kvstore.client.payload import Fetched, fetched
from kvstore.errors import InvalidArgument, RemoteUnavailable
from kvstore.server.messages import meta_from_pb
from kvstore.tiers.memory import tensor_view
from kvstore.v1 import kvstore_pb2 as pb

T = TypeVar("T")


def open_channel(address: str, tls: ClientTLS | None, timeout_s: float) -> H2GetChannel | None:
    """The HTTP/2 channel to the daemon at ``address`` (connected on first use);
    None for a gRPC target it cannot parse (``dns:///``, ``unix:``, ...)."""
    target = parse_address(address)
    if target is None:
        return None
    ctx = _ssl_context(tls)
    return H2GetChannel(Target(
        *target, tls=ctx[0] if ctx else None, server_hostname=ctx[1] if ctx else None,
        connect_timeout_s=min(5.0, timeout_s),
    ))


def _ssl_context(tls: ClientTLS | None) -> tuple[ssl.SSLContext, str | None] | None:
    """The TLS settings of the HTTP/2 channel, the same as the gRPC channel's (ALPN h2)."""
    if tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
    if tls.cert is not None:
        ctx.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None)
    ctx.set_alpn_protocols(["h2"])
    return ctx, tls.server_name


def get(
    channel: H2GetChannel, texts: list[str], into: torch.Tensor | None, *, frame_bytes: int,
    metadata: tuple[tuple[str, str], ...], timeout_s: float,
) -> list[Fetched | None] | None:
    """The chunks under the key texts (None where absent), each checked against its
    checksum; with ``into`` (one key, contiguous, on the CPU) the payload lands in it.
    None: the channel cannot carry the call now."""
    dest = None if into is None else tensor_view(into)

    def destination(header: pb.GetHeader) -> memoryview:
        n = header.meta.nbytes
        if dest is None:
            return memoryview(bytearray(n))
        if n > dest.nbytes:
            raise InvalidArgument(f"output has room for {dest.nbytes} bytes, the chunk has {n}")
        return dest[:n]

    request = pb.GetRequest(keys=texts, frame_bytes=frame_bytes, inline_data=True)
    got = channel.get(request, metadata=metadata, timeout_s=timeout_s, destination=destination)
    if got is None:
        return None
    out: list[Fetched | None] = [None] * len(texts)
    for header, data in got:
        if not 0 <= header.index < len(texts):
            raise RemoteUnavailable(f"the daemon answered for key {header.index} of {len(texts)}")
        if data is not None:
            out[header.index] = fetched(meta_from_pb(header.meta), data, texts[header.index])
    return out


async def in_thread(channel: H2GetChannel, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """``fn(*args, **kwargs)``, a call on ``channel``, in the event loop's default
    executor.  Cancelled (a deadline of the caller's), it aborts the call's
    connection and waits for ``fn`` to return, which is then at once, before
    raising: a get must not write into the caller's tensor, nor a put read the
    caller's buffer, after the caller was told the call ended."""
    done = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kwargs))
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        channel.abort()
        with contextlib.suppress(BaseException):
            await done
        raise
