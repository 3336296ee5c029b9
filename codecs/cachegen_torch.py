"""CacheGen in plain torch: the device path (CUDA, or CPU without the compiled kernel).

Same bytes as :mod:`kvstore.codecs._cachegen`: what this encodes the C kernel
decodes and vice versa, and both decoders reconstruct identical values.  Work
is vectorized across every (stream, lane) pair of a chunk at once; the only
Python loops run over rANS steps (tokens x head_dim / 32) and over tokens for
the predictors, each iteration a handful of tensor operations.  On a GPU that
makes it launch-bound (see docs/codecs.md for what it reaches and what a
dedicated kernel would need); on a CPU it is the fallback when the extension
is not built.

Integer work is int64 so unsigned 32-bit rANS states and shifts behave exactly
as in C (torch's ``>>`` on signed integers is arithmetic, like gcc's).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from kvstore.codecs.cachegen import LANES, NUM_MODES, Encoded, Geometry, Level, Parsed, layer_steps, moment_stride
from kvstore.codecs.cachegen_library import ESCAPE, J_OFFSET, PROB_BITS, PROB_SCALE, library
from kvstore.errors import CodecError

RANS_L = 1 << 15
EMA_F = 8
EMA_K = (0, 2, 5)
QMAX = 1 << 21
MODE_ANCHOR = 3


@lru_cache(maxsize=8)
def _tables(device: torch.device) -> dict[str, torch.Tensor]:
    lib = library()
    freq = torch.from_numpy(lib.freq.astype(np.int64)).to(device)
    cum = torch.from_numpy(lib.cum.astype(np.int64)).to(device)
    # slot -> symbol for every entry: symbol s owns [cum[s], cum[s] + freq[s]).
    slots = torch.arange(PROB_SCALE, device=device)
    slot2sym = (torch.searchsorted(cum[:, 1:].contiguous(), slots.expand(256, -1).contiguous(), right=True)).clamp_(max=64)
    return {
        "freq": freq,
        "cum": cum[:, :-1].contiguous(),
        "shift": torch.from_numpy(lib.shift.astype(np.int64)).to(device),
        "slot2sym": slot2sym,
        "mean": torch.from_numpy(lib.mean.copy()).to(device),
        "lam": torch.from_numpy(lib.lam.copy()).to(device),
        "ent": torch.from_numpy(lib.entropy.copy()).to(device),
    }


def _streams(kv: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """[L, 2, T, H, D] -> [S, T, C]: one stream per (layer, K/V), like the C kernel."""
    return kv.reshape(geo.streams, geo.tokens, geo.channels)


def _ema_pred(m: torch.Tensor) -> torch.Tensor:
    return (m + (1 << (EMA_F - 1))) >> EMA_F


def _ema_next(m: torch.Tensor, q: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    return m + ((q * (1 << EMA_F) - m) >> k)


# ------------------------------------------------------------------- encode


def _best_entries(stat: torch.Tensor, lo: int, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry of [lo, lo+128) with the lowest modelled cost for each statistic, and that cost."""
    mean = t["mean"][lo : lo + 128].contiguous()
    a = torch.searchsorted(mean, stat.contiguous()) + lo
    best_cost = torch.full_like(stat, float("inf"))
    best = torch.zeros_like(a)
    for off in (-2, -1, 0, 1):
        e = (a + off).clamp(lo, lo + 127)
        cost = t["ent"][e] + t["lam"][e] * (stat - t["mean"][e])
        better = cost < best_cost
        best = torch.where(better, e, best)
        best_cost = torch.where(better, cost, best_cost)
    return best, best_cost


