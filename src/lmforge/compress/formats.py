"""Quantized weight formats, tensor by tensor: round-to-nearest codes, scales, zero points, packing.

Integer codes are unsigned, `0 .. 2**bits - 1`, and stand for `(code - zero) * scale`:

- int8 weight-only and W8A8 (`quantize_rows_int8`): one fp32 scale per output channel
  (row), symmetric, codes stored as int8 `-127..127` (zero point 0): `w ≈ q * scale`,
  `scale = absmax / 127`.
- group-wise int4 (`quantize_groups`): each row is cut into groups of `group_size`
  consecutive input features; each group has an fp16 scale and an integer zero point
  (uint8). Symmetric: `scale = 2 absmax / 15`, zero 8 (GPTQ's convention: all 16 codes are
  used, absmax itself may round one step in); asymmetric: the range `[min(w, 0), max(w, 0)]`
  over 15 steps, zero `round(-min / scale)` (0 is always exactly representable).
  The stored scale is the fp32 one rounded *up* to fp16 and the codes are computed with it,
  so `|w - ŵ| <= scale / 2` holds for the stored scale.
- packing (`pack_int4`): two codes per byte along the input dimension, the even column in
  the low nibble, the odd column in the high nibble: (out, in) -> (out, in // 2) uint8.
"""

from __future__ import annotations

import torch
from torch import Tensor

INT8_MAX = 127
SCALE_DTYPE = torch.float16  # group scales as stored on disk (GPTQ/AWQ checkpoints use fp16 too)
TINY_SCALE = 1e-7  # an all-zero group or row: any scale works; keep it finite and nonzero in fp16


def pack_int4(codes: Tensor) -> Tensor:
    """(out, in) codes 0..15 (any integer dtype) -> (out, in // 2) uint8, two per byte (even column low)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of columns, got {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    if bool((c > 15).any()):
        raise ValueError("pack_int4: codes must be in 0..15")
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """The exact inverse of `pack_int4`: (out, in // 2) uint8 -> (out, in) uint8 codes."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def check_group_size(in_features: int, group_size: int, where: str = "") -> None:
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"{where}group size {group_size} does not divide the {in_features} input features")


def group_params(w: Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """RTN scales (fp16, as stored) and integer zero points (float) per group: (out, in // group_size) each."""
    check_group_size(w.shape[-1], group_size)
    maxq = 2**bits - 1
    g = w.detach().float().reshape(w.shape[0], -1, group_size)
    if symmetric:
        scale = 2 * g.abs().amax(dim=-1) / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        lo, hi = g.amin(dim=-1).clamp(max=0), g.amax(dim=-1).clamp(min=0)
        scale = (hi - lo) / maxq
        zero = None
    scale = round_up(scale.clamp(min=TINY_SCALE), SCALE_DTYPE)
    if zero is None:
        zero = torch.round(-lo / scale.float()).clamp(0, maxq)
    return scale, zero


def round_up(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in `dtype`, rounded up where the cast rounded down (a scale never shrinks: the range still fits)."""
    y = x.to(dtype)
    return torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def quantize_with(w: Tensor, scales: Tensor, zeros: Tensor, bits: int) -> Tensor:
    """Codes (uint8, (out, in)) of w for given group scales and zero points (the group size follows)."""
    groups = scales.shape[-1]
    g = w.detach().float().reshape(w.shape[0], groups, -1)
    q = torch.round(g / scales.float().unsqueeze(-1)) + zeros.float().unsqueeze(-1)
    return q.clamp(0, 2**bits - 1).to(torch.uint8).reshape(w.shape)


def quantize_groups(w: Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest group-wise codes of a 2-D weight (out, in).

    Returns (codes uint8 (out, in), scales fp16 (out, in // group_size), zeros uint8 (same shape));
    `dequantize_groups(codes, scales, zeros)` is the weight the codes stand for."""
    if w.dim() != 2:
        raise ValueError(f"quantize_groups takes a 2-D weight, got shape {tuple(w.shape)}")
    scales, zeros = group_params(w, bits, group_size, symmetric)
    return quantize_with(w, scales, zeros, bits), scales, zeros.to(torch.uint8)


def dequantize_groups(codes: Tensor, scales: Tensor, zeros: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(codes - zero) * scale per group: (out, in) in `dtype` (computed in fp32)."""
    out, n = codes.shape
    groups = scales.shape[-1]
    g = codes.reshape(out, groups, n // groups).float() - zeros.float().unsqueeze(-1)
    return (g * scales.float().unsqueeze(-1)).reshape(out, n).to(dtype)


def quantize_rows_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: (q int8 (out, in) in -127..127, scales fp32 (out,))."""
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / INT8_MAX).clamp(min=TINY_SCALE)
    q = torch.round(w / scales.unsqueeze(1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


def dequantize_rows_int8(q: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (q.float() * scales.float().unsqueeze(1)).to(dtype)
