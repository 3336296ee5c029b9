"""Size and quality of every codec level on the KV of a real model (SmolLM2-135M).

    python benchmarks/codecs/quality.py [--context 2048] [--chunk 256] [--out FILE.md]

The context (the first ``--context`` tokens of kvstore.testing.corpus) is
prefilled once; its KV is cut into chunks of ``--chunk`` tokens (as the store
keeps them), each chunk encoded and decoded separately, and the decoded KV
replaces the exact one when the model reads the rest of the essay (the held-out
continuation).  Reported per codec and level:

* bits per element, every byte of each encoded chunk counted (header, tables,
  checksum);
* perplexity of the continuation, and its change against the exact KV;
* KL divergence of the next-token distributions from the exact KV's (nats).

The exact-KV perplexity is measured in the same run and printed first.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from kvstore.codecs import decode, get_codec
from kvstore.testing import corpus, smollm2


@dataclass
class Row:
    codec: str
    level: int
    options: str
    bits: float
    ppl: float
    delta_pct: float
    kl: float


def chunks_of(kv: torch.Tensor, size: int) -> Iterable[torch.Tensor]:
    for start in range(0, kv.shape[2], size):
        yield kv[:, :, start : start + size].contiguous()


def roundtrip(kv: torch.Tensor, codec: str, level: int, chunk: int, dtype: torch.dtype, **options: int) -> tuple[torch.Tensor, float]:
    """Encode chunk by chunk in ``dtype``; return the decoded KV and bits per element."""
    c = get_codec(codec, **options)
    parts, nbytes = [], 0
    for part in chunks_of(kv.to(dtype), chunk):
        data = c.encode(part, level=level)
        nbytes += len(data)
        parts.append(decode(data))
    return torch.cat(parts, dim=2), nbytes * 8 / kv.numel()


def configurations() -> list[tuple[str, int, dict[str, int]]]:
    rows: list[tuple[str, int, dict[str, int]]] = [("raw", 0, {}), ("zstd", 0, {})]
    rows += [("kivi", lv, {"group_size": g}) for lv in (0, 1, 2) for g in (32, 128)]
    rows += [("cachegen", lv, {}) for lv in get_codec("cachegen").levels]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--out", help="also write the markdown table here")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dtype = getattr(torch, args.dtype)

    model = smollm2.load_model()
    tok = smollm2.load_tokenizer()
    ids = torch.tensor(tok(corpus.TEXT)["input_ids"])
    ctx, cont = ids[: args.context], ids[args.context :]
    t0 = time.perf_counter()
    kv = smollm2.context_kv(model, ctx)
    ref = smollm2.continuation_logprobs(model, kv, cont)
    exact = smollm2.perplexity(ref, cont)
    ref16 = smollm2.continuation_logprobs(model, kv.to(dtype), cont)
    lines = [
        f"SmolLM2-135M-Instruct, {args.context} context tokens in chunks of {args.chunk}, "
        f"{len(cont)} continuation tokens; KV stored as {args.dtype}; {platform.processor() or platform.machine()}",
        f"exact KV (float32) perplexity {exact:.3f}; {args.dtype} KV {smollm2.perplexity(ref16, cont):.3f} "
        f"(prefill + reference {time.perf_counter() - t0:.1f} s)",
        "",
        "| codec | level | options | bits/element (all-in) | perplexity | vs exact | KL (nats) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(lines), flush=True)
    for name, level, options in configurations():
        dec, bits = roundtrip(kv, name, level, args.chunk, dtype, **options)
        lp = smollm2.continuation_logprobs(model, dec, cont)
        ppl = smollm2.perplexity(lp, cont)
        row = Row(name, level, " ".join(f"{k}={v}" for k, v in options.items()), bits, ppl,
                  (ppl / exact - 1) * 100, smollm2.kl_divergence(ref, lp))
        line = (f"| {row.codec} | {row.level} | {row.options} | {row.bits:.3f} | {row.ppl:.3f} | "
                f"{row.delta_pct:+.2f}% | {row.kl:.4f} |")
        print(line, flush=True)
        lines.append(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
