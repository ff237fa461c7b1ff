"""Quantized Linear modules, swapped in for `nn.Linear` from outside the model (`quantize.py`).

Each keeps its quantized tensors as persistent buffers under the names the checkpoint stores
(`<name>.qweight`, `<name>.scales`, `<name>.zeros`, `<name>.bias`; see `formats.py` for the
arithmetic), and computes with an existing CPU kernel where PyTorch has one:

- `Int8Linear` (weight-only, per-channel): on CPU `aten._weight_int8pack_mm` (int8 weights
  read directly by the matmul) in bf16/fp16, and in an fp32 model too, with the activations
  rounded to bf16 for this matmul (the kernel's fp32 variant is ~10x slower than a plain matmul;
  casting the int8 weight to fp32 per call, as torchao's `Int8WeightOnlyConfig` does, reads and
  writes 9 bytes per weight and made int8 decoding no faster than fp32). bf16 rounding of the
  input (2^-9 relative) is below the int8 weights' own error, as for `Int4Linear`.
- `Int8DynamicLinear` (W8A8): fbgemm's dynamically quantized linear
  (`torch.ao.nn.quantized.dynamic.Linear`: int8 x int8 -> int32 matmul). fbgemm quantizes its
  input per tensor; dividing each token by its absmax first (and multiplying the output back)
  makes that a per-token activation scale. Off CPU: the same arithmetic in float.
- `Int4Linear` (weight-only, group-wise): on CPU `aten._weight_int4pack_mm_for_cpu` in bf16
  (its fp32 variant is ~15x slower than dequantizing), so the activations are rounded to bf16
  for this matmul even in an fp32 model: 4-bit weights err ~30x more than bf16 rounding of
  the input. The kernel takes layers of a multiple of 16 output features; other layers,
  other devices (or `kernel = False`) dequantize the weight per call.

The kernels' weight layouts are built lazily from the stored buffers and cached on the module
(not saved); loading new buffers drops the cache. A kernel that refuses a shape makes that
module fall back to the dequantizing path.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.adapters.qlora import compute_dtype
from lmforge.compress import formats

HALF = (torch.bfloat16, torch.float16)


class QuantLinear(nn.Module):
    """What the quantized Linears share: shapes, a bias buffer, the kernel cache."""

    kernel = True  # use the CPU kernel where there is one (False: the dequantizing path, for tests)

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.kernel_cache: dict = {}
        self.register_load_state_dict_post_hook(lambda module, keys: module.kernel_cache.clear())

    def cached(self, key, build):
        if key not in self.kernel_cache:
            self.kernel_cache.clear()
            self.kernel_cache[key] = build()
        return self.kernel_cache[key]

    def add_bias(self, y: Tensor) -> Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def set_bias(self, bias: Tensor | None) -> None:
        if bias is not None:
            self.bias = bias.detach().float().clone()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantLinear):
    """Weight-only int8, one symmetric scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None)
        m.qweight, m.scales = formats.quantize_rows_int8(linear.weight)
        m.set_bias(linear.bias)
        return m.to(linear.weight.device)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return formats.dequantize_rows_int8(self.qweight, self.scales, dtype)

    def forward(self, x: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        x = x.to(dtype)
        if self.kernel and x.device.type == "cpu" and dtype in (*HALF, torch.float32):
            kernel_dtype = dtype if dtype in HALF else torch.bfloat16
            scales = self.cached(("int8pack", kernel_dtype), lambda: self.scales.to(kernel_dtype))
            flat = x.reshape(-1, self.in_features).to(kernel_dtype)
            y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, scales)
            y = y.to(dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            y = (x @ self.qweight.t().to(dtype)) * self.scales.to(dtype)
        return self.add_bias(y)


class Int8DynamicLinear(Int8Linear):
    """W8A8: int8 weights (per channel) and int8 activations with a dynamic scale per token."""

    def forward(self, x: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        flat = x.reshape(-1, self.in_features).float()
        if self.kernel and x.device.type == "cpu" and flat.shape[0] == 1:  # one token: per tensor is per token
            y = self.cached(("fbgemm", x.device), self.fbgemm_linear)(flat)
            return self.add_bias(y.to(dtype).reshape(*x.shape[:-1], self.out_features))
        amax = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
        if self.kernel and x.device.type == "cpu":
            y = self.cached(("fbgemm", x.device), self.fbgemm_linear)(flat / amax) * amax
        else:  # the same arithmetic in float: 8-bit symmetric activation codes per token
            xq = torch.round(flat / amax * formats.INT8_MAX) * (amax / formats.INT8_MAX)
            y = xq @ self.dequantized_weight().t()
        return self.add_bias(y.to(dtype).reshape(*x.shape[:-1], self.out_features))

    def fbgemm_linear(self) -> nn.Module:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        with warnings.catch_warnings():  # quantized tensors are deprecated upstream (the kernel is not gone yet)
            warnings.simplefilter("ignore", UserWarning)
            qw = torch.quantize_per_channel(self.dequantized_weight(), self.scales.double(),
                                            torch.zeros(self.out_features, dtype=torch.long), 0, torch.qint8)
        linear = DynamicLinear(self.in_features, self.out_features, bias_=False, dtype=torch.qint8)
        linear.set_weight_bias(qw, None)
        return linear


class Int4Linear(QuantLinear):
    """Weight-only group-wise 4-bit (RTN, GPTQ or AWQ codes): packed codes, fp16 scales, uint8 zeros."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = True,
                 symmetric: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        formats.check_group_size(in_features, group_size)
        self.group_size, self.symmetric = group_size, symmetric
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=formats.SCALE_DTYPE))
        self.register_buffer("zeros", torch.full((out_features, groups), 8, dtype=torch.uint8))

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bias: Tensor | None,
                   symmetric: bool) -> Int4Linear:
        """A module holding these codes (out, in) 0..15, scales and zeros (out, in // group_size)."""
        out, n = codes.shape
        if tuple(scales.shape) != (out, n // group_size) or tuple(zeros.shape) != tuple(scales.shape):
            raise ValueError(f"scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} do not fit codes "
                             f"{tuple(codes.shape)} in groups of {group_size}")
        m = cls(n, out, group_size, bias is not None, symmetric)
        m.qweight = formats.pack_int4(codes).to(codes.device)
        m.scales = scales.detach().to(formats.SCALE_DTYPE)
        m.zeros = torch.round(zeros.detach().float()).to(torch.uint8)
        m.set_bias(bias)
        return m.to(codes.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, symmetric: bool) -> Int4Linear:
        """Round-to-nearest."""
        codes, scales, zeros = formats.quantize_groups(linear.weight, 4, group_size, symmetric)
        return cls.from_codes(codes, scales, zeros, group_size, linear.bias, symmetric)

    def codes(self) -> Tensor:
        return formats.unpack_int4(self.qweight)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return formats.dequantize_groups(self.codes(), self.scales, self.zeros, dtype)

    def forward(self, x: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        if self.kernel and x.device.type == "cpu":
            try:
                packed, scales_zeros = self.cached(("int4pack", x.device), self.int4pack)
                flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, self.group_size, scales_zeros)
                return self.add_bias(y.to(dtype).reshape(*x.shape[:-1], self.out_features))
            except RuntimeError:  # a shape the kernel does not take: dequantize instead, from now on
                self.kernel = False
        return F.linear(x.to(dtype), self.dequantized_weight(dtype), None if self.bias is None else self.bias.to(dtype))

    def int4pack(self) -> tuple[Tensor, Tensor]:
        """The CPU kernel's layout: its own packing of the codes, and per group (scale, offset) in bf16
        with w = (code - 8) * scale + offset, i.e. offset = (8 - zero) * scale."""
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().to(torch.int32), 1)
        scale = self.scales.float()
        offset = (8 - self.zeros.float()) * scale
        return packed, torch.stack([scale.t(), offset.t()], dim=-1).to(torch.bfloat16).contiguous()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, symmetric={self.symmetric}"


QUANT_MODULES = (Int8Linear, Int8DynamicLinear, Int4Linear)
