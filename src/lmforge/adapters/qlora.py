"""QLoRA (Dettmers et al. 2023): LoRA on top of a frozen base weight stored in 4-bit NF4.

`qlora_transform(options)` swaps each targeted Linear (`adapter.lora_targets`, as LoRA selects
them) for a `QLoRALinear`: C1's `LoRALinear` whose base weight is quantized to NF4 with
double-quantized block maxima (`lmforge.adapters.nf4`) and then dropped — the module keeps only
the packed codes and their statistics, as non-persistent uint8 buffers (0.52 bytes per weight
instead of bf16's 2; uint8, so `model.to(dtype)` cannot cast them). Non-targeted Linears stay as
they are. The forward dequantizes the weight to the compute dtype (autocast's, else the input's)
inside a custom autograd function that saves nothing of it for backward: the input gradient
dequantizes again, so at most one Linear's dequantized weight is alive at a time and no weight
gradient is ever formed. The bias stays a frozen Parameter.

Checkpoints keep the plain layout (the contract of `lmforge.train.transforms`): `state_dict()`
emits the dequantized `weight` under its usual name, and `load_state_dict` quantizes a `weight`
it is given — unless it is exactly what the module already holds (a resumed run's own frozen
weights), so a resume continues with the very codes it trained on. Under FSDP2 the adapters and
the biases are sharded like any parameter; the NF4 buffers are replicated on every rank, and DDP
is told not to re-broadcast them before every forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmforge.adapters.lora import LoRALinear, apply_lora, lora_modules
from lmforge.adapters.nf4 import NF4, dequantize_nf4, quantize_nf4
from lmforge.adapters.options import AdapterOptions
from lmforge.train.transforms import Transform

_PARTS = ("codes", "absmax", "absmax_scale", "offset")


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a Linear computes in: autocast's when it is on for x's device, else x's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class _NF4Matmul(torch.autograd.Function):
    """x @ W.T with W dequantized on the fly; nothing of W is saved, no gradient for it."""

    @staticmethod
    def forward(ctx, x: Tensor, q: NF4) -> Tensor:
        ctx.q = q  # the packed codes (references to the module's buffers, not copies)
        return x @ dequantize_nf4(q, x.dtype).t()

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ dequantize_nf4(ctx.q, grad.dtype), None


class QLoRALinear(LoRALinear):
    """A LoRALinear whose frozen base weight is held in NF4 (`quantize_` drops the float weight)."""

    nf4_shape: tuple[int, int]
    nf4_block: int
    nf4_double_quant: bool

    @torch.no_grad()
    def quantize_(self, block: int, double_quant: bool = True) -> None:
        """Quantize the weight Parameter to NF4 buffers and drop it (called once, after `from_linear`)."""
        weight = self.weight
        if weight is None:
            raise RuntimeError("this QLoRALinear is quantized already")
        self.nf4_shape, self.nf4_block, self.nf4_double_quant = tuple(weight.shape), block, double_quant
        del self.weight
        self.weight = None  # code reading `linear.weight` generically (optimizer groups by id) sees no tensor
        self.store(quantize_nf4(weight, block, double_quant))
        self.register_state_dict_post_hook(_emit_weight)
        self.register_load_state_dict_pre_hook(_load_weight)

    def store(self, q: NF4) -> None:
        """Keep q's tensors as uint8 buffers (float ones viewed as their bytes)."""
        device = self.lora_A.device
        for part in _PARTS:
            t = getattr(q, part)
            raw = None if t is None else t.detach().reshape(-1).contiguous().view(torch.uint8).to(device)
            self.register_buffer(f"nf4_{part}", raw, persistent=False)

    def nf4(self) -> NF4:
        double = self.nf4_absmax_scale is not None
        absmax = self.nf4_absmax if double else self.nf4_absmax.view(torch.float32)
        scale = self.nf4_absmax_scale.view(torch.float32) if double else None
        offset = self.nf4_offset.view(torch.float32) if double else None
        return NF4(self.nf4_codes, absmax, scale, offset, torch.Size(self.nf4_shape), torch.float32, self.nf4_block)

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        """The base weight (out, in) that NF4 stands for, in `dtype`."""
        return dequantize_nf4(self.nf4(), dtype)

    @property
    def nf4_bytes(self) -> int:
        """Bytes of the stored base weight (codes and statistics)."""
        return self.nf4().nbytes

    def base_forward(self, x: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        out = _NF4Matmul.apply(x.to(dtype), self.nf4())
        return out if self.bias is None else out + self.bias.to(dtype)

    def merge(self) -> None:
        raise NotImplementedError("a QLoRA base is NF4: folding the update into it would round it away; "
                                  "use to_linear() (dequantized base + update, a plain Linear)")

    unmerge = merge

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the dequantized base weight + s·B A (in the adapters' dtype)."""
        dtype = self.lora_A.dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.lora_A.device, dtype=dtype)
        linear.weight.copy_(self.dequantized(dtype) + self.delta_weight().to(dtype))
        if self.bias is not None:
            linear.bias = self.bias
        linear.requires_grad_(False)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nf4_block={self.nf4_block}, double_quant={self.nf4_double_quant}"


def _emit_weight(module: QLoRALinear, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: the dequantized base weight under its plain name, in the adapters' dtype."""
    state_dict[prefix + "weight"] = module.dequantized(module.lora_A.dtype)


def _load_weight(module: QLoRALinear, state_dict: dict, prefix: str, local_metadata, strict: bool,
                 missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """load_state_dict pre-hook: take `weight` out of the dict and quantize it (if it is new)."""
    key = prefix + "weight"
    if key not in state_dict:
        if strict:
            missing_keys.append(key)
        return
    weight = state_dict.pop(key)
    if tuple(weight.shape) != module.nf4_shape:
        error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, "
                          f"the shape in current model is {module.nf4_shape}")
        return
    weight = weight.to(module.nf4_codes.device)
    if not torch.equal(module.dequantized(weight.dtype), weight):
        module.store(quantize_nf4(weight, module.nf4_block, module.nf4_double_quant))


def qlora_modules(model: nn.Module) -> list[tuple[str, QLoRALinear]]:
    return [(n, m) for n, m in lora_modules(model) if isinstance(m, QLoRALinear)]


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes stored, weights represented) over the model's NF4 base weights."""
    mods = [m for _, m in qlora_modules(model)]
    return sum(m.nf4_bytes for m in mods), sum(m.nf4_shape[0] * m.nf4_shape[1] for m in mods)


def keep_codes_out_of_ddp(model: nn.Module) -> None:
    """DDP broadcasts every buffer from rank 0 before each forward; the NF4 codes are frozen and
    the same on every rank (quantized from the same weights), so DDP is told to leave them alone
    (`_ddp_params_and_buffers_to_ignore`, the attribute DDP reads from the module it wraps)."""
    names = {f"{n}.{b}" for n, m in qlora_modules(model) for b, _ in m.named_buffers() if b.startswith("nf4_")}
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    model._ddp_params_and_buffers_to_ignore = sorted(ignored | names)


def apply_qlora(model: nn.Module, options: AdapterOptions) -> list[str]:
    """LoRA on the targeted Linears (the rest of the model frozen), their base weights to NF4."""
    names = apply_lora(model, options.lora_targets, options.lora_rank, options.lora_alpha, options.lora_dropout,
                       cls=QLoRALinear)
    for name in names:
        model.get_submodule(name).quantize_(options.nf4_block, options.nf4_double_quant)
    return names


def qlora_transform(options: AdapterOptions) -> Transform:
    """The model transform of `adapter.method: qlora` (see the module docstring)."""
    def qlora(model: nn.Module) -> nn.Module:
        apply_qlora(model, options)
        keep_codes_out_of_ddp(model)
        return model

    return qlora
