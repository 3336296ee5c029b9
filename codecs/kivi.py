"""``kivi``: KIVI asymmetric quantization (Liu et al., ICML 2024).

Keys are quantized per channel (each group is ``group_size`` consecutive
tokens of one channel), because key outliers live in fixed channels; values
per token (each group is ``group_size`` consecutive channels of one token),
because value errors mix across channels in the attention output.  Each group
stores a float16 scale and minimum.  Levels: 0 = 8 bits (the plain uniform
8-bit baseline), 1 = 4 bits, 2 = 2 bits.  Bits per element: ``bits + 32 /
group_size``.  Pure torch, so it runs on whatever device the tensor is on.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from kvstore.codecs import format as fmt
from kvstore.codecs.base import Codec
from kvstore.errors import CodecError, InvalidArgument

BITS: dict[int, int] = {0: 8, 1: 4, 2: 2}
_PARAMS = struct.Struct("<HB")


def _groups(n: int, g: int) -> int:
    return -(-n // g)


def _pad_to(x: torch.Tensor, dim: int, mult: int) -> torch.Tensor:
    """Pad ``dim`` to a multiple by repeating the last slice (keeps min and max unchanged)."""
    n = x.shape[dim]
    extra = _groups(n, mult) * mult - n
    if extra == 0:
        return x
    last = x.narrow(dim, n - 1, 1)
    return torch.cat([x, last.expand(*[extra if d == dim else s for d, s in enumerate(last.shape)])], dim)


def _float_copy(x: torch.Tensor) -> torch.Tensor:
    """A float32 copy that _quantize may overwrite (``.float()`` of float32 is the input itself)."""
    return x.to(torch.float32, copy=True)


def _quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of groups along ``dim``: codes, fp16 scale, fp16 minimum.

    ``x`` is a float32 scratch tensor: it is overwritten (in-place steps save
    a fresh buffer per step on a memory-bound path).
    """
    mn, mx = torch.aminmax(x, dim=dim, keepdim=True)
    # Scale and minimum are stored in fp16: quantize against the stored values
    # so the decoder reproduces exactly what the encoder measured.
    scale = ((mx - mn) / (2**bits - 1)).to(torch.float16)
    mn16 = mn.to(torch.float16)
    safe = torch.where(scale.float() > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    q = x.sub_(mn16.float()).div_(safe).round_().clamp_(0, 2**bits - 1).to(torch.uint8)
    return q, scale.squeeze(dim), mn16.squeeze(dim)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes < 2**bits, little-endian within each byte."""
    flat = codes.reshape(-1)
    if bits == 8:
        return flat
    per = 8 // bits
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % per)]).view(-1, per)
    out = flat[:, 0].clone()
    for i in range(1, per):
        out |= flat[:, i] << (i * bits)  # codes < 2**bits: the fields never overlap
    return out


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if bits == 8:
        return packed[:n]
    per = 8 // bits
    vals = torch.empty((packed.numel(), per), dtype=torch.uint8, device=packed.device)
    for i in range(per):
        torch.bitwise_and(packed >> (i * bits), 2**bits - 1, out=vals[:, i])
    return vals.reshape(-1)[:n]


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


class KiviCodec(Codec):
    """KIVI with a configurable group size (default 32, as in the paper)."""

    name = "kivi"
    codec_id = 3
    levels = tuple(BITS)
    default_level = 2
    needs_kv_layout = True

    def __init__(self, group_size: int = 32) -> None:
        if not 1 <= group_size < 2**16:
            raise InvalidArgument(f"kivi group_size must be in [1, 65536), got {group_size}")
        self.group_size = group_size

    def max_expansion(self, header: fmt.Header) -> float:
        # The codes alone take bits/8 bytes per element; the exact size check
        # in _decode_sections does the rest.
        return 4.0 * 8 / BITS[header.level]

    def _encode_sections(self, kv: torch.Tensor, level: int) -> list[bytes]:
        bits, g = BITS[level], self.group_size
        L, _, T, H, D = kv.shape
        C = H * D
        x = kv.reshape(L, 2, T, C)
        k = _pad_to(_float_copy(x[:, 0]), 1, g)  # [L, Tp, C]
        kq, ks, km = _quantize(k.view(L, -1, g, C), bits, dim=2)  # groups along tokens, per channel
        kq = kq.view(L, -1, C)[:, :T]
        v = _pad_to(_float_copy(x[:, 1]), 2, g)  # [L, T, Cp]
        vq, vs, vm = _quantize(v.view(L, T, -1, g), bits, dim=3)  # groups along channels, per token
        vq = vq.view(L, T, -1)[:, :, :C]
        codes = pack_bits(torch.cat([kq.reshape(-1), vq.reshape(-1)]), bits)
        return [_PARAMS.pack(g, bits), _to_bytes(ks), _to_bytes(km), _to_bytes(vs), _to_bytes(vm), _to_bytes(codes)]

    def _decode_sections(
        self, header: fmt.Header, sections: list[memoryview], device: torch.device
    ) -> torch.Tensor:
        if len(sections) != 6 or sections[0].nbytes != _PARAMS.size:
            raise CodecError("kivi payload must have 6 sections")
        g, bits = _PARAMS.unpack(sections[0])
        if bits != BITS[header.level] or g == 0:
            raise CodecError(f"kivi parameters invalid: group {g}, bits {bits}")
        L, _, T, H, D = header.shape
        C = H * D
        nk, nv = L * _groups(T, g) * C, L * T * _groups(C, g)
        ncodes = 2 * L * T * C
        want = [2 * nk, 2 * nk, 2 * nv, 2 * nv, _groups(ncodes, 8 // bits)]
        if [s.nbytes for s in sections[1:]] != want:
            raise CodecError("kivi section sizes do not match the header")

        def f16(view: memoryview, shape: tuple[int, ...]) -> torch.Tensor:
            arr = np.frombuffer(view, dtype=np.float16).copy()
            return torch.from_numpy(arr).to(device).float().reshape(shape)

        ks, km = f16(sections[1], (L, -1, C)), f16(sections[2], (L, -1, C))
        vs, vm = f16(sections[3], (L, T, -1)), f16(sections[4], (L, T, -1))
        packed = torch.from_numpy(np.frombuffer(sections[5], dtype=np.uint8).copy()).to(device)
        codes = unpack_bits(packed, bits, ncodes)
        out = torch.empty((L, 2, T, C), dtype=header.dtype, device=device)
        kq = codes[: ncodes // 2].view(L, T, C).float()
        if T % g == 0:  # broadcast the group scales instead of gathering them per token
            k = kq.view(L, -1, g, C).mul_(ks.unsqueeze(2)).add_(km.unsqueeze(2)).view(L, T, C)
        else:
            tok_group = torch.arange(T, device=device) // g
            k = kq.mul_(ks[:, tok_group]).add_(km[:, tok_group])
        out[:, 0] = k
        vq = codes[ncodes // 2 :].view(L, T, C).float()
        if C % g == 0:
            v = vq.view(L, T, -1, g).mul_(vs.unsqueeze(3)).add_(vm.unsqueeze(3)).view(L, T, C)
        else:
            ch_group = torch.arange(C, device=device) // g
            v = vq.mul_(vs[:, :, ch_group]).add_(vm[:, :, ch_group])
        out[:, 1] = v
        return out.view(header.shape)
