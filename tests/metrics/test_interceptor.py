"""RpcInterceptor (kvstore/metrics/interceptor.py) in a real grpc.aio server:
each call timed once, with the status code it ended with."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from kvstore.metrics import Metrics
from kvstore.metrics.interceptor import RpcInterceptor
from kvstore.store import TieredStore, TierSettings
from kvstore.tiers.cpu import CpuTier, CpuTierConfig


def _ident(b: bytes) -> bytes:
    return b


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    if request == b"missing":
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    if request == b"bug":
        raise RuntimeError("a bug in the handler")
    return request


async def _count(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
    for i in range(int(request)):
        yield str(i).encode()
        await asyncio.sleep(0.01)


async def test_calls_are_timed_with_the_code_they_ended_with() -> None:
    store = TieredStore([(CpuTier("cpu", CpuTierConfig(capacity_bytes=1 << 20)), TierSettings())])
    async with store:
        metrics = Metrics(store)
        server = grpc.aio.server(interceptors=[RpcInterceptor(metrics)])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo, _ident, _ident),
            "Count": grpc.unary_stream_rpc_method_handler(_count, _ident, _ident),
        })])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                echo = ch.unary_unary("/t.T/Echo", _ident, _ident)
                count = ch.unary_stream("/t.T/Count", _ident, _ident)
                assert await echo(b"hi") == b"hi"
                for request, code in ((b"missing", grpc.StatusCode.NOT_FOUND), (b"bug", grpc.StatusCode.UNKNOWN)):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await echo(request)
                    assert err.value.code() == code
                assert [m async for m in count(b"3")] == [b"0", b"1", b"2"]
                call = count(b"1000")
                assert await call.read() == b"0"
                call.cancel()  # the client goes away mid-stream
                for _ in range(100):  # the server sees the cancellation shortly after
                    if metrics.snapshot().rpc_errors.get(("T/Count", "CANCELLED")):
                        break
                    await asyncio.sleep(0.02)
        finally:
            await server.stop(None)
        assert metrics.snapshot().rpc_errors == {("T/Echo", "NOT_FOUND"): 1, ("T/Echo", "UNKNOWN"): 1,
                                                 ("T/Count", "CANCELLED"): 1}
        timed = {m: metrics.registry.get_sample_value("kvstore_rpc_duration_seconds_count", {"method": m})
                 for m in ("T/Echo", "T/Count")}
        assert timed == {"T/Echo": 3, "T/Count": 2}
