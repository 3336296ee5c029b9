"""Encode and decode throughput of every codec on real KV (SmolLM2-135M, fp16).

    flock /tmp/kvstore-bench.lock python benchmarks/codecs/throughput.py \
        [--device cpu|cuda] [--chunks 8] [--repeat 7] [--codecs raw,zstd,kivi,cachegen]

Throughput is bytes of float16 KV in (encode) or out (decode) per second of
wall time, over 256-token chunks of the KV of a 2,048-token context, best and
median of ``--repeat`` passes (after one warm-up pass).  CPU runs use
``$KVSTORE_CODEC_THREADS`` threads (default: every core this process may use).
``--device cuda`` encodes from and decodes to GPU memory (torch path) and
synchronizes before reading the clock.  The hardware, the load average and a
memory-copy reference measured in the same run are printed first (and the
reference again at the end): on a shared machine, compare against that, and
read the MB per CPU-second columns (bytes per second of CPU time used by this
process, all threads): a 2-core machine of our own reaches at most twice that
in wall time.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable

import torch

from kvstore.codecs import cachegen_native, decode, get_codec
from kvstore.testing import corpus, smollm2


def hardware(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    kernel = "OFF (torch fallback)"
    if cachegen_native.available():
        kernel = "on, AVX2 coders " + ("on" if cachegen_native.module().simd() else "off")
    return (f"{model}, {len(os.sched_getaffinity(0))} cores usable, {cachegen_native.threads()} codec threads, "
            f"compiled kernel {kernel}, Python {platform.python_version()}, torch {torch.__version__}")


def rates(fn: Callable[[], object], nbytes: int, repeat: int, sync: Callable[[], None]) -> tuple[float, float, float]:
    """Best and median wall-clock rate over ``repeat`` passes, and the rate per
    CPU-second of this process (all threads) in the best pass: on a shared
    machine the last one shows what the code costs, whatever the load."""
    walls: list[tuple[float, float]] = []
    for _ in range(repeat):
        sync()
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync()
        walls.append((time.perf_counter() - t, time.process_time() - c))
    walls.sort()
    best, cpu = walls[0]
    return nbytes / best, nbytes / walls[len(walls) // 2][0], nbytes / max(cpu, 1e-9)


def copy_rate(dev: torch.device, kv: torch.Tensor, repeat: int, sync: Callable[[], None]) -> float:
    """The memory-copy reference: one copy of the whole KV into a preallocated buffer."""
    src = kv.to(dev)
    ref = torch.empty_like(src)
    best, _, _ = rates(lambda: ref.copy_(src), kv.numel() * kv.element_size(), max(repeat, 5), sync)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--codecs", default="raw,zstd,kivi,cachegen")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run this mode on a GPU host")
        return 2
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    model = smollm2.load_model()
    ids = torch.tensor(smollm2.load_tokenizer()(corpus.TEXT)["input_ids"])[: 256 * args.chunks]
    kv = smollm2.context_kv(model, ids).half()
    chunks = [kv[:, :, s : s + 256].contiguous().to(dev) for s in range(0, kv.shape[2], 256)]
    nbytes = sum(c.numel() * 2 for c in chunks)

    before = copy_rate(dev, kv, args.repeat, sync)
    print(f"hardware: {hardware(args.device)}")
    if args.device == "cpu":
        print(f"load average at start: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"{len(chunks)} chunks of 256 tokens ({nbytes / 1e6:.1f} MB fp16); memory copy reference {before / 1e9:.1f} GB/s")
    print()
    print("| codec | level | bits/element | encode MB/s (best) | encode MB/s (median) | decode MB/s (best) "
          "| decode MB/s (median) | encode MB/CPU-s | decode MB/CPU-s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.codecs.split(","):
        codec = get_codec(name)
        for level in codec.levels:
            blobs: list[bytes] = []

            def enc() -> None:
                blobs.clear()
                blobs.extend(codec.encode(c, level=level) for c in chunks)

            def dec() -> None:
                for b in blobs:
                    decode(b, dev)

            enc()  # warm up: thread pool, scratch buffers, tables
            dec()
            e, em, ec = rates(enc, nbytes, args.repeat, sync)
            d, dm, dc = rates(dec, nbytes, args.repeat, sync)
            bits = sum(len(b) for b in blobs) * 8 / (nbytes / 2)
            print(f"| {name} | {level} | {bits:.2f} | {e / 1e6:,.0f} | {em / 1e6:,.0f} | {d / 1e6:,.0f} | {dm / 1e6:,.0f} "
                  f"| {ec / 1e6:,.0f} | {dc / 1e6:,.0f} |", flush=True)
    after = copy_rate(dev, kv, args.repeat, sync)
    print()
    print(f"memory copy reference at the end: {after / 1e9:.1f} GB/s"
          + (f"; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}" if args.device == "cpu" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
