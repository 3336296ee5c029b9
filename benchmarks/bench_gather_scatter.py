"""Gather/scatter of chunks between paged KV buffers and canonical chunks (kvstore.connectors.paged).

Run:  flock /tmp/kvstore-bench.lock python benchmarks/bench_gather_scatter.py [--tokens 2048] [--reps 20]

SmolLM2-135M's KV shape (30 layers, 3 KV heads, head dim 64, bf16: 23 KB per
token), 256-token chunks, the blocks of a request scattered at random in a
paged buffer of 4x the request.  Reference measured in the same run:

* CPU: ``torch.Tensor.copy_`` of the same number of bytes into a preallocated
  buffer (what a gather can at best approach; it must also transpose pages);
* CUDA (when available): pinned host <-> device ``copy_`` of the same bytes
  (the PCIe ceiling a device gather into pinned host memory is held to: goal
  80% or more), block size 16 as on vLLM's CUDA backends.

Prints GB/s (best of ``--reps``) and the ratio to the reference.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kvstore.connectors.paged import KVLayout, PagedKV, slot_mapping  # noqa: E402

L, H, D, CHUNK = 30, 3, 64, 256


def best(fn: Callable[[], object], reps: int, sync: Callable[[], None] = lambda: None) -> float:
    fn()
    sync()
    out = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out = min(out, time.perf_counter() - t0)
    return out


def run(device: str, block: int, tokens: int, reps: int) -> list[tuple[str, float, float, str]]:
    n_req_blocks = tokens // block
    nb = 4 * n_req_blocks
    gen = torch.Generator().manual_seed(0)
    rows: list[tuple[str, float, float, str]] = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    nbytes = L * 2 * tokens * H * D * 2
    pin = device == "cuda"
    chunks = [torch.empty(L, 2, CHUNK, H, D, dtype=torch.bfloat16, pin_memory=pin) for _ in range(tokens // CHUNK)]
    # Reference: plain copies of the same bytes.
    if device == "cpu":
        src = torch.randn(nbytes // 2, generator=gen).to(torch.bfloat16)
        dst = torch.empty_like(src)
        ref = nbytes / best(lambda: dst.copy_(src), reps)
        rows.append(("memory copy (reference)", ref / 1e9, 1.0, ""))
        ref_up = ref_down = ref
    else:
        host = torch.empty(nbytes // 2, dtype=torch.bfloat16, pin_memory=True)
        dev = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
        ref_down = nbytes / best(lambda: host.copy_(dev, non_blocking=True), reps, sync)
        ref_up = nbytes / best(lambda: dev.copy_(host, non_blocking=True), reps, sync)
        rows.append(("device -> pinned host copy (reference)", ref_down / 1e9, 1.0, ""))
        rows.append(("pinned host -> device copy (reference)", ref_up / 1e9, 1.0, ""))
    for layout in KVLayout:
        layers = [torch.randn(nb, H, block, 2 * D, generator=gen).to(torch.bfloat16).to(device) for _ in range(L)]
        paged = PagedKV.from_layers(layers, layout)
        blocks = torch.randperm(nb, generator=gen)[:n_req_blocks].tolist()
        spans = [slot_mapping(blocks, block, i * CHUNK, (i + 1) * CHUNK) for i in range(tokens // CHUNK)]
        staging = torch.empty(L, 2, CHUNK, H, D, dtype=torch.bfloat16, device=device) if device == "cuda" else None

        def gather() -> None:
            for s, c in zip(spans, chunks):
                paged.gather_to_host(s, c, staging)

        def scatter() -> None:
            for s, c in zip(spans, chunks):
                paged.scatter(s, c)

        g = nbytes / best(gather, reps, sync)
        s = nbytes / best(scatter, reps, sync)
        rows.append((f"gather, {layout.value} layout -> {'pinned host' if pin else 'chunk'}", g / 1e9, g / ref_down, ""))
        rows.append((f"scatter, {layout.value} layout <- {'pinned host' if pin else 'chunk'}", s / 1e9, s / ref_up, ""))
        # Unaligned: a chunk that starts mid-block (per-token indexing path).
        odd = [slot_mapping(blocks, block, 1 + i * CHUNK, 1 + (i + 1) * CHUNK) for i in range(tokens // CHUNK - 1)]
        if odd:
            part = nbytes * len(odd) // len(spans)
            gu = part / best(lambda: [paged.gather_to_host(o, c, staging) for o, c in zip(odd, chunks)], reps, sync)
            rows.append((f"gather, {layout.value} layout, unaligned", gu / 1e9, gu / ref_down, "per-token path"))
        del layers, paged
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens moved per measurement (multiple of 256)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if args.tokens % CHUNK:
        raise SystemExit(f"--tokens must be a multiple of {CHUNK}")
    targets = [("cpu", 128)]
    if torch.cuda.is_available():
        targets.append(("cuda", 16))
    mb = L * 2 * args.tokens * H * D * 2 / 1e6
    for device, block in targets:
        name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
        print(f"\n## {device} ({name}), block {block}, {args.tokens} tokens = {mb:.1f} MB per measurement, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.reps}\n")
        print("| operation | GB/s | vs reference | note |")
        print("| --- | --- | --- | --- |")
        for op, gbs, ratio, note in run(device, block, args.tokens, args.reps):
            print(f"| {op} | {gbs:.2f} | {ratio:.0%} | {note} |")
    if not torch.cuda.is_available():
        print("\nCUDA: not available on this machine; the device rows were not measured.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
