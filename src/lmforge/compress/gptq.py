"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): weight-only int4 (or other bit widths) with second-order error feedback.

For one Linear with weight W (out, in) and calibration inputs X (N, in), GPTQ minimizes
||X Wᵀ - X Ŵᵀ||² over the grid Ŵ one input column at a time: H = 2/N Σ x xᵀ, dampened by
`damp` · mean(diag H); with U the upper Cholesky factor of H⁻¹, column j is rounded, and its error
(w_j - ŵ_j) / U_jj times row j of U is subtracted from the columns not yet rounded (the OBS update).
Lazy batch updates: the update reaches the columns of the current `block_size` block at once and
the rest of the matrix once per block (one matmul), as the reference implementation does.

Groups (`group_size` columns share one scale and zero point per output row, F1's layout): a group's
scale/zero are fitted (by `lmforge.compress.formats.quantize_groups`, the same fit int4
round-to-nearest uses) when its first column is reached, on the columns as the error feedback has
left them then. Act-order (`act_order`) rounds the columns by decreasing diag(H) (the inputs with
the most energy first, while most columns are still free to absorb their error). With groups it
uses the reference's `static_groups` variant: each group's scale/zero are fitted on the original
weights of the original columns [k·g, (k+1)·g) before any column is rounded, and column j, whenever
its turn comes, is rounded on the grid of group j // g. So the result is stored in the plain
layout (scales (out, in // g), group of column j = j // g) with no per-column group index
(`g_idx`) and no permutation at inference. (The reference's default act-order with groups fits a
group on each g consecutive *permuted* columns; that needs a g_idx gather in every matmul.)
Symmetric by default, as AutoGPTQ's default (`sym=True`) and `quantize_model`'s int4.

Differences from the reference, both for robustness: a column whose input was always 0 keeps its
weight (rounded as round-to-nearest would) where the reference zeroes it, and a Hessian that is not
positive definite after dampening is retried with 10x the dampening (three times) before falling
back to round-to-nearest for that Linear.

`gptq_model` runs this block by block (see its docstring) and swaps in `Int4Linear`s.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm

from lmforge.compress.formats import dequantize_groups, group_params, quantize_with

log = logging.getLogger(__name__)


# ---- one layer -------------------------------------------------------------------------------


def gptq_quantize_layer(weight: Tensor, hessian: Tensor, bits: int, group_size: int, symmetric: bool, *,
                        damp: float = 0.01, act_order: bool = False,
                        block_size: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ-round `weight` (out, in) given the input Hessian (in, in): (codes, scales, zeros) in
    `quantize_groups`' layout (codes (out, in); scales and zeros (out, in // group_size)).

    group_size <= 0 means one group per row (per-channel). Raises ValueError if it does not divide `in`.
    """
    out_features, columns = weight.shape
    group = columns if group_size <= 0 else group_size
    if columns % group:
        raise ValueError(f"group_size {group} does not divide the layer's input width {columns}")
    W = weight.detach().float().clone()
    H = hessian.detach().float().to(W.device).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0

    def fit(w: Tensor) -> tuple[Tensor, Tensor]:  # one group's scale and zero per row: (out, 1) each
        return group_params(w, bits, w.shape[1], symmetric)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    static = None
    if perm is not None and group < columns:  # static groups: fitted on the original columns first
        static = [fit(W[:, k:k + group]) for k in range(0, columns, group)]
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U = inverse_cholesky(H, damp)
    grid = _Grid(out_features, columns, group, bits, fit, static, perm, W.device)
    _round_columns(W, U, grid, block_size)
    codes = grid.codes if perm is None else grid.codes[:, torch.argsort(perm)]
    return codes, grid.scales, grid.zeros


def inverse_cholesky(H: Tensor, damp: float) -> Tensor:
    """The upper Cholesky factor of (H + damp · mean(diag H) · I)⁻¹; the identity (round-to-nearest) if
    H stays indefinite after 10x, 100x, 1000x the dampening."""
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for factor in (1.0, 10.0, 100.0, 1000.0):
        L, info = torch.linalg.cholesky_ex(H + (damp * factor * mean_diag) * eye)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    log.warning("GPTQ: the Hessian is not positive definite even with 1000x dampening; rounding to nearest")
    return eye


@dataclass
class _Grid:
    """The quantization grid of one layer as GPTQ fills it: codes per column, scales/zeros per group."""

    out_features: int
    columns: int
    group: int
    bits: int
    fit: Callable[[Tensor], tuple[Tensor, Tensor]]
    static: list[tuple[Tensor, Tensor]] | None
    perm: Tensor | None
    device: torch.device
    codes: Tensor = field(init=False)
    scales: Tensor = field(init=False)
    zeros: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.codes = torch.zeros(self.out_features, self.columns, dtype=torch.uint8, device=self.device)
        self.scales = self.zeros = None  # shaped like the first fit's output (dtype is the format's)
        self.current: tuple[Tensor, Tensor] | None = None

    def params(self, col: int, upcoming: Callable[[int], Tensor]) -> tuple[Tensor, Tensor]:
        """Scale and zero (out, 1) for (permuted) column `col`; `upcoming(stop)` gives the updated
        columns col..stop when a dynamic group starts here."""
        if self.static is not None:
            return self.static[int(self.perm[col]) // self.group]
        if col % self.group == 0:
            self.current = self.fit(upcoming(col + self.group))
            self._store(col // self.group, *self.current)
        return self.current

    def _store(self, k: int, scale: Tensor, zero: Tensor) -> None:
        if self.scales is None:
            n = self.columns // self.group
            self.scales = torch.zeros(self.out_features, n, dtype=scale.dtype, device=scale.device)
            self.zeros = torch.zeros(self.out_features, n, dtype=torch.uint8, device=scale.device)
        self.scales[:, k:k + 1] = scale.reshape(-1, 1)
        self.zeros[:, k:k + 1] = zero.reshape(-1, 1).to(self.zeros.dtype)

    def finish(self) -> None:
        if self.static is not None:
            for k, (scale, zero) in enumerate(self.static):
                self._store(k, scale, zero)

    def round(self, col: int, w: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """Round column `col` onto the grid, store its codes, return its dequantized values."""
        q = quantize_with(w.unsqueeze(1), scale, zero, self.bits)
        self.codes[:, col:col + 1] = q
        return dequantize_groups(q, scale, zero).squeeze(1)


def _round_columns(W: Tensor, U: Tensor, grid: _Grid, block_size: int) -> None:
    """GPTQ's loop with lazy batch updates; W (out, in) is consumed (left with the updated weights)."""
    columns = W.shape[1]
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1, Err1, U1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            upcoming = functools.partial(_updated_columns, W, W1, Err1, U, (i1, i, i2))
            scale, zero = grid.params(i1 + i, upcoming)
            w = W1[:, i]
            err = (w - grid.round(i1 + i, w, scale, zero)) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    grid.finish()


def _updated_columns(W: Tensor, W1: Tensor, Err1: Tensor, U: Tensor, at: tuple[int, int, int], stop: int) -> Tensor:
    """Columns i1+i .. stop as the error feedback has left them so far: inside the current block
    (i1..i2) W1 has every update; beyond it, W lacks this block's lazy update, added here."""
    i1, i, i2 = at
    inside = W1[:, i:stop - i1]
    if stop <= i2:
        return inside
    beyond = W[:, i2:stop] - Err1[:, :i] @ U[i1:i1 + i, i2:stop]
    return torch.cat([inside, beyond], dim=1)


# ---- a model, block by block -----------------------------------------------------------------


@dataclass
class GPTQOptions:
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    sequential: bool = True


@torch.no_grad()
def gptq_model(model: nn.Module, calib: list[Tensor], *, bits: int = 4, group_size: int = 128, symmetric: bool = True,
               damp: float = 0.01, act_order: bool = False, block_size: int = 128, sequential: bool = True,
               progress: bool = True) -> nn.Module:
    """GPTQ every Linear `quantize_model` quantizes (`lmforge.compress.quantize.quant_targets`), in place:
    each swapped for an `Int4Linear` holding its GPTQ codes.

    Block by block (`lmforge.compress.calib`): the calibration windows' hidden states enter block 0;
    in block i the Linears are taken in the order the forward calls them, those reading the same
    input together (qkv; gate and up; an MoE expert's gate and up) — with `sequential`, each group's
    Hessian comes from a pass through the block whose earlier groups are quantized already (the
    reference's "true sequential"); then the block's outputs, through its quantized Linears, are the
    next block's inputs. Linears outside the block stacks (BERT's MLM transform) come last, from a
    pass through the whole quantized model. A Linear no calibration token reached (an MoE expert the
    router never picked) is rounded to nearest, with a warning.
    """
    from lmforge.compress.calib import calibration_mode, capture_block_inputs, run_block, whole_model_stack
    from lmforge.compress.quantize import quant_targets

    opts = GPTQOptions(bits, group_size, symmetric, damp, act_order, block_size, sequential)
    names = {m: name for name, m in quant_targets(model)}
    results: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    with calibration_mode(model):
        stacks = capture_block_inputs(model, calib)
        bar = tqdm(total=sum(len(s.blocks) for s in stacks) + 1, desc="gptq", unit="block", disable=not progress)
        for stack in stacks:
            inputs = stack.inputs
            for i, block in enumerate(stack.blocks):
                _quantize_block(stack, i, inputs, [m for m in block.modules() if m in names], names, opts, results)
                if i + 1 < len(stack.blocks):
                    inputs = list(run_block(stack, i, inputs))
                bar.update()
        rest = [m for m in names if names[m] not in results]
        if rest:
            _quantize_block(whole_model_stack(model, calib), 0, list(calib), rest, names, opts, results)
        bar.update()
        bar.close()
    _swap_in(model, names, results, opts)
    return model


def _swap_in(model: nn.Module, names: dict[nn.Module, str], results: dict, opts: GPTQOptions) -> None:
    from lmforge.compress.modules import Int4Linear
    from lmforge.compress.quantize import swap

    for linear, name in names.items():
        codes, scales, zeros = results[name]
        swap(model, name, Int4Linear.from_codes(codes, scales, zeros, opts.group_size, linear.bias, opts.symmetric))


def _quantize_block(stack, i: int, inputs: list[Tensor], linears: list[nn.Linear], names: dict[nn.Module, str],
                    opts: GPTQOptions, results: dict) -> None:
    """GPTQ the Linears of block i, group by group (see `gptq_model`); each one's weight is left
    dequantized in place (the next passes and blocks see the quantized layer)."""
    from lmforge.compress.calib import run_block

    groups: list[list[nn.Linear]] | None = None
    while groups is None or groups:
        hooked = linears if groups is None else groups[0]
        stats = _HessianHooks(hooked)
        try:
            for _ in run_block(stack, i, inputs):
                pass
        finally:
            stats.remove()
        if groups is None:
            groups = stats.input_groups()
        for group in groups[:1] if opts.sequential else groups:
            for linear in group:
                results[names[linear]] = _quantize_linear(linear, stats.hessian(linear), names[linear], opts)
        groups = groups[1:] if opts.sequential else []


def _quantize_linear(linear: nn.Linear, hessian: Tensor | None, name: str,
                     opts: GPTQOptions) -> tuple[Tensor, Tensor, Tensor]:
    if hessian is None:
        log.warning("GPTQ: no calibration token reached %s; rounding it to nearest", name)
        hessian = torch.eye(linear.in_features)
    codes, scales, zeros = gptq_quantize_layer(linear.weight, hessian, opts.bits, opts.group_size,
                                               opts.symmetric, damp=opts.damp, act_order=opts.act_order,
                                               block_size=opts.block_size)
    linear.weight.data = dequantize_groups(codes, scales, zeros, linear.weight.dtype).to(linear.weight.device)
    return codes, scales, zeros


class _HessianHooks:
    """Forward hooks accumulating Σ x xᵀ over the rows of each hooked Linear's input, and the order
    (and input identity) of their first calls."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        self.sums: dict[nn.Module, Tensor] = {}
        self.counts: dict[nn.Module, int] = {}
        self.calls: list[tuple[nn.Module, Tensor]] = []  # first window's calls (holding the inputs alive)
        self.linears = list(linears)
        self.handles = [m.register_forward_hook(self._hook) for m in linears]

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        x = args[0]
        if module not in self.counts:
            self.calls.append((module, x))
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        self.sums[module] = self.sums.get(module, 0) + rows.T @ rows
        self.counts[module] = self.counts.get(module, 0) + rows.shape[0]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.calls = []

    def hessian(self, linear: nn.Linear) -> Tensor | None:
        """H = 2/N Σ x xᵀ (None if the Linear saw no input row)."""
        n = self.counts.get(linear, 0)
        return 2.0 * self.sums[linear] / n if n else None

    def input_groups(self) -> list[list[nn.Linear]]:
        """The hooked Linears in call order, consecutive ones that read the same tensor together;
        those never called last, each alone."""
        groups: list[list[nn.Linear]] = []
        last: Tensor | None = None
        for module, x in self.calls:
            same = last is not None and (x is last or (x.data_ptr() == last.data_ptr() and x.shape == last.shape))
            if same:
                groups[-1].append(module)
            else:
                groups.append([module])
            last = x
        called = {m for g in groups for m in g}
        return groups + [[m] for m in self.linears if m not in called]
