"""A client's gRPC channel to the daemon, and its policy for failed calls.

One channel per client, reused for every call (plain, TLS, or mutual TLS).
Each call runs against one deadline; a call that fails with UNAVAILABLE is
retried with exponential backoff and jitter while the deadline allows
(nothing else is: other errors are the caller's or the data's, and retrying
cannot help).  Every error reaches the caller as a typed
:class:`~kvstore.errors.KVStoreError`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from kvstore.errors import error_for_status

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """TLS settings of a client: the CA that signed the daemon's certificate,
    and for mutual TLS the client's own certificate and key (PEM files)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    #: Expected name in the daemon's certificate when it differs from the host.
    server_name: str | None = None


def open_channel(address: str, tls: ClientTLS | None, frame_bytes: int) -> grpc.aio.Channel:
    """The channel to ``address``, with the daemon's message-size options for ``frame_bytes``."""
    from kvstore.server.daemon import channel_options

    opts = channel_options(frame_bytes)
    if tls is None:
        return grpc.aio.insecure_channel(address, options=opts)
    creds = grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(),
        private_key=tls.key.read_bytes() if tls.key else None,
        certificate_chain=tls.cert.read_bytes() if tls.cert else None,
    )
    if tls.server_name:
        opts = [*opts, ("grpc.ssl_target_name_override", tls.server_name)]
    return grpc.aio.secure_channel(address, creds, options=opts)


@dataclass(frozen=True, slots=True)
class Retries:
    """How a client's calls are bounded and retried (see the module docstring)."""

    timeout_s: float
    retries: int
    backoff_s: float

    async def call(self, fn: Callable[[float], Awaitable[T]]) -> T:
        """Run ``fn(seconds left)`` with retries on UNAVAILABLE; map errors to typed ones."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        attempt = 0
        while True:
            remaining = deadline - loop.time()
            try:
                return await fn(max(0.001, remaining))
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    delay = self.backoff_s * (2**attempt) * (0.5 + random.random())
                    if loop.time() + delay < deadline:
                        attempt += 1
                        await asyncio.sleep(delay)
                        continue
                raise error_for_status(code.name, exc.details() or code.name) from None
