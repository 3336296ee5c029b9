"""Encode and decode throughput of every codec on real KV (SmolLM2-135M, fp16).

    python benchmarks/codecs/throughput.py [--device cpu|cuda] [--chunks 8] [--repeat 3]

Throughput is bytes of float16 KV in (encode) or out (decode) per second of
wall time, over 256-token chunks of the KV of a 2,048-token context, best of
``--repeat`` passes.  CPU runs use ``$KVSTORE_CODEC_THREADS`` threads (default:
every core this process may use).  ``--device cuda`` encodes from and decodes
to GPU memory (torch path) and synchronizes before reading the clock.  The
hardware and a memory-copy reference measured in the same run are printed
first: on a shared machine, compare against that, and read the MB per CPU-second
columns (bytes per second of CPU time used by this process, all threads): a
2-core machine of our own reaches at most twice that, in wall time.
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
    return (f"{model}, {len(os.sched_getaffinity(0))} cores usable, {cachegen_native.threads()} codec threads, "
            f"compiled kernel {'on' if cachegen_native.available() else 'OFF'}, {platform.python_version()}")


def best_rate(fn: Callable[[], object], nbytes: int, repeat: int, sync: Callable[[], None]) -> tuple[float, float]:
    """Best wall-clock rate, and the rate per CPU-second of this process (all threads)
    in that pass: on a shared machine the second one shows what the code costs."""
    best, cpu = float("inf"), float("inf")
    for _ in range(repeat):
        sync()
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall = time.perf_counter() - t
        if wall < best:
            best, cpu = wall, time.process_time() - c
    return nbytes / best, nbytes / max(cpu, 1e-9)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
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

    ref = torch.empty_like(kv).to(dev)
    src = kv.to(dev)
    copy_rate, _ = best_rate(lambda: ref.copy_(src), kv.numel() * 2, args.repeat, sync)
    print(f"hardware: {hardware(args.device)}")
    print(f"{len(chunks)} chunks of 256 tokens ({nbytes / 1e6:.1f} MB fp16); memory copy reference {copy_rate / 1e9:.1f} GB/s")
    print()
    print("| codec | level | bits/element | encode MB/s | decode MB/s | encode MB/CPU-s | decode MB/CPU-s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
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

            e, ec = best_rate(enc, nbytes, args.repeat, sync)
            d, dc = best_rate(dec, nbytes, args.repeat, sync)
            bits = sum(len(b) for b in blobs) * 8 / (nbytes / 2)
            print(f"| {name} | {level} | {bits:.2f} | {e / 1e6:,.0f} | {d / 1e6:,.0f} | {ec / 1e6:,.0f} | {dc / 1e6:,.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
