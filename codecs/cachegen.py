"""``cachegen``: CacheGen-style KV compression (Liu et al., SIGCOMM 2024), done better.

The three observations of the paper, and what this codec does with each:

* **Nearby tokens have similar KV.**  Values are quantized on a fixed grid
  first, then each channel is coded as residuals against a predictor: the
  group anchor of the paper (the first token of each group of ``G`` tokens,
  anchors chained to the previous anchor), or the previous token, or a short
  or long running average of the channel.  The encoder picks the cheapest per
  (layer, K/V, channel) and records it in two bits.  Prediction happens on the
  integer grid, so it is lossless and quantization errors never accumulate.
* **Shallow and deep layers differ in sensitivity.**  The grid step of every
  (layer, K/V) is the level's base step times a per-depth factor times the
  layer's own spread (RMS of its channel-centred values), so each layer gets
  its own number of bins.  The depth factors were measured on SmolLM2 (see
  docs/codecs.md).
* **Values grouped by (layer, channel) have low entropy.**  Each (layer, K/V,
  channel) codes its residuals with its own distribution, chosen from a fixed
  library of 256 (:mod:`~kvstore.codecs.cachegen_library`) and named by one
  byte, and an rANS coder (16 interleaved lanes, 12-bit probabilities) codes
  them within a fraction of a percent of their ideal code length.

Sections of an encoded chunk (after the common header of
:mod:`~kvstore.codecs.format`), with S = layers x 2 streams of C = kv_heads x
head_dim channels::

    0 params   u16 G, u16 lanes, u32 reserved, float32 step[layers * 2]
    1 side     u8 row0_entry[S], u8 entry[S * C], modes (2 bits each)
    2 dir      u32 word_bytes[S], u32 escape_bytes[S]
    3 words    rANS words, 16-bit little-endian, stream after stream
    4 raw      raw low bits, each stream byte-aligned (sizes follow from side)
    5 escapes  zigzag varints, stream after stream

Encoding and decoding run in the compiled kernel on CPU
(:mod:`~kvstore.codecs.cachegen_native`: AVX2 rANS with a scalar fallback, every
core) and in torch on other devices (:mod:`~kvstore.codecs.cachegen_torch`); all
produce and accept the same bytes.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from kvstore.codecs import cachegen_native as native
from kvstore.codecs import format as fmt
from kvstore.codecs.base import Codec
from kvstore.codecs.cachegen_library import MIN_SYMBOL_BITS, library
from kvstore.codecs.tensor_bytes import as_numpy_bits
from kvstore.errors import CodecError

LANES = 16
NUM_MODES = 4
_PARAMS = struct.Struct("<HHI")


@dataclass(frozen=True)
class Level:
    """One compression level: grid step relative to each layer's spread, per depth."""

    base: float
    """Step as a fraction of the layer's RMS (smaller = finer = larger output)."""
    key_depth: tuple[float, ...] = (1.0,)
    """Factors over equal slices of depth (first slice = shallowest layers) for keys."""
    value_depth: tuple[float, ...] = (1.0,)
    group: int = 16
    """Anchor group size G, in tokens."""

    def factor(self, layer: int, layers: int, kv: int) -> float:
        prof = self.key_depth if kv == 0 else self.value_depth
        return prof[min(len(prof) - 1, layer * len(prof) // max(1, layers))]

    def scales(self, layers: int) -> np.ndarray:
        """``base x factor`` of every (layer, K/V) stream, float64 [layers * 2] (read-only)."""
        return _scales(self, layers)


@lru_cache(maxsize=64)
def _scales(level: Level, layers: int) -> np.ndarray:
    out = np.array([level.base * level.factor(lk // 2, layers, lk % 2) for lk in range(layers * 2)])
    out.setflags(write=False)
    return out


# Depth profiles chosen on SmolLM2-135M (docs/codecs.md): relative to each
# layer's own spread, the middle layers are the most sensitive (finer grid) and
# the first slice of keys the least.  A flat profile costs 19% more KL
# divergence at the same size.
_KEY_DEPTH = (1.6, 1.25, 0.7, 0.6, 0.6, 1.0)
_VALUE_DEPTH = (1.4, 1.0, 1.1, 0.75, 0.8, 0.8)

LEVELS: dict[int, Level] = {
    0: Level(0.02, _KEY_DEPTH, _VALUE_DEPTH),  # near-lossless, about 7.6 bits per element
    1: Level(0.15, _KEY_DEPTH, _VALUE_DEPTH),
    2: Level(0.4, _KEY_DEPTH, _VALUE_DEPTH),
    3: Level(0.8, _KEY_DEPTH, _VALUE_DEPTH),
    4: Level(1.2, _KEY_DEPTH, _VALUE_DEPTH),  # default: about 1.9 bits, perplexity within noise
    5: Level(1.6, _KEY_DEPTH, _VALUE_DEPTH),  # smallest
}
DEFAULT_LEVEL = 4


@dataclass(frozen=True)
class Geometry:
    """Dimensions of a chunk as the coder sees them."""

    layers: int
    tokens: int
    heads: int
    head_dim: int

    @property
    def streams(self) -> int:
        """One stream per (layer, K/V): each ends with 32 lane states (128 bytes),
        so fewer, longer streams waste less; 2 x layers is still plenty of
        parallel work for the CPU threads."""
        return self.layers * 2

    @property
    def channels(self) -> int:
        """Channels of a stream: every kv head's head_dim values of one token."""
        return self.heads * self.head_dim

    @property
    def per_stream(self) -> int:
        return self.tokens * self.channels

    @classmethod
    def of(cls, shape: tuple[int, ...]) -> Geometry:
        L, _, T, H, D = shape
        return cls(L, T, H, D)


@dataclass
class Encoded:
    """The coder's output for one chunk, before it is laid out in sections."""

    steps: np.ndarray  # float32 [L*2]
    group: int
    row0: np.ndarray  # uint8 [S]
    entries: np.ndarray  # uint8 [S, D]
    modes: np.ndarray  # uint8 [S, D]
    words: Sequence[bytes | memoryview]  # per stream
    raw: Sequence[bytes | memoryview]
    escapes: Sequence[bytes | memoryview]


def moment_stride(tokens: int) -> int:
    """Token stride of the spread estimate: every 4th token of long chunks is
    plenty for a scale, and saves a pass over the input."""
    return 4 if tokens >= 64 else 1


def layer_steps(
    sums: np.ndarray, sumsq: np.ndarray, geo: Geometry, level: Level, samples: int | None = None
) -> np.ndarray:
    """Grid step per (layer, K/V) from per-channel sums over ``samples`` tokens.

    ``sums``/``sumsq`` are float64 [S, C].  The spread is the RMS of the
    channel-centred values, so a channel's constant offset (keys have large
    ones) does not coarsen the grid for everybody else.

    The compiled kernel computes the same per stream (``stream_step`` in
    codecs/_cachegen.c); channels are summed in order (``cumsum``, not numpy's
    pairwise sums) so both give the same float64 values from the same sums.
    """
    T = samples or geo.tokens
    D = geo.channels
    s = sums.reshape(geo.layers * 2, D)
    q = sumsq.reshape(geo.layers * 2, D)
    var = np.cumsum(np.maximum(q / T - (s / T) ** 2, 0.0), axis=1)[:, -1] / D
    spread = np.sqrt(var)
    whole = np.sqrt(np.cumsum(q, axis=1)[:, -1] / D / T)
    spread = np.where(spread > 0, spread, np.where(whole > 0, whole, 1.0))
    # Bound |q| to about 2**20 steps so symbols and escapes stay small.
    floor = np.sqrt(q.max(axis=1)) / (1 << 20)
    steps = np.maximum(level.scales(geo.layers) * spread, floor)
    steps = np.where(np.isfinite(steps) & (steps > 0), steps, 1.0)
    return steps.astype(np.float32)


def raw_bytes_per_stream(entries: np.ndarray, row0: np.ndarray, tokens: int) -> np.ndarray:
    """Bytes of raw low bits each stream holds (fixed by its side information)."""
    shift = library().shift.astype(np.int64)
    D = entries.shape[1]
    bits = D * shift[row0] + (tokens - 1) * shift[entries].sum(axis=1)
    return np.asarray((bits + 7) // 8, dtype=np.int64)


def pack_sections(enc: Encoded, geo: Geometry) -> list[bytes]:
    S = geo.streams
    flat = enc.modes.reshape(-1).astype(np.uint8)
    modes = np.concatenate([flat, np.zeros((-flat.size) % 4, np.uint8)]).reshape(-1, 4)
    packed_modes = (modes[:, 0] | (modes[:, 1] << 2) | (modes[:, 2] << 4) | (modes[:, 3] << 6)).astype(np.uint8)
    directory = np.empty((2, S), dtype="<u4")
    directory[0] = [len(w) for w in enc.words]
    directory[1] = [len(e) for e in enc.escapes]
    return [
        _PARAMS.pack(enc.group, LANES, 0) + enc.steps.astype("<f4").tobytes(),
        enc.row0.tobytes() + enc.entries.tobytes() + packed_modes.tobytes(),
        directory.tobytes(),
        b"".join(enc.words),
        b"".join(enc.raw),
        b"".join(enc.escapes),
    ]


@dataclass
class Parsed:
    """Validated sections, as arrays, with each stream's byte offsets."""

    group: int
    steps: np.ndarray  # float32 [L*2]
    row0: np.ndarray
    entries: np.ndarray  # [S, D]
    modes: np.ndarray  # [S, D]
    words: memoryview
    raw: memoryview
    escapes: memoryview
    word_off: np.ndarray  # int64 [S+1]
    raw_off: np.ndarray
    esc_off: np.ndarray


def parse_sections(sections: list[memoryview], geo: Geometry) -> Parsed:
    """Check every size against the geometry; raise CodecError on any mismatch."""
    S, D = geo.streams, geo.channels
    if len(sections) != 6:
        raise CodecError(f"cachegen payload has {len(sections)} sections, expected 6")
    params, side, directory, words, raw, escapes = sections
    if params.nbytes != _PARAMS.size + 4 * geo.layers * 2:
        raise CodecError("cachegen params section has the wrong size")
    group, lanes, _ = _PARAMS.unpack_from(params, 0)
    if lanes != LANES or group < 1:
        raise CodecError(f"cachegen params invalid: lanes {lanes}, group {group}")
    steps = np.frombuffer(params, dtype="<f4", offset=_PARAMS.size).astype(np.float32)
    if not np.all(np.isfinite(steps)) or np.any(steps <= 0):
        raise CodecError("cachegen steps must be finite and positive")
    mode_bytes = -(-(S * D) // 4)
    if side.nbytes != S + S * D + mode_bytes or directory.nbytes != 8 * S:
        raise CodecError("cachegen side information has the wrong size")
    side_arr = np.frombuffer(side, dtype=np.uint8)
    row0 = side_arr[:S]
    entries = side_arr[S : S + S * D].reshape(S, D)
    pm = side_arr[S + S * D :]
    modes = np.stack([(pm >> (2 * k)) & 3 for k in range(4)], axis=1).reshape(-1)[: S * D].reshape(S, D)
    dir_arr = np.frombuffer(directory, dtype="<u4").reshape(2, S).astype(np.int64)
    word_off = np.concatenate([[0], np.cumsum(dir_arr[0])])
    esc_off = np.concatenate([[0], np.cumsum(dir_arr[1])])
    raw_off = np.concatenate([[0], np.cumsum(raw_bytes_per_stream(entries, row0, geo.tokens))])
    if word_off[-1] != words.nbytes or esc_off[-1] != escapes.nbytes or raw_off[-1] != raw.nbytes:
        raise CodecError("cachegen directory does not match the section sizes")
    if np.any(dir_arr[0] % 2) or np.any(dir_arr[0] < 4 * LANES):
        raise CodecError("cachegen word streams must hold at least the lane states, in whole words")
    return Parsed(group, steps, row0, entries, modes, words, raw, escapes, word_off, raw_off, esc_off)


class CachegenCodec(Codec):
    """CacheGen with anchor/delta prediction, layer-wise bins and a per-channel rANS."""

    name = "cachegen"
    codec_id = 4
    levels = tuple(LEVELS)
    default_level = DEFAULT_LEVEL
    needs_kv_layout = True

    def max_expansion(self, header: fmt.Header) -> float:
        # Every symbol costs at least MIN_SYMBOL_BITS (no frequency exceeds
        # 4032/4096), so a byte of rANS words holds at most 8 / 0.0227 = 352
        # symbols; 25% margin covers the per-lane state overhead.
        return header.dtype.itemsize * 8.0 / MIN_SYMBOL_BITS * 1.25

    def _encode_sections(self, kv: torch.Tensor, level: int) -> list[bytes]:
        geo = Geometry.of(tuple(kv.shape))
        lv = LEVELS[level]
        if kv.device.type == "cpu" and native.available():
            enc = _encode_native(kv, geo, lv)
        else:
            from kvstore.codecs import cachegen_torch

            enc = cachegen_torch.encode(kv, geo, lv)
        return pack_sections(enc, geo)

    def _decode_sections(
        self, header: fmt.Header, sections: list[memoryview], device: torch.device
    ) -> torch.Tensor:
        geo = Geometry.of(header.shape)
        parsed = parse_sections(sections, geo)
        if device.type == "cpu" and native.available():
            return _decode_native(parsed, geo, header.dtype)
        from kvstore.codecs import cachegen_torch

        return cachegen_torch.decode(parsed, geo, header.dtype, device)


def _dtype_code(dtype: torch.dtype) -> int:
    return fmt.dtype_code(dtype)


_local = threading.local()


def _out_buffers(S: int, cap_words: int, cap_raw: int, cap_esc: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernel's output regions (one per stream, worst-case capacity), kept
    per calling thread: the coder writes only the start of each region, and
    reusing them saves the page faults of fresh memory on every chunk.  The
    sections are joined into the payload before this thread encodes again."""
    key = (S, cap_words, cap_raw, cap_esc)
    bufs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = getattr(_local, "bufs", None)
    if bufs is None or getattr(_local, "key", None) != key:
        bufs = (np.empty((S, cap_words), np.uint16), np.empty((S, cap_raw), np.uint8), np.empty((S, cap_esc), np.uint8))
        _local.bufs, _local.key = bufs, key
    return bufs


def _encode_native(kv: torch.Tensor, geo: Geometry, level: Level) -> Encoded:
    mod = native.module()
    x = as_numpy_bits(kv)
    dt = _dtype_code(kv.dtype)
    # The kernel sees each (layer, K/V) as one head of C channels: rows of a
    # stream are contiguous in the LKTHD layout.
    S, D, T = geo.streams, geo.channels, geo.tokens
    n = geo.per_stream
    scales = level.scales(geo.layers)
    steps = np.empty(S, np.float32)  # the kernel measures each stream's spread (see layer_steps)
    entries = np.empty((S, D), np.uint8)
    modes = np.empty((S, D), np.uint8)
    row0 = np.empty(S, np.uint8)
    nwords = np.empty(S, np.uint32)
    nraw = np.empty(S, np.uint32)
    nesc = np.empty(S, np.uint32)
    cap_words, cap_raw, cap_esc = n + 2 * LANES + 8, (n * 24 + 7) // 8, n * 5
    words, raw, esc = _out_buffers(S, cap_words, cap_raw, cap_esc)

    def work(ctr: np.ndarray) -> None:
        mod.encode(
            x, dt, T, 1, D, level.group, moment_stride(T), S, ctr, scales, steps, entries, modes, row0,
            words, cap_words, nwords, raw, cap_raw, nraw, esc, cap_esc, nesc,
        )

    native.run_parallel(S, work)
    # ndarray.data, not memoryview(ndarray): numpy < 2.4's stubs (vLLM pins numpy < 2.4
    # through mistral_common) do not declare ndarrays as buffers.
    wv, rv, ev = words.data.cast("B"), raw.data.cast("B"), esc.data.cast("B")
    return Encoded(
        steps=steps,
        group=level.group,
        row0=row0,
        entries=entries,
        modes=modes,
        # Views into the kernel's buffers (little-endian host, checked by the kernel).
        words=[wv[2 * s * cap_words : 2 * (s * cap_words + int(nwords[s]))] for s in range(S)],
        raw=[rv[s * cap_raw : s * cap_raw + int(nraw[s])] for s in range(S)],
        escapes=[ev[s * cap_esc : s * cap_esc + int(nesc[s])] for s in range(S)],
    )


def _decode_native(p: Parsed, geo: Geometry, dtype: torch.dtype) -> torch.Tensor:
    mod = native.module()
    out = torch.empty((geo.layers, 2, geo.tokens, geo.heads, geo.head_dim), dtype=dtype)
    out_np = as_numpy_bits(out)  # shares memory with `out`
    entries = np.ascontiguousarray(p.entries)
    modes = np.ascontiguousarray(p.modes)
    row0 = np.ascontiguousarray(p.row0)
    dt = _dtype_code(dtype)
    S = geo.streams

    def work(ctr: np.ndarray) -> None:
        mod.decode(
            out_np, dt, geo.tokens, 1, geo.channels, p.group, S, ctr, p.steps, entries, modes,
            row0, p.words, p.word_off, p.raw, p.raw_off, p.escapes, p.esc_off,
        )

    try:
        native.run_parallel(S, work)
    except ValueError as exc:
        raise CodecError(f"cachegen payload is corrupt: {exc}") from exc
    return out
