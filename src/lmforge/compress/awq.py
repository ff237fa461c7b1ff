"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration").

A few input channels of each Linear carry much larger activations than the rest; their weights
matter most, and group-wise rounding treats them like the others. AWQ multiplies those weight
columns by s > 1 before rounding (a finer grid for them, relative to their size) and divides the
activations by s, which costs nothing at inference when 1/s can be folded into whatever produces
the activations. Per "scale group" (Linears reading one input), with x̄ the mean |x| per input
channel over the calibration tokens:

    s(α) = x̄^α / sqrt(max x̄^α · min x̄^α),   α on a grid of `grid` points in [0, 1]

and α is the one whose int4-rounded weights Q(W·diag(s))·diag(s)⁻¹ give the smallest mean squared
error of the block's output on the calibration set, against the full-precision block (the other
groups unrounded; for an MoE expert's `down`, of that Linear's output, so that a search does not
run every expert). α = 0 (s = 1) is round-to-nearest, so the chosen α is never worse than RTN on
the calibration data. (The reference implementation compares the enclosing sublayer's output,
the attention or the MLP; on a tiny trained GPT the block output chose better: held-out
perplexity below RTN's in 4 of 4 int4 settings against 3, KL to the full-precision model in 2
against 1.) Then every Linear is rounded to
nearest (`Int4Linear.from_linear`) with its scaled weights. Asymmetric by default (the paper's
and AutoAWQ's zero-point int4).

What is folded where, in a pre-norm `TransformerBlock` (GPT-2, Llama, MoE; the decoder of an
encoder-decoder):
- `attn.qkv` (and cross-attention's `q`): columns × s, 1/s into `attn_norm`'s weight and bias
  (`cross_norm`); exact, the norm's output is scaled per channel;
- `attn.out`: columns × s, 1/s into the value rows of `qkv` (cross-attention: of `kv`), weight and
  bias: attention mixes positions, not channels, so each output channel of a head is a mix of its
  value channel only. Only when every query head has its own value head (no GQA: there one value
  channel serves several heads' columns; the paper skips it too);
- `mlp.gate` and `mlp.up` (every expert's, and the router's columns too, unquantized, so the
  routing is unchanged): columns × s, 1/s into `mlp_norm`;
- `mlp.down` (each expert's): columns × s, 1/s into the rows of `up` — exact when the hidden
  state is linear in up's output: gated MLPs (act(gate) · up) and ReLU (positively homogeneous).
  GELU MLPs (GPT-2's) have nothing to fold into, so their `down` is rounded without a scale (the
  paper's BLOOM recipe puts an explicit scale module after the GELU; lmforge's Int4Linear has no
  input scale, so it is left out).
A post-norm block (BERT) has its norms after the residual sum, so only `attn.out` and `mlp.down`
get scales. Linears outside blocks and blocks of other kinds are rounded to nearest. The paper's
second step, clipping-range search, is not done.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from lmforge.compress.formats import dequantize_groups, quantize_groups

log = logging.getLogger(__name__)
MIN_SCALE = 1e-4  # the paper's clamp of x̄^α: a channel that is never active keeps a tiny, finite scale


@dataclass
class ScaleGroup:
    """Linears that read one input, and where that input's 1/s is folded (see the module docstring)."""

    name: str
    prev: nn.Module  # a norm (all its channels) or a Linear (its output rows `rows`)
    rows: slice | None
    linears: list[nn.Linear]  # columns × s, then quantized
    inspect: nn.Module  # whose output the α search compares: the block (an MoE expert's down: the Linear)
    extra: list[nn.Linear] = field(default_factory=list)  # columns × s, not quantized (an MoE router)
    stat: nn.Module | None = None  # whose input gives x̄ (default: linears[0]; an MoE: the MoE, which sees every token)

    @property
    def reader(self) -> nn.Module:
        return self.stat if self.stat is not None else self.linears[0]


def scale_groups(block: nn.Module, prefix: str = "") -> list[ScaleGroup]:
    """The scale groups of one TransformerBlock (none for other kinds of block)."""
    from lmforge.models.blocks import MLP, Attention, TransformerBlock
    from lmforge.models.moe import MoE

    if not isinstance(block, TransformerBlock):
        return []
    groups: list[ScaleGroup] = []
    for norm, attn in ((block.attn_norm, block.attn), (block.cross_norm, block.cross_attn)):
        if not isinstance(attn, Attention):
            continue
        first = attn.q if attn.cross else attn.qkv
        if block.pre_norm:
            groups.append(ScaleGroup(f"{prefix}{'cross_' if attn.cross else ''}attn_in", norm, None, [first], block))
        if attn.n_kv_head == attn.n_head:
            source = attn.kv if attn.cross else attn.qkv
            start = sum(attn.split_sizes[1:2]) if attn.cross else sum(attn.split_sizes[:2])
            v_rows = slice(start, start + attn.split_sizes[2])
            groups.append(ScaleGroup(f"{prefix}{'cross_' if attn.cross else ''}attn_out", source, v_rows,
                                     [attn.out], block))
    experts = list(block.mlp.experts) if isinstance(block.mlp, MoE) else [block.mlp]
    if block.pre_norm and all(isinstance(e, MLP) for e in experts):
        inputs = [lin for e in experts for lin in (e.gate, e.up) if lin is not None]
        router = [block.mlp.router] if isinstance(block.mlp, MoE) else []
        groups.append(ScaleGroup(f"{prefix}mlp_in", block.mlp_norm, None, inputs, block, router, stat=block.mlp))
    for k, e in enumerate(experts):
        if isinstance(e, MLP) and (e.gate is not None or e.kind == "relu"):
            where = f"{prefix}mlp{f'.experts.{k}' if len(experts) > 1 else ''}_down"
            groups.append(ScaleGroup(where, e.up, slice(None), [e.down], block if len(experts) == 1 else e.down))
    return groups


def apply_scale(group: ScaleGroup, s: Tensor) -> None:
    """Fold 1/s into `prev` and s into the readers' columns, in place (the function is unchanged)."""
    with torch.no_grad():
        rows = group.rows if group.rows is not None else slice(None)
        if isinstance(group.prev, nn.Linear):
            group.prev.weight[rows] /= s.unsqueeze(1).to(group.prev.weight.dtype)
        else:
            group.prev.weight[rows] /= s.to(group.prev.weight.dtype)
        if getattr(group.prev, "bias", None) is not None:
            group.prev.bias[rows] /= s.to(group.prev.bias.dtype)
        for linear in [*group.linears, *group.extra]:
            linear.weight.mul_(s.to(linear.weight.dtype))


def awq_scales(mean_abs: Tensor, alpha: float) -> Tensor:
    """s = x̄^α, normalized so that max(s) · min(s) = 1 (the paper's normalization)."""
    s = mean_abs.float().pow(alpha).clamp(min=MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


def fake_quantize(w: Tensor, bits: int, group_size: int, symmetric: bool) -> Tensor:
    """The weight round-to-nearest stands for: dequantize(quantize_groups(w))."""
    return dequantize_groups(*quantize_groups(w, bits, group_size, symmetric), w.dtype)


@dataclass
class _Observed:
    """What the α search needs of one scale group, from a full-precision pass over the calibration set."""

    sum_abs: Tensor | float = 0.0
    count: int = 0
    calls: list[tuple[tuple, dict[str, Any]]] = field(default_factory=list)  # the inspected module's inputs
    outputs: list[Tensor] = field(default_factory=list)  # and its full-precision outputs


@torch.no_grad()
def awq_model(model: nn.Module, calib: list[Tensor], *, bits: int = 4, group_size: int = 128, symmetric: bool = False,
              grid: int = 20, progress: bool = True) -> nn.Module:
    """AWQ-scale the model (`awq_search`), then round every Linear `quantize_model` quantizes
    (`lmforge.compress.quantize.quant_targets`) to nearest: each swapped for an `Int4Linear`, in place."""
    from lmforge.compress.modules import Int4Linear
    from lmforge.compress.quantize import quant_targets, swap

    awq_search(model, calib, bits=bits, group_size=group_size, symmetric=symmetric, grid=grid, progress=progress)
    for name, linear in quant_targets(model):
        swap(model, name, Int4Linear.from_linear(linear, group_size, symmetric))
    return model


@torch.no_grad()
def awq_search(model: nn.Module, calib: list[Tensor], *, bits: int = 4, group_size: int = 128,
               symmetric: bool = False, grid: int = 20, progress: bool = True) -> dict[str, float]:
    """Search and fold the AWQ scales of every scale group, block by block, in place (the model still
    computes the same function, in full precision); returns the α chosen per group.

    Block i's statistics come from the calibration hidden states propagated through the scaled
    (unquantized) blocks before it, as the reference implementation does."""
    from lmforge.compress.calib import calibration_mode, capture_block_inputs, run_block
    from lmforge.compress.quantize import quant_targets

    if grid < 2:
        raise ValueError(f"the AWQ grid needs at least 2 points (α = 0 and 1), got {grid}")
    targets = {m for _, m in quant_targets(model)}
    chosen: dict[str, float] = {}
    with calibration_mode(model):
        stacks = [s for s in capture_block_inputs(model, calib) if not s.whole_model]
        bar = tqdm(total=sum(len(s.blocks) for s in stacks), desc="awq", unit="block", disable=not progress)
        for stack in stacks:
            inputs = stack.inputs
            for i, block in enumerate(stack.blocks):
                groups = [g for g in scale_groups(block, f"{stack.name}.{i}.") if set(g.linears) <= targets]
                observed = _observe(stack, i, inputs, groups)
                for group in groups:
                    if observed[group.name].count:
                        alpha, s = _search(group, observed[group.name], bits, group_size, symmetric, grid)
                        apply_scale(group, s)
                        chosen[group.name] = alpha
                    observed.pop(group.name)  # free its inputs
                if i + 1 < len(stack.blocks):
                    inputs = list(run_block(stack, i, inputs))
                bar.update()
        bar.close()
    return chosen


def _observe(stack, i: int, inputs: list[Tensor], groups: list[ScaleGroup]) -> dict[str, _Observed]:
    """One full-precision pass through block i: each group's x̄ statistics and its inspected module's
    inputs and outputs."""
    from lmforge.compress.calib import run_block

    observed = {g.name: _Observed() for g in groups}
    handles = []
    for g in groups:
        obs = observed[g.name]
        handles.append(g.reader.register_forward_hook(lambda m, args, out, obs=obs: _accumulate(obs, args[0])))
        record = functools.partial(_record, obs)
        handles.append(g.inspect.register_forward_hook(record, with_kwargs=True))
    try:
        for _ in run_block(stack, i, inputs):
            pass
    finally:
        for handle in handles:
            handle.remove()
    return observed


def _record(obs: _Observed, module: nn.Module, args: tuple, kwargs: dict[str, Any], out: Tensor) -> None:
    obs.calls.append((args, kwargs))
    obs.outputs.append(out.detach())


def _accumulate(obs: _Observed, x: Tensor) -> None:
    rows = x.detach().reshape(-1, x.shape[-1]).float()
    obs.sum_abs = obs.sum_abs + rows.abs().sum(dim=0)
    obs.count += rows.shape[0]


def _search(group: ScaleGroup, obs: _Observed, bits: int, group_size: int, symmetric: bool,
            grid: int) -> tuple[float, Tensor]:
    """The α (and its s) whose rounded, unscaled weights give the inspected module's smallest output MSE."""
    mean_abs = obs.sum_abs / obs.count
    originals = [linear.weight.detach().clone() for linear in group.linears]
    best: tuple[float, float, Tensor] | None = None
    try:
        for alpha in torch.linspace(0.0, 1.0, grid).tolist():
            s = awq_scales(mean_abs, alpha).to(originals[0].device)
            for linear, w in zip(group.linears, originals):
                linear.weight.copy_(fake_quantize(w * s, bits, group_size, symmetric) / s)
            error = _output_error(group.inspect, obs)
            if best is None or error < best[0]:
                best = (error, alpha, s)
    finally:
        for linear, w in zip(group.linears, originals):
            linear.weight.copy_(w)
    return best[1], best[2]


def _output_error(module: nn.Module, obs: _Observed) -> float:
    total, n = 0.0, 0
    for (args, kwargs), ref in zip(obs.calls, obs.outputs):
        out = module(*args, **kwargs)
        total += float(((out.float() - ref.float()) ** 2).sum())
        n += ref.numel()
    return total / max(n, 1)