def _choose(s1: torch.Tensor, s2: torch.Tensor, n: float, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    el, cl = _best_entries(s1 / n, 0, t)
    eg, cgs = _best_entries(s2 / n, 128, t)
    use_l = cl <= cgs
    return torch.where(use_l, el, eg), torch.where(use_l, cl, cgs)


def encode(kv: torch.Tensor, geo: Geometry, level: Level) -> Encoded:
    """Encode one chunk on ``kv.device``."""
    dev = kv.device
    t = _tables(dev)
    S, T, D, n = geo.streams, geo.tokens, geo.channels, geo.per_stream
    x = _streams(kv.float(), geo)
    every = moment_stride(T)
    sample = x[:, ::every]
    finite = torch.where(torch.isfinite(sample), sample, torch.zeros_like(sample)).double()
    sums = finite.sum(1).cpu().numpy()
    sumsq = (finite * finite).sum(1).cpu().numpy()
    steps = layer_steps(sums, sumsq, geo, level, samples=sample.shape[1])
    inv = (1.0 / torch.from_numpy(steps.copy()).to(dev)).float()
    y = x * inv[:, None, None]
    y = torch.where(torch.isnan(y), torch.zeros_like(y), y).clamp(-QMAX, QMAX)
    q = torch.round(y).to(torch.int64)  # round half to even, as the C kernel

    row0, _ = _choose(q[:, 0].abs().double().sum(1), (q[:, 0].double() ** 2).sum(1), float(D), t)

    # Measure the four predictors per channel.
    m = [q[:, 0] * (1 << EMA_F) for _ in range(3)] + [q[:, 0].clone()]
    s1 = torch.zeros(NUM_MODES, S, D, dtype=torch.float64, device=dev)
    s2 = torch.zeros_like(s1)
    for tok in range(1, T):
        v = q[:, tok]
        for md in range(3):
            r = (v - _ema_pred(m[md])).double()
            s1[md] += r.abs()
            s2[md] += r * r
            m[md] = _ema_next(m[md], v, EMA_K[md])
        r = (v - m[3]).double()
        s1[3] += r.abs()
        s2[3] += r * r
        if tok % level.group == 0:
            m[3] = v.clone()
    if T > 1:
        ents, costs = _choose(s1, s2, float(T - 1), t)
        mode = costs.argmin(0)  # first minimum on ties, like the C loop
        entries = ents.gather(0, mode[None]).squeeze(0)
    else:
        mode = torch.zeros(S, D, dtype=torch.int64, device=dev)
        entries = torch.zeros(S, D, dtype=torch.int64, device=dev)

    r = _residuals(q, mode, level.group)
    entry_of = torch.cat([row0[:, None, None].expand(S, 1, D), entries[:, None, :].expand(S, T - 1, D)], 1)
    entry_of = entry_of.reshape(S, n)
    r = r.reshape(S, n)
    b = t["shift"][entry_of]
    j = r >> b
    low = r - (j << b)
    jidx = (j + J_OFFSET).clamp(0, 63)
    ok = (j >= -J_OFFSET) & (j < J_OFFSET) & (t["freq"][entry_of, jidx] > 0)
    sym = torch.where(ok, jidx, torch.full_like(jidx, ESCAPE))

    words = _rans_encode(sym, entry_of, t)
    raw = _pack_raw(low, b)
    escapes = _pack_escapes(j, ~ok)
    return Encoded(
        steps=steps,
        group=level.group,
        row0=row0.to(torch.uint8).cpu().numpy(),
        entries=entries.to(torch.uint8).cpu().numpy(),
        modes=mode.to(torch.uint8).cpu().numpy(),
        words=words,
        raw=raw,
        escapes=escapes,
    )


def _residuals(q: torch.Tensor, mode: torch.Tensor, group: int) -> torch.Tensor:
    """Residuals of the chosen predictors, [S, T, D] (row 0: q itself)."""
    anchor = mode == MODE_ANCHOR
    k = torch.tensor(EMA_K + (0,), device=q.device)[mode]
    m = torch.where(anchor, q[:, 0], q[:, 0] * (1 << EMA_F))
    out = torch.empty_like(q)
    out[:, 0] = q[:, 0]
    for tok in range(1, q.shape[1]):
        v = q[:, tok]
        out[:, tok] = v - torch.where(anchor, m, _ema_pred(m))
        nxt_anchor = v if tok % group == 0 else m
        m = torch.where(anchor, nxt_anchor, _ema_next(m, v, k))
    return out


def _rans_encode(sym: torch.Tensor, entry: torch.Tensor, t: dict[str, torch.Tensor]) -> list[bytes]:
    """16 lock-step lanes per stream, backwards; the word order the decoder reads."""
    S, n = sym.shape
    nsteps = -(-n // LANES)
    pad = nsteps * LANES - n
    active = torch.ones(S, nsteps * LANES, dtype=torch.bool, device=sym.device)
    if pad:
        sym = torch.cat([sym, sym.new_zeros(S, pad)], 1)
        entry = torch.cat([entry, entry.new_zeros(S, pad)], 1)
        active[:, n:] = False
    f = t["freq"][entry, sym].view(S, nsteps, LANES)
    c = t["cum"][entry, sym].view(S, nsteps, LANES)
    act = active.view(S, nsteps, LANES)
    x = torch.full((S, LANES), RANS_L, dtype=torch.int64, device=sym.device)
    emitted = torch.zeros(S, nsteps, LANES, dtype=torch.bool, device=sym.device)
    word = torch.zeros(S, nsteps, LANES, dtype=torch.int64, device=sym.device)
    for k in range(nsteps - 1, -1, -1):
        fk, ck, ak = f[:, k], c[:, k], act[:, k]
        emit = (x >= (fk << 19)) & ak  # x_max = ((RANS_L >> 12) << 16) * freq
        word[:, k] = x & 0xFFFF
        emitted[:, k] = emit
        x = torch.where(emit, x >> 16, x)
        fs = torch.where(ak, fk, torch.ones_like(fk))  # padded lanes: avoid dividing by 0
        enc = ((x // fs) << PROB_BITS) + (x % fs) + ck
        x = torch.where(ak, enc, x)
    head = torch.stack([x >> 16, x & 0xFFFF], -1).reshape(S, 2 * LANES)
    counts = emitted.sum((1, 2)).cpu().tolist()
    body = word[emitted].to(torch.int32).cpu().numpy().astype("<u2")
    head_np = head.to(torch.int32).cpu().numpy().astype("<u2")
    out, pos = [], 0
    for s in range(S):
        out.append(head_np[s].tobytes() + body[pos : pos + counts[s]].tobytes())
        pos += counts[s]
    return out


def _pack_raw(low: torch.Tensor, b: torch.Tensor) -> list[bytes]:
    """Each element's ``b`` low bits, LSB first, streams byte-aligned."""
    S, n = low.shape
    total = b.sum(1)
    maxb = int(b.max()) if b.numel() else 0
    if maxb == 0:
        return [b""] * S
    start = torch.cumsum(b, 1) - b  # bit offset of each element within its stream
    nbytes = (total + 7) // 8
    base = torch.cumsum(nbytes, 0) - nbytes
    bits = torch.zeros(int(nbytes.sum()) * 8, dtype=torch.uint8, device=low.device)
    for k in range(maxb):
        sel = b > k
        pos = (base[:, None] * 8 + start + k)[sel]
        bits[pos] = ((low >> k) & 1)[sel].to(torch.uint8)
    weights = (1 << torch.arange(8, device=low.device)).to(torch.uint8)
    packed = (bits.view(-1, 8).to(torch.int32) * weights.to(torch.int32)).sum(1).to(torch.uint8).cpu().numpy()
    offs = np.concatenate([[0], np.cumsum(nbytes.cpu().numpy())])
    return [packed[offs[s] : offs[s + 1]].tobytes() for s in range(S)]


def _pack_escapes(j: torch.Tensor, esc: torch.Tensor) -> list[bytes]:
    """Zigzag varints of the escaped ``j``, stream after stream, in symbol order."""
    S = j.shape[0]
    counts = esc.sum(1).cpu().tolist()
    vals = j[esc].cpu().numpy().astype(np.int64)
    out, pos = [], 0
    for s in range(S):
        chunk = bytearray()
        for v in vals[pos : pos + counts[s]].tolist():
            z = (-(v + 1) << 1) | 1 if v < 0 else v << 1
            while True:
                byte = z & 0x7F
                z >>= 7
                chunk.append(byte | (0x80 if z else 0))
                if not z:
                    break
        out.append(bytes(chunk))
        pos += counts[s]
    return out


# ------------------------------------------------------------------- decode


def _as_tensor(view: memoryview, device: torch.device) -> torch.Tensor:
    arr = np.frombuffer(view, dtype=np.uint8).copy() if view.nbytes else np.zeros(0, np.uint8)
    return torch.from_numpy(arr).to(device)


def decode(p: Parsed, geo: Geometry, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Decode validated sections into a tensor on ``device``."""
    t = _tables(device)
    S, T, D, n = geo.streams, geo.tokens, geo.channels, geo.per_stream
    if np.any(p.modes >= NUM_MODES):
        raise CodecError("cachegen payload is corrupt: predictor mode out of range")
    entries = torch.from_numpy(p.entries.astype(np.int64)).to(device)
    row0 = torch.from_numpy(p.row0.astype(np.int64)).to(device)
    modes = torch.from_numpy(p.modes.astype(np.int64)).to(device)

    sym = _rans_decode(p, geo, entries, row0, t, device)  # [S, n]
    entry_of = torch.cat([row0[:, None, None].expand(S, 1, D), entries[:, None, :].expand(S, T - 1, D)], 1)
    entry_of = entry_of.reshape(S, n)
    b = t["shift"][entry_of]
    j = sym - J_OFFSET
    esc = sym == ESCAPE
    j = _fill_escapes(j, esc, p, device)
    low = _read_raw(b, p, device)
    r = (j * (1 << b) + low).clamp(-2 * QMAX, 2 * QMAX).view(S, T, D)

    steps = torch.from_numpy(p.steps.copy()).to(device).float()
    anchor = modes == MODE_ANCHOR
    k = torch.tensor(EMA_K + (0,), device=device)[modes]
    out = torch.empty(S, T, D, dtype=torch.float32, device=device)
    q = r[:, 0].clamp(-QMAX, QMAX)
    m = torch.where(anchor, q, q * (1 << EMA_F))
    out[:, 0] = q.float() * steps[:, None]
    for tok in range(1, T):
        pred = torch.where(anchor, m, _ema_pred(m))
        q = (pred + r[:, tok]).clamp(-QMAX, QMAX)
        anchor_next = q if tok % p.group == 0 else m
        m = torch.where(anchor, anchor_next, _ema_next(m, q, k))
        out[:, tok] = q.float() * steps[:, None]
    return out.view(geo.layers, 2, T, geo.heads, geo.head_dim).to(dtype)


def _rans_decode(
    p: Parsed, geo: Geometry, entries: torch.Tensor, row0: torch.Tensor, t: dict[str, torch.Tensor], device: torch.device
) -> torch.Tensor:
    S, D, n = geo.streams, geo.channels, geo.per_stream
    nw = np.diff(p.word_off) // 2
    maxw = int(nw.max())
    words_np = np.zeros((S, maxw), dtype=np.int64)
    raw_words = np.frombuffer(p.words, dtype="<u2")
    for s in range(S):
        words_np[s, : nw[s]] = raw_words[p.word_off[s] // 2 : p.word_off[s + 1] // 2]
    words = torch.from_numpy(words_np).to(device)
    nw_t = torch.from_numpy(nw.astype(np.int64)).to(device)
    x = (words[:, 0 : 2 * LANES : 2] << 16) | words[:, 1 : 2 * LANES : 2]
    if bool(((x < RANS_L) | (x >= 1 << 31)).any()):
        raise CodecError("cachegen payload is corrupt: rANS lane state out of range")
    pos = torch.full((S,), 2 * LANES, dtype=torch.int64, device=device)
    nsteps = -(-n // LANES)
    lane = torch.arange(LANES, device=device)
    sym = torch.empty(S, nsteps * LANES, dtype=torch.int64, device=device)
    over = torch.zeros(S, dtype=torch.bool, device=device)
    for k in range(nsteps):
        i = k * LANES + lane
        active = i < n
        c = i % D
        e = torch.where((i < D)[None, :], row0[:, None], entries[:, c])
        slot = x & (PROB_SCALE - 1)
        s_k = t["slot2sym"][e, slot]
        f = t["freq"][e, s_k]
        cm = t["cum"][e, s_k]
        nx = f * (x >> PROB_BITS) + slot - cm
        need = (nx < RANS_L) & active[None, :]
        before = torch.cumsum(need.long(), 1) - need.long()
        at = pos[:, None] + before
        over |= (need & (at >= nw_t[:, None])).any(1)
        w = words.gather(1, at.clamp(max=maxw - 1))
        nx = torch.where(need, (nx << 16) | w, nx)
        x = torch.where(active[None, :], nx, x)
        pos = pos + need.sum(1)
        sym[:, k * LANES : (k + 1) * LANES] = s_k
    if bool(over.any()):
        raise CodecError("cachegen payload is corrupt: rANS stream ends early")
    if bool((pos != nw_t).any()):
        raise CodecError("cachegen payload is corrupt: rANS stream has trailing words")
    if bool((x != RANS_L).any()):
        raise CodecError("cachegen payload is corrupt: rANS lane does not end in its initial state")
    return sym[:, :n]


def _fill_escapes(j: torch.Tensor, esc: torch.Tensor, p: Parsed, device: torch.device) -> torch.Tensor:
    S = j.shape[0]
    raw = np.frombuffer(p.escapes, dtype=np.uint8)
    counts = esc.sum(1).cpu().numpy()
    values: list[int] = []
    for s in range(S):
        seg = raw[p.esc_off[s] : p.esc_off[s + 1]]
        got = 0
        z, sh = 0, 0
        for byte in seg.tolist():
            if sh > 28:
                raise CodecError("cachegen payload is corrupt: escape varint too long")
            z |= (byte & 0x7F) << sh
            sh += 7
            if not byte & 0x80:
                values.append(-(z >> 1) - 1 if z & 1 else z >> 1)
                got += 1
                z, sh = 0, 0
        if sh or got != counts[s]:
            raise CodecError("cachegen payload is corrupt: escape list does not match the stream")
    if values:
        j = j.clone()
        j[esc] = torch.tensor(values, dtype=torch.int64, device=device)
    return j


def _read_raw(b: torch.Tensor, p: Parsed, device: torch.device) -> torch.Tensor:
    if int(b.max()) == 0:
        return torch.zeros_like(b)
    data = _as_tensor(p.raw, device).to(torch.int64)
    data = torch.cat([data, data.new_zeros(4)])  # reads below may run 3 bytes past a stream's end
    start = torch.cumsum(b, 1) - b + torch.from_numpy(p.raw_off[:-1] * 8).to(device)[:, None]
    byte = start >> 3
    word = data[byte] | (data[byte + 1] << 8) | (data[byte + 2] << 16) | (data[byte + 3] << 24)
    return (word >> (start & 7)) & ((1 << b) - 1)
