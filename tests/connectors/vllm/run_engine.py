"""Run a real vLLM engine (CPU) with KVStoreConnector through phases of prompts.

A script, not a test: the end-to-end test starts it in a fresh process (vLLM
spawns its own processes and needs a ``__main__`` guard).  Usage::

    python run_engine.py SPEC.json

SPEC: {"model": dir, "role": "kv_both" | null (no connector), "extra": {...connector options},
       "prefix_caching": bool, "max_model_len": n, "dtype": "bfloat16", "warmup": bool, "out": dir,
       "phases": [{"prompts": [[token ids], ...], "max_tokens": n, "one_by_one": bool}, ...]}

Before phase i > 0 it waits for the file ``out/go<i>`` (the test changes the
store in between); after each phase it writes ``out/phase<i>.json`` with each
request's generated token ids and ``num_cached_tokens`` (and with
``one_by_one``, each request's own wall time).  Used by the end-to-end test and
by benchmarks/bench_vllm_ttft.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    transfer = None
    if spec.get("role"):  # no role: a plain engine, without kvstore
        transfer = KVTransferConfig(
            kv_connector="KVStoreConnector",
            kv_connector_module_path="kvstore.connectors.vllm",
            kv_role=spec["role"],
            kv_load_failure_policy="recompute",
            kv_connector_extra_config=spec["extra"],
        )
    llm = LLM(
        model=spec["model"],
        dtype=spec.get("dtype", "bfloat16"),
        enforce_eager=True,
        max_model_len=spec.get("max_model_len", 4096),
        enable_prefix_caching=spec.get("prefix_caching", True),
        seed=0,
        kv_transfer_config=transfer,
    )
    if spec.get("warmup"):
        llm.generate([TokensPrompt(prompt_token_ids=list(range(100, 164)))], SamplingParams(max_tokens=2), use_tqdm=False)
    for i, phase in enumerate(spec["phases"]):
        if i > 0:
            go = out / f"go{i}"
            deadline = time.monotonic() + 600
            while not go.exists():
                if time.monotonic() > deadline:
                    raise SystemExit(f"timed out waiting for {go}")
                time.sleep(0.05)
        params = SamplingParams(temperature=0.0, max_tokens=phase["max_tokens"], ignore_eos=True)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in phase["prompts"]]
        start = time.perf_counter()
        if phase.get("one_by_one"):
            # One request at a time, each timed on its own (max_tokens=1: time to first token).
            results, times = [], []
            for p in prompts:
                t0 = time.perf_counter()
                results += llm.generate([p], params, use_tqdm=False)
                times.append(time.perf_counter() - t0)
        else:
            results = llm.generate(prompts, params, use_tqdm=False)
            times = []
        elapsed = time.perf_counter() - start
        record = {
            "outputs": [list(r.outputs[0].token_ids) for r in results],
            "cached": [r.num_cached_tokens for r in results],
            "params": [r.kv_transfer_params for r in results],
            "seconds": elapsed,
            "times": times,
        }
        tmp = out / f"phase{i}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, out / f"phase{i}.json")
    # Shut the engine down cleanly: the connector flushes its pending saves.
    llm.llm_engine.engine_core.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
