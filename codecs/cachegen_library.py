"""The fixed library of symbol distributions that CacheGen chunks point into.

A chunk does not carry probability tables: each (layer, K/V, channel) names one
of 256 library entries with a single byte (plus two bits for its predictor),
which is what keeps the tables at about 2% of the payload instead of the 13% of
a per-chunk 16-bit CDF.  Entries 0-127 are discretized Laplace distributions,
128-255 discretized Gaussians, each over a geometric grid of scales (six per
octave, from about 0.01 to 20,000 quantization steps).

An entry codes a residual ``r`` as ``j = r >> shift`` (one of 64 symbols for
``j`` in [-32, 32), or an escape symbol with ``j`` stored aside as a varint) plus
``shift`` raw low bits; wide distributions get a shift so the alphabet stays
small.  Frequencies are quantized to 12 bits; values the model gives (almost)
no probability have frequency 0 and go through the escape symbol, which always
has at least 1/4096, so any residual can be coded.

The tables are computed here once, with float64 scalar math, and checked
against a hash recorded in the code: encoder and decoder, CPU and GPU, on any
host must agree on every frequency, and a platform whose libm rounds
differently fails loudly at import instead of decoding garbage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import xxhash

from kvstore.errors import CodecError

NUM_ENTRIES = 256
NUM_SYMBOLS = 65
ESCAPE = 64
J_OFFSET = 32
PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS
SCALES_PER_SHAPE = 128
STEPS_PER_OCTAVE = 6
_SCALE_ZERO = 40  # entry u has scale 2 ** ((u - 40) / 6)
MAX_SHIFT = 24
MAX_FREQ = PROB_SCALE - 64
MIN_SYMBOL_BITS = math.log2(PROB_SCALE / MAX_FREQ)  # about 0.0227

# xxh3-64 of the frequency and shift arrays; see the module docstring.
LIBRARY_HASH = 0x35CD6FA29D69E4A4


@dataclass(frozen=True)
class Library:
    """The 256 entries in array form (read-only numpy arrays)."""

    freq: np.ndarray  # uint16 [256, 65], each row sums to 4096
    cum: np.ndarray  # uint32 [256, 66]
    shift: np.ndarray  # uint8 [256]
    mean: np.ndarray  # float64 [256]: E|r| (Laplace) or E r^2 (Gaussian) under the entry
    lam: np.ndarray  # float64 [256]: bits of code length per unit of that statistic
    entropy: np.ndarray  # float64 [256]: bits per symbol, raw bits included

    def bits(self, entry: np.ndarray, symbol: np.ndarray) -> np.ndarray:
        """Ideal code length (bits) of each coded symbol under its entry, raw bits excluded."""
        f = self.freq[entry, symbol].astype(np.float64)
        return np.asarray(PROB_BITS - np.log2(f))


def scale_of(u: int) -> float:
    """Scale (in quantization steps) of scale index ``u`` in [0, 128)."""
    return float(2.0 ** ((u - _SCALE_ZERO) / STEPS_PER_OCTAVE))


def _shift_for(gaussian: bool, sigma: float) -> int:
    # Keep the coded part j = r >> shift within a few units of spread, so the
    # 64-symbol alphabet holds all but a negligible tail, while the raw low
    # bits stay close to uniform (their density changes little across a bin).
    width = sigma / (6.0 if gaussian else 3.0)
    b = 0
    while width > 1.0 and b < MAX_SHIFT:
        width /= 2.0
        b += 1
    return b


def _laplace_cdf(x: float, sigma: float) -> float:
    """P(R < x) for a continuous Laplace of scale sigma (used for bins wider than one step)."""
    if x < 0:
        return 0.5 * math.exp(x / sigma)
    return 1.0 - 0.5 * math.exp(-x / sigma)


def _gauss_cdf(x: float, sigma: float) -> float:
    return 0.5 * (1.0 + math.erf(x / (sigma * math.sqrt(2.0))))


def _bin_probs(gaussian: bool, sigma: float, b: int) -> list[float]:
    """Probability of each j in [-32, 32) and of the tails (last item)."""
    width = float(1 << b)
    if b == 0 and sigma < 4.0:
        # Narrow: sum the discrete distribution exactly over a wide enough support.
        w = [
            math.exp(-(r * r) / (2.0 * sigma * sigma)) if gaussian else math.exp(-abs(r) / sigma)
            for r in range(-512, 513)
        ]
        total = math.fsum(w)
        probs = [w[j + 512] / total for j in range(-J_OFFSET, J_OFFSET)]
        tail = max(0.0, 1.0 - math.fsum(probs))
        return probs + [tail]
    cdf = _gauss_cdf if gaussian else _laplace_cdf
    # Integer r maps to [r - 0.5, r + 0.5); bin j holds r in [j*w, (j+1)*w).
    edges = [cdf(j * width - 0.5, sigma) for j in range(-J_OFFSET, J_OFFSET + 1)]
    probs = [edges[k + 1] - edges[k] for k in range(2 * J_OFFSET)]
    tail = edges[0] + (1.0 - edges[-1])
    return probs + [tail]


def _quantize(probs: list[float]) -> list[int]:
    """12-bit frequencies summing to 4096 (deterministic integer steps after one rounding).

    A value whose probability rounds to zero gets frequency 0 and is coded
    through the escape symbol, which always keeps at least 1: a narrow
    distribution then wastes nothing on 63 symbols it never sees.  No symbol
    gets more than ``MAX_FREQ``, so every symbol costs at least
    log2(4096/4032) = 0.023 bits; that bounds how many elements a given
    number of encoded bytes can claim to hold (see ``MIN_SYMBOL_BITS``).
    """
    f = [int(math.floor(p * PROB_SCALE + 0.5)) for p in probs]
    f[ESCAPE] = max(1, f[ESCAPE])
    diff = PROB_SCALE - sum(f)
    # Give or take the rounding error at the largest bins: the relative change
    # there costs the least code length.
    order = sorted(range(ESCAPE), key=lambda k: (-f[k], k))
    k = 0
    while diff != 0:
        i = order[k % len(order)]
        if diff > 0:
            f[i] += 1
            diff -= 1
        elif f[i] > 1:
            f[i] -= 1
            diff += 1
        k += 1
    top = max(range(ESCAPE), key=lambda k: (f[k], -k))
    if f[top] > MAX_FREQ:
        # Spill the excess onto the two neighbours of the peak.
        excess = f[top] - MAX_FREQ
        f[top] = MAX_FREQ
        left, right = max(top - 1, 0), min(top + 1, ESCAPE - 1)
        f[left] += excess // 2
        f[right] += excess - excess // 2
    return f


def _entry_stats(gaussian: bool, sigma: float, b: int, freq: list[int]) -> tuple[float, float, float]:
    p = np.asarray(freq, dtype=np.float64) / PROB_SCALE
    j = np.arange(-J_OFFSET, J_OFFSET, dtype=np.float64)
    width = float(1 << b)
    centre = j * width + (width - 1.0) / 2.0  # mean r within bin j
    nz = p[p > 0]
    entropy = float(-(nz * np.log2(nz)).sum()) + b
    if gaussian:
        second = centre * centre + (width * width - 1.0) / 12.0
        mean = float((p[:-1] * second).sum())
        lam = math.log2(math.e) / (2.0 * sigma * sigma)
    else:
        mean = float((p[:-1] * np.abs(centre)).sum())
        lam = math.log2(math.e) / sigma
    return mean, lam, entropy


def _build() -> Library:
    freq = np.zeros((NUM_ENTRIES, NUM_SYMBOLS), dtype=np.uint16)
    shift = np.zeros(NUM_ENTRIES, dtype=np.uint8)
    mean = np.zeros(NUM_ENTRIES)
    lam = np.zeros(NUM_ENTRIES)
    ent = np.zeros(NUM_ENTRIES)
    for shape in (0, 1):
        gaussian = shape == 1
        for u in range(SCALES_PER_SHAPE):
            e = shape * SCALES_PER_SHAPE + u
            sigma = scale_of(u)
            b = _shift_for(gaussian, sigma)
            f = _quantize(_bin_probs(gaussian, sigma, b))
            freq[e] = f
            shift[e] = b
            mean[e], lam[e], ent[e] = _entry_stats(gaussian, sigma, b, f)
    cum = np.zeros((NUM_ENTRIES, NUM_SYMBOLS + 1), dtype=np.uint32)
    cum[:, 1:] = np.cumsum(freq, axis=1)
    for arr in (freq, cum, shift, mean, lam, ent):
        arr.setflags(write=False)
    return Library(freq, cum, shift, mean, lam, ent)


def library_hash(lib: Library) -> int:
    """xxh3-64 of the frequency and shift tables (what decoding depends on)."""
    return xxhash.xxh3_64_intdigest(lib.freq.tobytes() + lib.shift.tobytes())


@lru_cache(maxsize=1)
def library() -> Library:
    """The library, built on first use (a few milliseconds) and verified."""
    lib = _build()
    got = library_hash(lib)
    if got != LIBRARY_HASH:
        raise CodecError(
            f"cachegen distribution library hashes to {got:#018x}, expected {LIBRARY_HASH:#018x}: "
            "this platform computes the tables differently and cannot decode portable chunks"
        )
    return lib
