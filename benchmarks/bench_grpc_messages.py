"""What one gRPC message costs: a bare ``grpc.aio`` server-streaming handler
that answers with one message of the value, or with a small header message
and then the value (what a Get without ``inline_data`` sends).

Run:  flock /tmp/kvstore-bench.lock python benchmarks/bench_grpc_messages.py [--sizes 1,4] [--calls 400]

No kvstore code on the server side: it is the floor that grpcio sets for any
Get of the daemon (a grpc.aio server, as the daemon is).  The server runs in
a process of its own on a loopback port; a grpcio client calls it.  The two
shapes alternate server by server, twice each, so machine load hits them
alike.  Prints the median latency of each.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

HEADER = b"h" * 100


def serve(ready: Any, messages: int, size: int) -> None:
    payload = b"x" * size

    async def handler(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        if messages == 2:
            yield HEADER
        yield payload

    async def main() -> None:
        method = grpc.unary_stream_rpc_method_handler(
            handler, request_deserializer=lambda b: b, response_serializer=lambda b: b
        )
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.B", {"Get": method}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


def measure(messages: int, size: int, calls: int) -> list[float]:
    ready: Any = mp.Queue()
    proc = mp.Process(target=serve, args=(ready, messages, size), daemon=True)
    proc.start()
    try:
        port = ready.get(timeout=60)
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
            call = ch.unary_stream("/bench.B/Get", request_serializer=lambda b: b, response_deserializer=lambda b: b)
            for _ in range(20):
                list(call(b"r"))
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                got = list(call(b"r"))
                times.append(time.perf_counter() - t0)
            assert len(got) == messages and len(got[-1]) == size
            return times
    finally:
        proc.terminate()
        proc.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,4", help="value sizes in MiB (default 1,4)")
    ap.add_argument("--calls", type=int, default=400, help="timed calls per server (default 400)")
    args = ap.parse_args()
    print(f"{'size':>6} {'messages':>9} {'p50 ms':>8}")
    for size in (int(float(x) * (1 << 20)) for x in args.sizes.split(",")):
        results: dict[int, list[float]] = {1: [], 2: []}
        for messages in (2, 1, 1, 2):
            results[messages] += measure(messages, size, args.calls)
        for messages, times in sorted(results.items()):
            print(f"{size / (1 << 20):>4.0f}Mi {messages:>9} {statistics.median(times) * 1e3:8.3f}")


if __name__ == "__main__":
    main()
