"""A gRPC server interceptor that times RPCs and counts their status codes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from kvstore.metrics.core import Metrics


#: Services not timed: health watches are long-lived streams, reflection is tooling.
_UNTIMED = ("/grpc.health.v1.", "/grpc.reflection.")


class RpcInterceptor(grpc.aio.ServerInterceptor):
    """Times each RPC (to its last reply message) and counts non-OK status codes."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(_UNTIMED):
            return handler
        label = method.rsplit(".", 1)[-1]  # "/kvstore.v1.KVStore/Get" -> "KVStore/Get"
        observe = self._metrics.observe_rpc
        h: Any = handler
        if h.unary_stream is not None or h.stream_stream is not None:
            attr = "unary_stream" if h.unary_stream is not None else "stream_stream"
            inner_gen = getattr(h, attr)

            async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                with _timed(observe, label, context):
                    async for item in inner_gen(request, context):
                        yield item

            replaced: grpc.RpcMethodHandler[Any, Any] = h._replace(**{attr: streaming})
            return replaced
        attr = "unary_unary" if h.unary_unary is not None else "stream_unary"
        inner = getattr(h, attr)

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            with _timed(observe, label, context):
                return await inner(request, context)

        wrapped: grpc.RpcMethodHandler[Any, Any] = h._replace(**{attr: unary})
        return wrapped


@contextlib.contextmanager
def _timed(
    observe: Callable[[str, float, str], None], label: str, context: grpc.aio.ServicerContext[Any, Any]
) -> Iterator[None]:
    """Time the call inside, then ``observe`` it with its status code: the
    context's, else OK or UNKNOWN by how it ended; CANCELLED when the client
    went away (cancelled, or a stream closed mid-way)."""
    t0 = time.perf_counter()
    code = "UNKNOWN"
    try:
        yield
        code = _code(context, "OK")
    except (asyncio.CancelledError, GeneratorExit):
        code = "CANCELLED"
        raise
    except BaseException:
        code = _code(context, "UNKNOWN")
        raise
    finally:
        observe(label, time.perf_counter() - t0, code)


def _code(context: grpc.aio.ServicerContext[Any, Any], default: str) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return default
