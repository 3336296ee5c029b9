"""What the client-path benchmarks share (benchmarks/bench_put_paths.py,
bench_async_paths.py): their options, Redis's reference figures, and rounds
that alternate the clients over new values, each read back and checked."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from kvstore.bench.peer_redis import redis_reference
from kvstore.bench.peers import PeerResult
from kvstore.keys import ChunkKey, KeyBuilder

MiB = 1 << 20
#: Keys a size's values cycle over.
SLOTS = 8
#: Untimed rounds first.
WARMUP = 2


@dataclass(frozen=True)
class PathsRun:
    """A run's sizes (bytes), timed rounds per size, and Redis's figures per size
    (empty, with the reason, when redis-server is not installed)."""

    sizes: list[int]
    rounds: dict[int, int]
    redis: dict[int, PeerResult]
    redis_missing: str | None


def parse_run(description: str, argv: Sequence[str] | None = None) -> PathsRun:
    """Read ``--sizes`` and ``--rounds``, run torch with one thread (like the
    clients of ``kvstore bench``) and measure the Redis reference."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--sizes", default="1,4,16,32", help="value sizes in MiB")
    ap.add_argument("--rounds", type=int, default=40, help="puts per client and size (fewer above 4 MiB)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    sizes = [int(float(s) * MiB) for s in a.sizes.split(",")]
    rounds = {size: max(8, a.rounds * 4 * MiB // max(size, 4 * MiB)) for size in sizes}
    ref, reason = redis_reference(sizes, max(rounds.values()))
    return PathsRun(sizes, rounds, ref, reason)


class Rounds:
    """``rounds`` timed rounds (after :data:`WARMUP`) of one size over the clients
    ``names``, in turn: each step puts a new value (:attr:`src`) under one of
    :data:`SLOTS` keys and reads it back into :attr:`dst`."""

    def __init__(self, names: Iterable[str], kb: KeyBuilder, size: int, rounds: int) -> None:
        self._names = list(names)
        self._keys = [kb.segment_key([size, i]) for i in range(SLOTS)]
        self._rounds = rounds
        self.src = torch.randint(0, 255, (size,), dtype=torch.uint8)
        self.dst = torch.empty_like(self.src)
        self._stamp = self.src[:8].view(torch.int64)
        #: Per client: put seconds, get seconds.
        self.times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in self._names}

    def steps(self) -> Iterator[tuple[int, str, ChunkKey]]:
        """(round, client, key) for each put to make, :attr:`src` renewed for it."""
        for i in range(self._rounds + WARMUP):
            for j, name in enumerate(self._names):
                self._stamp[0] = i * len(self._names) + j  # new content: the daemon must store it
                yield i, name, self._keys[i % SLOTS]

    def record(self, i: int, name: str, t0: float, t1: float, t2: float) -> None:
        """A step's put (``t0``-``t1``) and get (``t1``-``t2``); raises if :attr:`dst` is not :attr:`src`."""
        if not torch.equal(self.src, self.dst):
            raise RuntimeError(f"{name}: wrong bytes back for a {self.src.numel()}-byte value")
        if i >= WARMUP:
            self.times[name][0].append(t1 - t0)
            self.times[name][1].append(t2 - t1)
