"""Unstructured and 2:4 sparsity as zeros in the weights (`lmforge prune --method magnitude|2:4`).

The masked weights are the Linears of the model's block stacks (`calib.block_lists`: attention
q/k/v/out, MLP up/gate/down, an MoE's experts; not an MoE router, the embeddings or the LM head),
for every architecture. `magnitude` zeroes the `sparsity` fraction of smallest-|w| weights of EACH
such Linear (per layer, not one global threshold: layers whose weights are smaller overall are not
wiped out); `2:4` zeroes, in every group of 4 consecutive input weights of a row, the 2 of smallest
|w| (NVIDIA's semi-structured sparsity; 50% by definition). The zeros are baked into the dense weights:
the checkpoint keeps its layout and size, and a dense CPU matmul is no faster.

`keep_zeros` is the model transform the recovery fine-tune runs with: each masked Linear becomes a
`MaskedLinear` (same parameters, plus a non-persistent keep mask) whose forward multiplies the weight
by its mask, so the masked weights get zero gradients and AdamW (zero moments, decoupled decay of a
zero weight) leaves them exactly zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.train.transforms import register_transform


def maskable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, Linear) of the model's block stacks (see the module docstring), in definition order."""
    from lmforge.compress.calib import block_lists

    found = []
    for stack, blocks in block_lists(model):
        for name, module in blocks.named_modules():
            if isinstance(module, nn.Linear) and not name.endswith("router"):
                found.append((f"{stack}.{name}", module))
    return found


def magnitude_mask(weight: Tensor, sparsity: float) -> Tensor:
    """Keep-mask (bool) zeroing exactly round(sparsity * numel) weights of smallest |w|."""
    n = round(sparsity * weight.numel())
    keep = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    if n:
        keep[weight.detach().abs().flatten().topk(n, largest=False).indices] = False
    return keep.view(weight.shape)


def two_four_mask(weight: Tensor, name: str = "weight") -> Tensor:
    """Keep-mask (bool) keeping the 2 largest |w| of every 4 consecutive inputs of each row."""
    rows, cols = weight.shape
    if cols % 4:
        raise UserError(f"{name}: {cols} inputs are not a multiple of 4; 2:4 sparsity needs groups of 4")
    groups = weight.detach().abs().view(rows, cols // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.view(rows, cols)


def mask_model(model: nn.Module, method: str, sparsity: float | None = None) -> dict[str, Tensor]:
    """Zero the weights `method` (magnitude with `sparsity`, or 2:4) removes, in place; returns the keep-masks."""
    masks = {}
    for name, linear in maskable_linears(model):
        keep = magnitude_mask(linear.weight, sparsity) if method == "magnitude" else two_four_mask(
            linear.weight, f"{name}.weight")
        with torch.no_grad():
            linear.weight.mul_(keep)
        masks[name] = keep
    return masks


def zero_fraction(model: nn.Module) -> float:
    """The fraction of zero weights over the maskable Linears."""
    weights = [linear.weight for _, linear in maskable_linears(model)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0


class MaskedLinear(nn.Linear):
    """A Linear whose weight is multiplied by a fixed keep mask in the forward (see `keep_zeros`)."""

    keep: Tensor

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.keep.to(self.weight.dtype), self.bias)


def _masked(linear: nn.Linear) -> MaskedLinear:
    new = MaskedLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    new.weight, new.bias = linear.weight, linear.bias  # the same Parameters: names and shapes unchanged
    new.register_buffer("keep", linear.weight.detach() != 0, persistent=False)
    new.train(linear.training)
    return new


@register_transform("keep_zeros")
def keep_zeros(model: nn.Module) -> nn.Module:
    """Model transform: every maskable Linear with zero weights becomes a `MaskedLinear` keeping them zero."""
    for name, linear in maskable_linears(model):
        if bool((linear.weight == 0).any()):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, _masked(linear))
    return model
