"""LoRA (Hu et al. 2021): a frozen Linear W plus a trained low-rank update, y = W x + b + s·B A x.

`LoRALinear` is an `nn.Linear` subclass swapped in for each targeted Linear (`apply_lora`): it
keeps the original `weight` and `bias` Parameters (same names, same tensors, so checkpoints keep
the base layout) and adds `lora_A` (rank × in, Kaiming-uniform as in `peft`) and `lora_B`
(out × rank, zeros: the model starts exactly as the base), scaled by s = alpha / rank, with
dropout on the branch's input. `disabled` turns the update off (the base's own outputs, e.g. a
DPO reference); `merge` folds s·B A into the weight, `unmerge` takes it out again.

Subclasses (QLoRA, `lmforge.adapters.qlora`) override `base_forward(x)` (how W x + b is
computed, e.g. from NF4 weights) and reuse the rest. The stable API: `LoRALinear.from_linear(
linear, rank, alpha, dropout)`, `lora_A`, `lora_B`, `scaling`, `delta(x)`, `base_forward(x)`,
`disabled`, `merged`, `delta_weight()`, `merge()`, `unmerge()`.

Targets (`lora_targets`) are module-name patterns, shell globs (`fnmatch`): a pattern matches a
module whose dotted name it matches whole, or whose name ends with `.` + the pattern (`qkv`
matches `blocks.0.attn.qkv`; `blocks.1.*` matches everything in block 1). A matched Linear is
adapted; a matched other module (`attn`, `mlp`, an MoE layer) has every Linear inside it adapted,
except an MoE router (it is read by weight, not called: an adapter there would do nothing).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.models.moe import MoE


class LoRALinear(nn.Linear):
    """A Linear with a low-rank update; build it with `from_linear` (shares the Linear's tensors)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int = 8,
                 alpha: float = 16.0, dropout: float = 0.0, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.add_lora(rank, alpha, dropout)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
        """A LoRALinear holding `linear`'s own weight and bias Parameters (no copy), with a fresh
        update (A Kaiming-uniform, B zero: the output is the Linear's until B is trained)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.add_lora(rank, alpha, dropout)
        return new

    def add_lora(self, rank: int, alpha: float, dropout: float) -> None:
        w = self.weight
        # the adapter's dtype: the weight's when it is a float (fp32 training, bf16 inference),
        # fp32 when the weight is stored packed (QLoRA's NF4 codes)
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's (and nn.Linear's) init
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self.merged = False

    def base_forward(self, x: Tensor) -> Tensor:
        """W x + b of the frozen base (QLoRA overrides it)."""
        return F.linear(x, self.weight, self.bias)

    def delta(self, x: Tensor) -> Tensor:
        """The update s · B A dropout(x)."""
        return F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_forward(x)
        if self.disabled or self.merged:
            return out
        return out + self.delta(x).to(out.dtype)

    def delta_weight(self) -> Tensor:
        """s · B A, (out, in): what `merge` adds to the weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the weight (forward then costs what the plain Linear costs)."""
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear with the update folded in (the base weight tensor itself is updated)."""
        self.merge()
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


# ---- targets ----------------------------------------------------------------------------------


def name_matches(name: str, pattern: str) -> bool:
    """Whether module `name` matches `pattern`: a glob over the whole dotted name or its tail."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def routers(model: nn.Module) -> set[int]:
    return {id(m.router) for m in model.modules() if isinstance(m, MoE)}


def lora_target_names(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The names of the Linear modules `patterns` select (see the module docstring), in model order.

    A pattern that selects no Linear is a UserError naming it and listing some Linear names.
    """
    modules = dict(model.named_modules())
    skip = routers(model)
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear) and id(m) not in skip]
    chosen: set[str] = set()
    for pattern in patterns:
        hits = set()
        for name, module in modules.items():
            if not name or not name_matches(name, pattern):
                continue
            if isinstance(module, nn.Linear):
                if id(module) in skip:
                    raise UserError(f"lora target {pattern!r} matches the MoE router {name!r}, which is read by "
                                    "weight, not called: LoRA cannot adapt it; target the experts' Linears")
                hits.add(name)
            else:
                hits.update(n for n in linears if n.startswith(name + "."))
        if not hits:
            some = ", ".join(short_list(linears))
            raise UserError(f"adapter.lora_targets: pattern {pattern!r} matches no Linear module of this model; "
                            f"its Linears are named like {some}")
        chosen |= hits
    return [n for n in linears if n in chosen]


def short_list(names: Iterable[str], n: int = 8) -> list[str]:
    """A few distinct names: block 0's and the others outside numbered layers."""
    names = list(names)
    keep = [x for x in names if ".0." in x + "." or not any(c.isdigit() for c in x)]
    keep = keep or names
    return keep[:n] + (["..."] if len(keep) > n else [])


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def tied_to_embedding(model: nn.Module, linear: nn.Linear) -> bool:
    return any(isinstance(m, nn.Embedding) and m.weight is linear.weight for m in model.modules())


def apply_lora(model: nn.Module, patterns: Sequence[str], rank: int, alpha: float, dropout: float = 0.0, *,
               cls: type[LoRALinear] = LoRALinear, freeze: bool = True) -> list[str]:
    """Swap every selected Linear for `cls.from_linear(...)` in place; with `freeze`, every other
    parameter stops requiring gradients (the base is frozen). Returns the adapted names."""
    names = lora_target_names(model, patterns)
    for name in names:
        linear = model.get_submodule(name)
        if isinstance(linear, LoRALinear):
            raise UserError(f"adapter.lora_targets: {name!r} has a LoRA adapter already")
        if tied_to_embedding(model, linear):
            raise UserError(f"adapter.lora_targets: {name!r} shares its weight with the token embeddings "
                            "(tied); an update there cannot be merged; leave it out of the patterns")
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in names:
        set_submodule(model, name, cls.from_linear(model.get_submodule(name), rank, alpha, dropout))
    return names


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear with a plain nn.Linear holding W + s·B A (in place; returns model)."""
    for name, module in lora_modules(model):
        set_submodule(model, name, module.to_linear())
    return model
