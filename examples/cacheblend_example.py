"""CacheBlend on the real SmolLM2-135M: store three passages once, then answer a question
over them in a different order, reusing their KV with 15 % selective recompute.

Run:  python examples/cacheblend_example.py                       # in-process TieredStore
      python examples/cacheblend_example.py --address 127.0.0.1:51061   # a running `kvstore serve`
"""

from __future__ import annotations

import argparse
import time

import torch

from kvstore.blend import BlendConfig, CacheBlend, ClientSource, KVSource, StoreSource
from kvstore.client import Client
from kvstore.keys import KeyBuilder, LayoutFingerprint, Namespace
from kvstore.store import TieredStore, TierSettings
from kvstore.testing import corpus, smollm2
from kvstore.tiers.cpu import CpuTier, CpuTierConfig


def greedy(model: object, logits: torch.Tensor, cache: object, n: int) -> list[int]:
    out = [int(logits.argmax())]
    with torch.inference_mode():
        for _ in range(n - 1):
            step = model(torch.tensor([[out[-1]]]), past_key_values=cache)  # type: ignore[operator]
            out.append(int(step.logits[0, -1].argmax()))
    return out


def run(source: KVSource) -> None:
    model, tok = smollm2.load_model(), smollm2.load_tokenizer()
    cfg = model.config
    layout = LayoutFingerprint("float32", cfg.num_hidden_layers, cfg.num_key_value_heads, 64)
    sep = tuple(tok("\n\n")["input_ids"])
    blend = CacheBlend(model, source, KeyBuilder(Namespace("demo", "smollm2-135m"), layout),
                       BlendConfig(ratio=0.15, check_layers=(1,), separator=sep))
    docs = [tok(corpus.PARAGRAPHS[i])["input_ids"] for i in (1, 9, 18)]
    for d in docs:  # once per document, e.g. when it is indexed
        blend.store(d)
    question = tok("Question: what did every keeper write at the end of every night? Answer:")["input_ids"]
    # Another order than stored; prompts are built from token ids, so each document's tokens match.
    prompt = docs[2] + list(sep) + docs[0] + list(sep) + docs[1] + list(sep) + question

    t0 = time.perf_counter()
    res = blend.prefill(prompt)
    t1 = time.perf_counter()
    with torch.inference_mode():
        full = model(torch.tensor([prompt]), use_cache=True)
    t2 = time.perf_counter()
    print(f"{res.num_tokens} prompt tokens, {res.reused_tokens} reused, {res.recomputed_tokens} recomputed")
    print(f"CacheBlend prefill {t1 - t0:.2f} s (KV load {res.load_s:.2f} s, waited {res.wait_s:.3f} s); full {t2 - t1:.2f} s")
    print("full prefill:", repr(tok.decode(greedy(model, full.logits[0, -1], full.past_key_values, 24))))
    print("CacheBlend  :", repr(tok.decode(greedy(model, res.logits, res.cache, 24))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--address", help="a running kvstore daemon; default: an in-process TieredStore")
    args = p.parse_args()
    if args.address:
        with Client(args.address) as client:
            run(ClientSource(client))
    else:
        store = TieredStore([(CpuTier("cpu", CpuTierConfig(512 << 20)), TierSettings())])
        with StoreSource.start(store) as source:
            run(source)


if __name__ == "__main__":
    main()
