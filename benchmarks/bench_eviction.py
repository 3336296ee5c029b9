"""Hit ratio and speed of each eviction policy on traces of shared prefixes plus one-off scans.

Run:  python benchmarks/bench_eviction.py [--requests 10000] [--seed 0] [--write docs/benchmarks/eviction.md]

The traces are seeded and deterministic.  Every request is a chain of chunk
keys (256 tokens each), as an inference engine looks them up:

* a **system prompt**: one of 16 (4-24 chunks), Zipf popularity (s = 1), in
  front of every request;
* a **chat turn** (80% of requests): one of the model's open conversations
  (at most 128) is continued, or a new one is opened (1 in 4); each turn
  re-reads the whole conversation so far and appends 1-3 chunks; a
  conversation ends after a geometric number of turns (mean 5) or at 48
  chunks;
* a **one-off document** (20%): 32-160 chunks never read again (a long RAG
  context, a file to summarise): a scan.

Two models share the cache, with 32 MiB (8B, bf16) and 20 MiB (70B, TP 4
shard) chunks, 70/30 of the requests.  The "chat only" trace is the same
generator with no documents; it shows what scan resistance costs, if
anything, when there is no scan.

The simulator does what the store and an engine do: look up the longest
cached prefix (those chunks are hits, accessed, and pinned while being
loaded: skipped by ``victim``), then put the chunks after the first miss,
evicting victims until the bytes fit (a chunk past the first miss that is
still cached is put again: an access).  Hit ratio = chunks read from the
cache / chunks requested (= prefill tokens saved).  Cache sizes are a
fraction of the *reused working set*: the bytes of the distinct chunks
requested at least twice over the whole trace (more than is live at any
moment, since conversations end).  Reference: LRU, in the same run.

Speed: ``--speed-keys`` resident chunks (10% of them accessed once), then
eviction cycles (``victim`` + ``remove`` + ``insert`` of a new key), with no
pins, and with the oldest 1% of the chunks pinned and never used: the worst
case, since the policies keep skipped keys in place and each victim search
steps over all of them.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvstore.eviction import POLICIES, make_policy
from kvstore.keys import ChunkKey, Namespace

MiB = 1 << 20
REFERENCE = "lru"
FRACTIONS = (0.05, 0.10, 0.20, 0.50)
# (namespace, chunk bytes, share of requests)
MODELS = (
    (Namespace("bench", "llama-3-8b"), 32 * MiB, 0.7),
    (Namespace("bench", "llama-3-70b-tp4"), 20 * MiB, 0.3),
)
N_SYSTEM = 16
MAX_OPEN = 128


@dataclass(frozen=True, slots=True)
class Request:
    keys: tuple[ChunkKey, ...]
    nbytes: int  # per chunk


@dataclass(frozen=True, slots=True)
class Trace:
    name: str
    requests: list[Request]
    reads: int  # chunks requested
    working_set: int  # bytes of the chunks requested at least twice
    footprint: int  # bytes of all distinct chunks


class _Keys:
    """Fresh, distinct chunk keys per namespace (real ChunkKeys: hashing them is part of the cost)."""

    def __init__(self) -> None:
        self._next = 0

    def new(self, ns: Namespace) -> ChunkKey:
        self._next += 1
        return ChunkKey(ns, "0" * 16, f"p{self._next:064x}")


def make_trace(name: str, requests: int, seed: int, doc_share: float) -> Trace:
    """A seeded trace of ``requests`` requests (see the module docstring)."""
    rng = random.Random(seed)
    keys = _Keys()
    # Per model: the system prompts, their Zipf weights, and the open conversations.
    systems = {ns: [[keys.new(ns) for _ in range(rng.randint(4, 24))] for _ in range(N_SYSTEM)] for ns, _, _ in MODELS}
    zipf = [1.0 / (i + 1) for i in range(N_SYSTEM)]
    open_convs: dict[Namespace, list[list[ChunkKey]]] = {ns: [] for ns, _, _ in MODELS}
    out: list[Request] = []
    for _ in range(requests):
        ns, nbytes, _ = rng.choices(MODELS, weights=[m[2] for m in MODELS])[0]
        system = rng.choices(systems[ns], weights=zipf)[0]
        convs = open_convs[ns]
        if rng.random() < doc_share:
            body = [keys.new(ns) for _ in range(rng.randint(32, 160))]
            out.append(Request((*system, *body), nbytes))
            continue
        if not convs or (len(convs) < MAX_OPEN and rng.random() < 0.25):
            convs.append([*system])
            i = len(convs) - 1
        else:
            i = rng.randrange(len(convs))
        conv = convs[i]
        conv.extend(keys.new(ns) for _ in range(rng.randint(1, 3)))
        out.append(Request(tuple(conv), nbytes))
        if rng.random() < 0.2 or len(conv) >= 48:
            convs[i] = convs[-1]
            convs.pop()
    seen: dict[ChunkKey, int] = {}
    size: dict[ChunkKey, int] = {}
    for req in out:
        for k in req.keys:
            seen[k] = seen.get(k, 0) + 1
            size[k] = req.nbytes
    return Trace(
        name=name,
        requests=out,
        reads=sum(seen.values()),
        working_set=sum(size[k] for k, n in seen.items() if n > 1),
        footprint=sum(size.values()),
    )


def simulate(policy_name: str, trace: Trace, capacity: int) -> float:
    """Hit ratio of ``policy_name`` on ``trace`` with ``capacity`` bytes."""
    p = make_policy(policy_name)
    held: dict[ChunkKey, int] = {}
    used = 0
    hits = 0
    for req in trace.requests:
        keys, nbytes = req.keys, req.nbytes
        n = 0
        while n < len(keys) and keys[n] in held:
            p.access(keys[n])
            n += 1
        hits += n
        loading = set(keys[:n])  # pinned while the engine loads them
        skip = loading.__contains__
        for k in keys[n:]:
            if k in held:
                p.access(k)
                continue
            while used + nbytes > capacity:
                v = p.victim(skip)
                if v is None:
                    break
                p.remove(v)
                used -= held.pop(v)
            if used + nbytes <= capacity:
                p.insert(k, nbytes)
                held[k] = nbytes
                used += nbytes
    return hits / trace.reads


def speed(policy_name: str, resident: int, cycles: int, pinned_share: float, seed: int) -> float:
    """Eviction cycles (victim + remove + insert) per second."""
    rng = random.Random(seed)
    keys = _Keys()
    ns = MODELS[0][0]
    p = make_policy(policy_name)
    live = [keys.new(ns) for _ in range(resident)]
    for k in live:
        p.insert(k, 1)
    used = set(rng.sample(live, resident // 10))
    for k in used:
        p.access(k)
    # The oldest chunks never used: at the head of every policy's order, so
    # each victim search has to step over all of them.
    pinned = set([k for k in live if k not in used][: int(resident * pinned_share)])
    skip = pinned.__contains__
    fresh = [keys.new(ns) for _ in range(cycles)]
    t0 = time.perf_counter()
    for k in fresh:
        v = p.victim(skip)
        assert v is not None
        p.remove(v)
        p.insert(k, 1)
    return cycles / (time.perf_counter() - t0)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    # Speeds from a shared machine mean little without its load at the time.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}; "
        f"load average {load:.1f} at the end of the run"
    )


def hit_ratio_tables(traces: list[Trace], names: list[str], say: Callable[[str], None]) -> dict[str, dict[str, list[float]]]:
    """Print one table per trace; returns the differences from LRU in pp, by trace and policy."""
    diffs: dict[str, dict[str, list[float]]] = {}
    for trace in traces:
        per_policy = diffs.setdefault(trace.name, {n: [] for n in names if n != REFERENCE})
        say(
            f"trace {trace.name!r}: {len(trace.requests)} requests, {trace.reads} chunk reads, "
            f"reused working set {trace.working_set / MiB / 1024:.1f} GiB, "
            f"footprint {trace.footprint / MiB / 1024:.1f} GiB"
        )
        say(f"{'cache':>6} {'policy':<7} {'hit ratio':>9} {'vs LRU (pp)':>11} {'vs LRU (rel)':>12}")
        for frac in FRACTIONS:
            cap = int(trace.working_set * frac)
            base = simulate(REFERENCE, trace, cap)
            for name in names:
                ratio = base if name == REFERENCE else simulate(name, trace, cap)
                rel = f"{ratio / base - 1:+.1%}" if base else "n/a"
                if name != REFERENCE:
                    per_policy[name].append(100 * (ratio - base))
                say(f"{frac:>6.0%} {name:<7} {ratio:>9.3f} {100 * (ratio - base):>+11.1f} {rel:>12}")
        say("")
    return diffs


def speed_table(names: list[str], keys: int, cycles: int, seed: int, say: Callable[[str], None]) -> None:
    say(f"speed: {keys} resident chunks, {cycles} eviction cycles (victim + remove + insert)")
    say(f"{'policy':<7} {'cycles/s':>10} {'ops/s':>10} {'cycles/s, 1% pinned':>20}")
    for name in names:
        free = speed(name, keys, cycles, 0.0, seed)
        pinned = speed(name, keys, cycles // 10, 0.01, seed)
        say(f"{name:<7} {free:>10,.0f} {3 * free:>10,.0f} {pinned:>20,.0f}")


def write_doc(path: Path, lines: list[str], diffs: dict[str, dict[str, list[float]]]) -> None:
    """The latest tables as Markdown, with the command and the machine."""
    sizes = ", ".join(f"{f:.0%}" for f in FRACTIONS)
    summary = [
        f"* {trace!r}: " + "; ".join(f"{n} {', '.join(f'{d:+.1f}' for d in ds)}" for n, ds in per.items())
        for trace, per in diffs.items()
    ]
    cmd = " ".join(["python", "benchmarks/bench_eviction.py", *sys.argv[1:]])
    doc = [
        "# Eviction policies: hit ratio on shared prefixes plus one-off scans",
        "",
        f"Command: `{cmd}` (hit ratios are deterministic for a seed; speeds depend on the machine).",
        f"Machine: {machine()}.",
        "The traces and the simulator are described in the script's docstring.",
        "",
        f"Hit ratio minus LRU's, in percentage points, at caches of {sizes} of the reused working set:",
        "",
        *summary,
        "",
        "One-off documents pass through S3-FIFO's small queue (and ARC's T1) without displacing the",
        "reused prefixes; under LRU each document flushes as many bytes of them as it is long, which",
        "costs most when the cache is small next to the documents. Without scans ('chat only'), S3-FIFO",
        "can give back a little where chunks are reused only after they have left the small queue (the",
        "next turn of a conversation): their first reuse is a miss that sends them to main.",
        "",
        "```",
        *lines,
        "```",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(doc))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000, help="requests per trace")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speed-keys", type=int, default=50_000, help="resident chunks in the speed test")
    ap.add_argument("--speed-cycles", type=int, default=50_000, help="eviction cycles timed per policy")
    ap.add_argument("--write", type=Path, metavar="MD", help="also write the tables to this Markdown file")
    args = ap.parse_args()

    names = [REFERENCE, *sorted(n for n in POLICIES if n != REFERENCE)]
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    say(f"seed {args.seed}")
    traces = [
        make_trace("chat + documents", args.requests, args.seed, doc_share=0.2),
        make_trace("chat only", args.requests, args.seed, doc_share=0.0),
    ]
    diffs = hit_ratio_tables(traces, names, say)
    speed_table(names, args.speed_keys, args.speed_cycles, args.seed, say)
    if args.write:
        write_doc(args.write, lines, diffs)
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
