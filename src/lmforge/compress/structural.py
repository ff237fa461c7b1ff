"""Structural pruning of a GPT: remove attention heads and MLP hidden units for real (`lmforge prune`).

`prune_heads(model, {layer: [head, ...]})` slices a block's fused q/k/v projection (the heads' query
rows; with grouped-query attention the kv group's key/value rows, so only whole kv groups can go)
and the output projection's columns; `prune_neurons(model, {layer: [unit, ...]})` slices the MLP's
up (and gate) rows and down columns. The smaller Linears replace the old ones (module swap) and the
model's config records the widths (`ModelConfig.layer_heads`, `layer_mlp_hidden`), so the saved
checkpoint rebuilds at its pruned size in every stage (`load_pretrained` builds from config.json).

`select_lowest(scores, n, group)` picks the n lowest-scoring units of a global ranking (in groups of
`group` consecutive units, e.g. a kv group's query heads), keeping at least one group per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmforge.errors import UserError


def select_lowest(scores: list[Tensor], n_groups: int, group: int = 1, what: str = "heads") -> dict[int, list[int]]:
    """{layer: sorted unit indices} of the `n_groups` lowest-scoring groups of `group` consecutive units
    over all layers (a group's score: the sum of its units'), never a layer's last group."""
    check_removable([len(s) for s in scores], n_groups, group, what)
    ranked = sorted((float(s.view(-1, group).sum(-1)[g]), layer, g)
                    for layer, s in enumerate(scores) for g in range(len(s) // group))
    left = {layer: len(s) // group for layer, s in enumerate(scores)}
    chosen: dict[int, list[int]] = {}
    for _, layer, g in ranked:
        if sum(len(v) for v in chosen.values()) >= n_groups:
            break
        if left[layer] > 1:
            left[layer] -= 1
            chosen.setdefault(layer, []).append(g)
    return {layer: sorted(u for g in gs for u in range(g * group, (g + 1) * group)) for layer, gs in chosen.items()}


def check_removable(units: list[int], n_groups: int, group: int = 1, what: str = "heads") -> None:
    """A UserError if removing `n_groups` groups of `group` units from layers of `units` units would
    leave a layer with none (every layer keeps one group)."""
    removable = sum(n // group - 1 for n in units)
    if n_groups > removable:
        total = sum(units)
        raise UserError(f"--sparsity: removing {n_groups * group} of {total} {what} would leave a layer with none "
                        f"(every layer keeps at least {group}); at most {removable * group} can go "
                        f"(--sparsity <= {removable * group / total:.4g})")


def _sliced(linear: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    """A new Linear with `linear`'s weight rows (outputs) and/or columns (inputs) at these indices."""
    w = linear.weight.detach()
    w = w if rows is None else w[rows]
    w = w if cols is None else w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach() if rows is None else linear.bias.detach()[rows])
    new.train(linear.training)
    return new


def _check_removal(layer: int, remove: list[int], units: int, what: str) -> list[int]:
    bad = [u for u in remove if not 0 <= u < units]
    if bad:
        raise UserError(f"layer {layer} has {units} {what} (0..{units - 1}); cannot remove {what} {bad[0]}")
    if len(set(remove)) >= units:
        raise UserError(f"layer {layer} has {units} {what}; removing all of them would leave none: keep at least one")
    return [u for u in range(units) if u not in set(remove)]


def _blocks(model: nn.Module) -> nn.ModuleList:
    if getattr(getattr(model, "config", None), "arch", None) != "gpt":
        arch = getattr(getattr(model, "config", None), "arch", type(model).__name__)
        raise UserError(f"structural pruning (heads, neurons) is implemented for arch gpt, not {arch}; "
                        "use --method magnitude or 2:4")
    return model.blocks


def prune_heads(model: nn.Module, remove: dict[int, list[int]]) -> nn.Module:
    """Remove the query heads `remove[layer]` of each listed layer (in place); with GQA they must be whole
    kv groups. Updates `model.config.layer_heads`."""
    blocks = _blocks(model)
    for layer, heads in sorted(remove.items()):
        attn = blocks[layer].attn
        keep = _check_removal(layer, heads, attn.n_head, "heads")
        group = attn.n_head // attn.n_kv_head
        groups = sorted({h // group for h in keep})
        if len(keep) != len(groups) * group:
            raise UserError(f"layer {layer}: with grouped-query attention ({group} query heads per kv head) only "
                            f"whole kv groups can be removed; heads {sorted(heads)} split a group")
        d = attn.head_dim
        q_dim, kv_dim = attn.split_sizes[0], attn.split_sizes[1]
        q_rows = [h * d + i for h in keep for i in range(d)]
        kv_rows = [g * d + i for g in groups for i in range(d)]
        rows = torch.tensor(q_rows + [q_dim + r for r in kv_rows] + [q_dim + kv_dim + r for r in kv_rows])
        attn.qkv = _sliced(attn.qkv, rows=rows.to(attn.qkv.weight.device))
        attn.out = _sliced(attn.out, cols=torch.tensor(q_rows, device=attn.out.weight.device))
        attn.n_head, attn.n_kv_head = len(keep), len(groups)
        attn.split_sizes = (len(keep) * d, len(groups) * d, len(groups) * d)
    model.config.layer_heads = [block.attn.n_head for block in blocks]
    model.config.validate()
    return model


def prune_neurons(model: nn.Module, remove: dict[int, list[int]]) -> nn.Module:
    """Remove the MLP hidden units `remove[layer]` of each listed layer (in place). Updates
    `model.config.layer_mlp_hidden`."""
    blocks = _blocks(model)
    if model.config.moe.num_experts:
        raise UserError(f"model.moe.num_experts={model.config.moe.num_experts}: pruning MLP neurons of "
                        "Mixture-of-Experts layers is not supported; use --method heads, magnitude or 2:4")
    for layer, units in sorted(remove.items()):
        mlp = blocks[layer].mlp
        keep = torch.tensor(_check_removal(layer, units, mlp.down.in_features, "MLP hidden units"),
                            device=mlp.down.weight.device)
        mlp.up = _sliced(mlp.up, rows=keep)
        if mlp.gate is not None:
            mlp.gate = _sliced(mlp.gate, rows=keep)
        mlp.down = _sliced(mlp.down, cols=keep)
    model.config.layer_mlp_hidden = [block.mlp.down.in_features for block in blocks]
    model.config.validate()
    return model
