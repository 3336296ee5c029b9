"""SGLang HiCache L3 throughput: kvstore's backend against SGLang's own ``file`` backend.

Run:  flock /tmp/kvstore-bench.lock python benchmarks/bench_sglang.py [--models 8b,smollm2]
      [--pages N] [--rounds R] [--json]

For each model's page (64 tokens, bf16, page_first host layout), the same
host-pool pages go through, in one run on one machine:

* ``kvstore shm``: the daemon (started here, one CPU tier) over shared memory,
  SGLang's zero-copy v1 interface (``batch_set_v1`` / ``batch_get_v1``);
* ``kvstore grpc``: the same daemon over the gRPC byte stream (``shm: false``);
* ``kvstore local``: the in-process store (``mode: local``), v1 interface;
* ``sglang file``: SGLang's built-in ``HiCacheFile`` (built by SGLang's backend
  factory, ``--hicache-storage-backend file``) in a temporary directory on
  disk, driven the way SGLang's cache controller drives it (it has no v1
  path): ``get_data_page`` -> ``batch_set``; dummy pages -> ``batch_get`` ->
  ``set_from_flat_data_page``;
* ``memcpy``: the reference ceiling, the same pages copied host pool ->
  preallocated buffer -> host pool with torch.

Each round writes ``--pages`` new pages (one batch, as SGLang's backup thread
does, split into groups of ``batch_bytes``) and reads them back into other
slots; the best and median of ``--rounds`` rounds are reported in GB/s of
page bytes.  Reads are checked bit for bit against what was written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support.daemon: the same daemon launcher as the tests


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    kv_heads: int
    head_dim: int
    page: int = 64

    @property
    def page_bytes(self) -> int:
        return self.layers * 2 * self.page * self.kv_heads * self.head_dim * 2


MODELS = {
    "8b": Model("Llama-3-8B-class (32 layers, 8 KV heads x 128)", 32, 8, 128),
    "smollm2": Model("SmolLM2-135M (30 layers, 3 KV heads x 64)", 30, 3, 64),
}


class PageFirstPool:
    """SGLang's MHA host pool in the page_first layout: kv_buffer [2, tokens, layers, heads, dim]
    and its page accessors (same slicing as sglang/srt/mem_cache/pool_host/mha.py)."""

    layout = "page_first"

    def __init__(self, m: Model, pages: int) -> None:
        self.page_size, self.layer_num, self.head_num, self.head_dim = m.page, m.layers, m.kv_heads, m.head_dim
        self.v_head_dim = m.head_dim
        self.dtype = torch.bfloat16
        self.size = pages * m.page
        self.kv_buffer = torch.randn(2, self.size, m.layers, m.kv_heads, m.head_dim).to(torch.bfloat16)

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        page = self.kv_buffer[:, index : index + self.page_size]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros(2, self.layer_num, self.page_size, self.head_num, self.head_dim, dtype=self.dtype).flatten()

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        self.kv_buffer[:, index : index + self.page_size] = data_page.reshape(
            2, self.page_size, self.layer_num, self.head_num, self.head_dim
        )


def storage_config(extra: dict[str, Any]) -> Any:
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    return HiCacheStorageConfig(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=False,
        enable_storage_metrics=False, is_page_first_layout=True, model_name="bench", extra_config=extra,
    )


def keys_for(round_: int, n: int, tag: str) -> list[str]:
    return [hashlib.sha256(f"{tag}/{round_}/{i}".encode()).hexdigest() for i in range(n)]


def run_backend(
    name: str, backend: Any, pool: PageFirstPool, n: int, rounds: int, v1: bool
) -> dict[str, Any]:
    P = pool.page_size
    src = torch.arange(n) * P  # pages 0..n-1 are written ...
    dst = (torch.arange(n) + n) * P  # ... and read back into pages n..2n-1
    src_idx = torch.cat([torch.arange(s, s + P) for s in src.tolist()])
    dst_idx = torch.cat([torch.arange(s, s + P) for s in dst.tolist()])
    page_bytes = pool.get_data_page(0).numel() * 2
    sets, gets = [], []
    for r in range(rounds + 1):  # round 0 warms up (segment registration, page faults)
        keys = keys_for(r, n, name)
        pool.kv_buffer[:, dst[0] : dst[-1] + P].zero_()
        t0 = time.perf_counter()
        if v1:
            ok = all(backend.batch_set_v1(keys, src_idx))
        else:
            ok = backend.batch_set(keys, [pool.get_data_page(int(i)) for i in src])
        t1 = time.perf_counter()
        if v1:
            got = all(backend.batch_get_v1(keys, dst_idx))
        else:
            pages = backend.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys])
            got = all(p is not None for p in pages)
            for i, p in zip(dst.tolist(), pages):
                pool.set_from_flat_data_page(i, p)
        t2 = time.perf_counter()
        if not (ok and got):
            raise RuntimeError(f"{name}: a set or get failed in round {r}")
        if not torch.equal(pool.kv_buffer[:, dst[0] : dst[-1] + P], pool.kv_buffer[:, src[0] : src[-1] + P]):
            raise RuntimeError(f"{name}: pages read back differ from those written")
        if r:
            sets.append(n * page_bytes / (t1 - t0) / 1e9)
            gets.append(n * page_bytes / (t2 - t1) / 1e9)
    return {
        "backend": name, "set_best": max(sets), "set_median": statistics.median(sets),
        "get_best": max(gets), "get_median": statistics.median(gets),
    }


def memcpy_reference(pool: PageFirstPool, n: int, rounds: int) -> dict[str, Any]:
    P = pool.page_size
    page_bytes = pool.get_data_page(0).numel() * 2
    buf = torch.empty(n * page_bytes, dtype=torch.uint8)
    staged = [buf[i * page_bytes : (i + 1) * page_bytes].view(torch.bfloat16) for i in range(n)]
    sets, gets = [], []
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        for i in range(n):
            staged[i].view(2, P, pool.layer_num, pool.head_num, pool.head_dim).copy_(pool.get_data_page(i * P, flat=False))
        t1 = time.perf_counter()
        for i in range(n):
            pool.get_data_page((n + i) * P, flat=False).copy_(staged[i].view(2, P, pool.layer_num, pool.head_num, pool.head_dim))
        t2 = time.perf_counter()
        if r:
            sets.append(n * page_bytes / (t1 - t0) / 1e9)
            gets.append(n * page_bytes / (t2 - t1) / 1e9)
    return {"backend": "memcpy (reference)", "set_best": max(sets), "set_median": statistics.median(sets),
            "get_best": max(gets), "get_median": statistics.median(gets)}


def bench_model(m: Model, n: int, rounds: int, work: Path) -> list[dict[str, Any]]:
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    from tests.support.daemon import DaemonProcess, cpu_only

    pool = PageFirstPool(m, 2 * n)
    total = n * m.page_bytes * (rounds + 1)
    dynamic = {"backend_name": "kvstore", "module_path": "kvstore.connectors.sglang",
               "class_name": "KVStoreHiCacheStorage", "interface_v1": 1}
    rows = [memcpy_reference(pool, n, rounds)]
    cap = f"{(total >> 20) + 256}MiB"
    with DaemonProcess(work / f"daemon-{m.layers}", cpu_only(cap)) as d:
        for label, extra in (
            ("kvstore shm", {"address": d.address, "shm": True, "shm_bytes": "512MiB"}),
            ("kvstore grpc", {"address": d.address, "shm": False, "tenant": "grpc"}),
        ):
            b = StorageBackendFactory.create_backend("dynamic", storage_config({**dynamic, **extra, "timeout_s": 60}), pool)
            b.register_mem_pool_host(pool)
            try:
                rows.append(run_backend(label, b, pool, n, rounds, v1=True))
            finally:
                b.close()
    b = StorageBackendFactory.create_backend(
        "dynamic", storage_config({**dynamic, "mode": "local", "local_capacity": cap}), pool
    )
    b.register_mem_pool_host(pool)
    try:
        rows.append(run_backend("kvstore local", b, pool, n, rounds, v1=True))
    finally:
        b.close()
    fdir = Path(tempfile.mkdtemp(prefix="hicache-file-", dir=work))
    f = StorageBackendFactory.create_backend("file", storage_config({"file_storage_path": str(fdir)}), pool)
    f.register_mem_pool_host(pool)
    rows.append(run_backend("sglang file", f, pool, n, rounds, v1=False))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="8b,smollm2", help=f"comma list of {sorted(MODELS)}")
    ap.add_argument("--pages", type=int, default=0, help="pages per batch (default: ~256 MiB worth, at most 128)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-sglang-", dir=str(Path.home())) as tmp:
        for name in args.models.split(","):
            m = MODELS[name]
            n = args.pages or max(1, min(128, (256 << 20) // m.page_bytes))
            rows = bench_model(m, n, args.rounds, Path(tmp))
            out[name] = {"model": m.name, "page_bytes": m.page_bytes, "pages": n, "rows": rows}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for name, res in out.items():
        file_row = next(r for r in res["rows"] if r["backend"] == "sglang file")
        print(f"\n{res['model']}: page = 64 tokens = {res['page_bytes'] / 2**20:.2f} MiB, "
              f"{res['pages']} pages per batch, GB/s (best / median of rounds)")
        print(f"{'backend':22} {'batch_set':>15} {'batch_get':>15} {'set vs file':>12} {'get vs file':>12}")
        for r in res["rows"]:
            print(f"{r['backend']:22} {r['set_best']:7.2f} / {r['set_median']:5.2f} {r['get_best']:7.2f} / "
                  f"{r['get_median']:5.2f} {r['set_median'] / file_row['set_median']:11.2f}x "
                  f"{r['get_median'] / file_row['get_median']:11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
