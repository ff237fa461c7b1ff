"""NF4: QLoRA's 4-bit NormalFloat storage of frozen weights (Dettmers et al. 2023), in plain torch.

A weight is cut into blocks of `block` (64) consecutive values (row-major); each block keeps its
absolute maximum, and each value divided by it is rounded to the nearest of the 16 NF4 levels
(`NF4_LEVELS`: quantiles of a standard normal, scaled to [-1, 1], with an exact 0). Two 4-bit
codes share one byte, the first value in the high nibble. Double quantization stores the block
maxima themselves in 8 bits: their mean is subtracted (`offset`, fp32) and the rest is quantized
blockwise, in blocks of 256, to the nearest level of the signed 8-bit dynamic code
(`dynamic_levels`, Dettmers 2015) with one fp32 scale per block — 4 + 8/64 + 32/(64*256) = 4.127
bits per weight. Layout and arithmetic are bitsandbytes' (`quantize_4bit(..., quant_type="nf4",
compress_statistics=True)`); tests/test_qlora.py holds the two equal on the same tensors. The
level tables are module constants, not stored per tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

NF4_BLOCK = 64  # weights per absmax (QLoRA)
DQ_BLOCK = 256  # absmax values per fp32 scale under double quantization
DEQUANT_CHUNK = 1 << 20  # values dequantized at a time (bounds the fp32 temporaries)

# the 16 NF4 levels (QLoRA paper, appendix E; sorted, so a level's index is its code)
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


# (kind, device) -> table; a plain dict, not functools.cache, which torch.compile would trace through
_TABLES: dict[tuple[str, torch.device], Tensor] = {}


def level_table(kind: str, device: torch.device) -> Tensor:
    """A cached fp32 table on `device`: "nf4" or "dynamic" (the sorted levels; a level's index is
    its code), "nf4/mid" or "dynamic/mid" (the midpoints between neighbouring levels), or
    "nf4/pairs" (the two NF4 levels of each packed byte, high nibble first, as one 8-byte int64
    per byte: a 1-D `index_select` of these is ~20x faster on CPU than a (256, 2) gather)."""
    key = (kind, torch.device(device))
    if key not in _TABLES:
        name, _, part = kind.partition("/")
        table = torch.tensor(NF4_LEVELS if name == "nf4" else dynamic_levels(), dtype=torch.float32, device=device)
        if part == "mid":
            table = (table[:-1] + table[1:]) / 2
        elif part == "pairs":
            byte = torch.arange(256, device=device)
            table = torch.stack([table[byte >> 4], table[byte & 0xF]], dim=1).contiguous().view(torch.int64)
        _TABLES[key] = table.reshape(-1)
    return _TABLES[key]


def dynamic_levels(max_exponent_bits: int = 7, total_bits: int = 8) -> list[float]:
    """The signed 8-bit dynamic (tree) code: per decimal exponent 10^-6 .. 10^0, 2^i evenly spaced
    fractions in [0.1, 1] (bucket means), both signs, plus 0 and 1; 256 sorted levels."""
    data: list[float] = []
    fraction_bits = total_bits - 1 - max_exponent_bits
    for i in range(max_exponent_bits):
        bounds = torch.linspace(0.1, 1, 2 ** (i + fraction_bits) + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)  # (products in fp32, as bitsandbytes forms them)
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 2 ** total_bits
    return sorted(data)


def _blockwise(flat: Tensor, block: int, kind: str) -> tuple[Tensor, Tensor]:
    """Codes (int64, one per value) and fp32 absmax per block (the last block may be short)."""
    mid = level_table(f"{kind}/mid", flat.device)
    n = flat.numel()
    full = n - n % block
    head = flat[:full].reshape(-1, block)
    absmax = head.abs().amax(dim=-1)
    scaled = torch.clamp(head * (1.0 / absmax.clamp(min=1e-38).unsqueeze(1)), -1, 1).reshape(-1)
    if full < n:  # a short last block (its stored max: clamped for NF4, as bitsandbytes does, raw for 8 bits)
        last = flat[full:].abs().max()
        tiny = last.clamp(min=1e-38)
        absmax = torch.cat([absmax, (tiny if kind == "nf4" else last).reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tiny, -1, 1)])
    return torch.bucketize(scaled, mid, out_int32=True), absmax


def _scale_blocks(values: Tensor, absmax: Tensor, block: int) -> Tensor:
    """values (fp32, flat) times their block's absmax."""
    n = values.numel()
    full = n - n % block
    out = (values[:full].reshape(-1, block) * absmax[:full // block].unsqueeze(1)).reshape(-1)
    if full < n:
        out = torch.cat([out, values[full:] * absmax[-1]])
    return out


@dataclass
class NF4:
    """One quantized tensor. `absmax` is uint8 codes with double quantization (then
    `absmax_scale` and `offset` are set), else the fp32 block maxima."""

    codes: Tensor  # uint8 (ceil(numel / 2),)
    absmax: Tensor
    absmax_scale: Tensor | None
    offset: Tensor | None
    shape: torch.Size
    dtype: torch.dtype
    block: int = NF4_BLOCK

    def tensors(self) -> dict[str, Tensor]:
        out = {"codes": self.codes, "absmax": self.absmax}
        if self.absmax_scale is not None:
            out.update(absmax_scale=self.absmax_scale, offset=self.offset)
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def quantize_nf4(weight: Tensor, block: int = NF4_BLOCK, double_quant: bool = True) -> NF4:
    """NF4 codes of `weight` (any float dtype, any shape; computed in fp32)."""
    if not weight.is_floating_point():
        raise TypeError(f"NF4 quantizes floating-point tensors, got {weight.dtype}")
    flat = weight.detach().reshape(-1).float()
    q, absmax = _blockwise(flat, block, "nf4")
    if q.numel() % 2:
        q = torch.cat([q, q.new_full((1,), 7)])  # pad with the code of 0.0 (bitsandbytes pads a 0)
    q = q.to(torch.uint8)
    codes = (q[0::2] << 4) | q[1::2]
    if not double_quant:
        return NF4(codes, absmax, None, None, weight.shape, weight.dtype, block)
    offset = absmax.mean()
    q8, scale = _blockwise(absmax - offset, DQ_BLOCK, "dynamic")
    return NF4(codes, q8.to(torch.uint8), scale, offset, weight.shape, weight.dtype, block)


def block_absmax(q: NF4) -> Tensor:
    """The fp32 block maxima (decoded from 8 bits under double quantization)."""
    if q.absmax_scale is None:
        return q.absmax
    table = level_table("dynamic", q.absmax.device)
    return _scale_blocks(table[q.absmax.long()], q.absmax_scale, DQ_BLOCK) + q.offset


def dequantize_nf4(q: NF4, dtype: torch.dtype | None = None, chunk: int = DEQUANT_CHUNK) -> Tensor:
    """The tensor NF4 stands for, in `dtype` (default: the quantized tensor's own dtype).

    Decoded `chunk` values at a time into the output, so the fp32 temporaries stay small: a large
    weight costs its output plus ~14 bytes per chunk value, not ~12 bytes per weight at once.
    """
    n, dtype = math.prod(q.shape), dtype or q.dtype
    absmax = block_absmax(q)
    step = max(1, chunk // q.block) * q.block  # whole blocks (and an even count: whole bytes)
    if n <= step:
        return _decode(q, absmax, 0, n).reshape(q.shape).to(dtype)
    out = torch.empty(n, dtype=dtype, device=q.codes.device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        out[start:stop] = _decode(q, absmax, start, stop)
    return out.reshape(q.shape)


def _decode(q: NF4, absmax: Tensor, start: int, stop: int) -> Tensor:
    """fp32 values start..stop (start a multiple of the block): one lookup per packed byte."""
    codes = q.codes[start // 2:(stop + 1) // 2]
    values = torch.index_select(level_table("nf4/pairs", codes.device), 0, codes.int()).view(torch.float32)
    return _scale_blocks(values[:stop - start], absmax[start // q.block:-(-stop // q.block)], q.block)
