"""How much a GPT's loss depends on each attention head and each MLP hidden unit (`lmforge prune`).

Gates applied from outside the model: a vector ξ of ones (requiring grad) multiplies each head's
output (the input of the attention's output projection, split into heads) or each MLP hidden unit
(the input of the MLP's `down` projection), through forward pre-hooks; the model stays a plain
`nn.Module`. The importance of unit u is the mean over calibration batches of |∂L/∂ξ_u|, L the
batch's mean next-token cross-entropy: Michel et al. 2019 ("Are Sixteen Heads Really Better than
One?") for heads; for a hidden unit h_j the same first-order Taylor estimate, ∂L/∂ξ_j = Σ_t h_j ∂L/∂h_j
(Molchanov et al. 2019). `normalized` divides each layer's scores by their L2 norm (Michel et al.,
section 4.1) so that layers compare in one global ranking.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

KINDS = ("heads", "neurons")


def gated_module(block: nn.Module, kind: str) -> tuple[nn.Module, int, int]:
    """(the Linear whose input is gated, units, width of one unit) of a Transformer block."""
    if kind == "heads":
        return block.attn.out, block.attn.n_head, block.attn.head_dim
    return block.mlp.down, block.mlp.down.in_features, 1


def _gate_hook(gate: Tensor, width: int):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        gated = (x.unflatten(-1, (-1, width)) * gate.to(x.dtype)[:, None]).flatten(-2)
        return (gated, *args[1:])
    return hook


@contextlib.contextmanager
def gates(model: nn.Module, kind: str, values: list[Tensor] | None = None) -> Iterator[list[Tensor]]:
    """One gate per block of `model.blocks` (ones requiring grad, or `values`), multiplied into its
    heads' outputs (`kind` heads) or MLP hidden units (`neurons`) while the block is open."""
    if kind not in KINDS:
        raise ValueError(f"unknown gate kind {kind!r}; one of {KINDS}")
    made, handles = [], []
    for i, block in enumerate(model.blocks):
        module, units, width = gated_module(block, kind)
        param = next(module.parameters())
        gate = (values[i] if values is not None else torch.ones(units, requires_grad=True)).to(param.device)
        handles.append(module.register_forward_pre_hook(_gate_hook(gate, width)))
        made.append(gate)
    try:
        yield made
    finally:
        for handle in handles:
            handle.remove()


def window_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """The mean next-token cross-entropy of windows of token ids (B, T)."""
    ids = ids.to(next(model.parameters()).device)
    return model(ids[:, :-1], ids[:, 1:])[1]


def batched(calib: list[Tensor], batch_size: int) -> list[Tensor]:
    """The windows stacked into batches of up to `batch_size` consecutive windows of one length."""
    batches: list[list[Tensor]] = []
    for ids in calib:
        if batches and len(batches[-1]) < batch_size and batches[-1][0].shape == ids.shape:
            batches[-1].append(ids)
        else:
            batches.append([ids])
    return [torch.cat(b) for b in batches]


def importance(model: nn.Module, calib: list[Tensor], kind: str, *, batch_size: int = 8,
               progress: bool = True) -> list[Tensor]:
    """Per block, the mean over calibration batches (of up to `batch_size` windows, L their mean loss) of
    |∂L/∂ξ| of each head (`heads`) or MLP hidden unit (`neurons`): raw scores, one (units,) fp32 tensor
    per layer. (Michel et al.'s code accumulates |∂L/∂ξ| per batch too; batch_size 1 is per window.)"""
    from lmforge.compress.calib import calibration_mode

    batches = batched(calib, batch_size)
    with calibration_mode(model), gates(model, kind) as gs:
        totals = [torch.zeros(g.shape) for g in gs]
        for ids in tqdm(batches, desc=f"{kind} importance", disable=not progress, leave=False):
            grads = torch.autograd.grad(window_loss(model, ids), gs)
            for total, grad in zip(totals, grads):
                total += grad.detach().abs().float().cpu()
    return [total / len(batches) for total in totals]


def normalized(scores: list[Tensor]) -> list[Tensor]:
    """Each layer's scores divided by their L2 norm (a layer of all-zero scores stays zero)."""
    return [s / s.norm().clamp_min(1e-12) for s in scores]
