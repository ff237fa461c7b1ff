"""Mixture-of-Experts feed-forward: a drop-in replacement for `MLP` (`model.moe.num_experts > 0`).

A router (one Linear n_embd -> E, no bias) scores every token against E experts; each token
goes to its `top_k` best experts and the output is their gated sum, the gates being a softmax
over the *selected* logits (Mixtral; the same numbers as HF's softmax-over-all-then-renormalize).
Each expert is an ordinary `blocks.MLP` (SwiGLU, GELU, ... as `model.mlp` says), so an 8-expert
top-2 model has 8x the FFN parameters of its dense sibling but only 2x its FFN FLOPs per token.

Two auxiliary losses keep the router healthy; the model adds them (times `moe.aux_loss_coef` /
`moe.z_loss_coef`) to the training loss (`moe_losses`):
- load balancing (Switch Transformer eq. 4, as Mixtral/HF compute it): E * sum_i f_i * P_i, f_i
  the fraction of tokens routed to expert i (among their top-k; sum_i f_i = top_k), P_i the mean
  router probability of i. It is top_k at perfect balance and grows as routing concentrates.
- router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2; keeps logits small, which
  keeps the router's softmax out of fp32/bf16 round-off trouble.

Dispatch, the part that decides speed: assignments (token, expert) are sorted by expert once
(`route`), the tokens gathered in that order with one `index_select`, every expert runs its MLP
on its contiguous slice, and one `index_add_` scatters the gated outputs back. No Python loop
over tokens, one short loop over experts. Each expert's slice is padded to one of a few sizes
(`padded_groups`): on CPU a matmul of a new shape costs a new oneDNN kernel, and the tokens per
expert change every step. Alternatives measured on the development CPU (benchmarks/moe_speed.py
--variants, docs/BENCHMARKS.md): stacked (E, out, in) expert weights used per expert, padded
`bmm` and `torch.nn.functional.grouped_mm` were no faster.

Capacity (`moe.capacity_factor` > 0): each expert takes at most ceil(cf * tokens * top_k / E)
assignments per forward; first choices are served before second choices, and within a choice
rank, earlier tokens first. An overflowing assignment is dropped: that expert adds nothing to
the token (its other experts and the residual path still do). Dropping applies in training
only: at inference it would make a token's output depend on which other sequences share the
batch, and KV-cached decoding (one token at a time) disagree with a full forward.

Every forward records statistics for logging (`moe_stats`): the fraction of assignments each
expert received, the dropped fraction, and the aux and z loss values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.models.blocks import MLP


@dataclass
class Routing:
    """Where a batch's N tokens go: assignments sorted by expert, as `route` returns them."""

    token: Tensor  # (A,) token index of each kept assignment, grouped by expert
    weight: Tensor  # (A,) its gate value (fp32)
    counts: Tensor  # (E,) kept assignments per expert (the group sizes of `token`)
    routed: Tensor  # (E,) assignments per expert before capacity dropping
    dropped: Tensor  # () number of dropped assignments


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Per-expert capacity ceil(cf * tokens * top_k / E) (GShard / Switch Transformer)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def route(logits: Tensor, top_k: int, capacity: int | None = None) -> Routing:
    """Top-k routing of (N, E) router logits; gates are a softmax over each token's selected logits.

    Assignments are ordered choice-major (every token's first choice, then every token's second,
    ...) before a stable sort by expert, so under a `capacity` an expert keeps first choices
    before second choices and, within a choice, earlier tokens; the rest are dropped.
    """
    num_tokens, num_experts = logits.shape
    top_logits, top_expert = logits.topk(top_k, dim=-1)  # (N, k)
    gates = top_logits.float().softmax(dim=-1)
    expert = top_expert.t().reshape(-1)  # choice-major: index a = choice * N + token
    order = expert.argsort(stable=True)
    routed = torch.bincount(expert, minlength=num_experts)
    counts, dropped = routed, torch.zeros((), dtype=torch.long, device=logits.device)
    if capacity is not None:
        starts = routed.cumsum(0) - routed
        rank = torch.arange(order.numel(), device=logits.device) - starts[expert[order]]
        keep = rank < capacity
        order = order[keep]
        counts = routed.clamp(max=capacity)
        dropped = expert.numel() - keep.sum()
    return Routing(token=order % num_tokens, weight=gates.t().reshape(-1)[order], counts=counts,
                   routed=routed, dropped=dropped)


def bucket_rows(n: int) -> int:
    """n rounded up to one of 8 sizes per power of two (n <= 16 stays): at most 12.5% more rows."""
    if n <= 16:
        return n
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def padded_groups(routing: Routing, pad: bool = True) -> tuple[Tensor, Tensor, list[int]]:
    """The routing's token and gate per assignment, each expert's group padded to `bucket_rows`.

    Why: the number of tokens an expert gets changes every step, and on CPU every new matmul
    shape costs oneDNN a new kernel (primitive) — measured here, a 256x704 bf16 product over a
    varying 450-600 rows took 1.7-6x as long as over a fixed count. Rounding the counts up to a
    few sizes lets the kernel cache hit. Padding rows repeat token 0 with gate 0, so they add
    nothing to the output or the gradients. GPUs' matmul libraries do not need this: no padding
    there. Returns (token, weight, group sizes).
    """
    sizes = routing.counts.tolist()
    pad = pad and routing.token.device.type == "cpu"
    padded = [bucket_rows(n) for n in sizes] if pad else sizes
    if padded == sizes:
        return routing.token, routing.weight, sizes
    device = routing.token.device
    counts = routing.counts
    expert = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)
    rank = torch.arange(expert.numel(), device=device) - (counts.cumsum(0) - counts)[expert]
    padded_counts = torch.tensor(padded, device=device)
    position = (padded_counts.cumsum(0) - padded_counts)[expert] + rank
    token = torch.zeros(sum(padded), dtype=routing.token.dtype, device=device)
    weight = torch.zeros(sum(padded), dtype=routing.weight.dtype, device=device)
    token[position] = routing.token
    weight[position] = routing.weight
    return token, weight, padded


def load_balancing_loss(probs: Tensor, routed: Tensor, num_tokens: int) -> Tensor:
    """E * sum_i f_i * P_i with f_i = routed_i / tokens and P_i = mean router probability of i."""
    num_experts = probs.shape[-1]
    return num_experts * torch.sum(routed.to(probs.dtype) / num_tokens * probs.mean(dim=0))


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE's z-loss: mean over tokens of logsumexp(router logits)^2."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class MoE(nn.Module):
    """Top-k routed experts; `forward(x)` maps (..., n_embd) to (..., n_embd) like `MLP`.

    After each forward, `aux_loss` and `z_loss` hold this layer's auxiliary losses (with grad;
    the model collects them with `moe_losses`) and `stats` its routing statistics (detached).
    """

    pad_groups = True  # see `padded_groups`; benchmarks/moe_speed.py switches it off to compare

    def __init__(self, n_embd: int, hidden: int, kind: str = "swiglu", *, num_experts: int,
                 top_k: int, capacity_factor: float = 0.0, bias: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in 1..num_experts={num_experts}")
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor
        self.router = nn.Linear(n_embd, num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(n_embd, hidden, kind, bias=bias, dropout=dropout)
                                     for _ in range(num_experts))
        self.aux_loss: Tensor | None = None
        self.z_loss: Tensor | None = None
        self.stats: dict[str, Tensor] | None = None

    def router_logits(self, x: Tensor) -> Tensor:
        """(N, E) logits in fp32 even under autocast: top-k choices and the softmax are sensitive
        to round-off, and the matmul is tiny (E columns)."""
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.router.weight.float())

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        num_tokens = x.shape[0]
        logits = self.router_logits(x)
        capacity = None
        if self.training and self.capacity_factor > 0:
            capacity = expert_capacity(self.capacity_factor, num_tokens, self.top_k, self.num_experts)
        routing = route(logits, self.top_k, capacity)
        self.aux_loss = load_balancing_loss(logits.softmax(dim=-1), routing.routed, num_tokens)
        self.z_loss = router_z_loss(logits)
        self.stats = {"routed": routing.routed.detach(), "dropped": routing.dropped.detach(),
                      "assignments": num_tokens * self.top_k,
                      "aux_loss": self.aux_loss.detach(), "z_loss": self.z_loss.detach()}

        token, weight, sizes = padded_groups(routing, self.pad_groups)
        # Cast once before the gather: under bf16 autocast the experts' matmuls run in bf16
        # anyway, and gathering/scattering half the bytes is the cheaper half of dispatch.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        tokens = x.to(dtype).index_select(0, token)
        # every expert runs, even on zero rows: all parameters stay in the graph (DDP needs that)
        outputs = torch.cat([expert(part) for expert, part in zip(self.experts, tokens.split(sizes))])
        outputs = outputs * weight.to(outputs.dtype)[:, None]
        out = torch.zeros((num_tokens, shape[-1]), dtype=outputs.dtype, device=x.device)
        return out.index_add_(0, token, outputs).view(*shape[:-1], shape[-1])

    def inactive_params(self) -> int:
        """Parameters a token does not use: the experts beyond its top_k (all the same size)."""
        return (self.num_experts - self.top_k) * sum(p.numel() for p in self.experts[0].parameters())


def make_ffn(config) -> nn.Module:
    """The feed-forward sublayer `config` (a ModelConfig) asks for: `MLP`, or `MoE` of such MLPs."""
    c, moe = config, config.moe
    if moe.num_experts > 0:
        return MoE(c.n_embd, c.ffn_hidden, c.mlp, num_experts=moe.num_experts, top_k=moe.top_k,
                   capacity_factor=moe.capacity_factor, bias=c.bias, dropout=c.dropout)
    return MLP(c.n_embd, c.ffn_hidden, c.mlp, bias=c.bias, dropout=c.dropout)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def moe_losses(model: nn.Module) -> tuple[Tensor, Tensor] | None:
    """The last forward's load-balancing and z-loss, each the mean over MoE layers; None if dense.

    The mean (not the sum) keeps the coefficients' meaning independent of depth. Note that HF's
    Mixtral pools all layers' router statistics before multiplying f and P, which differs from
    this mean of per-layer losses when there is more than one layer.
    """
    layers = [m for m in moe_layers(model) if m.aux_loss is not None]
    if not layers:
        return None
    aux = torch.stack([m.aux_loss for m in layers]).mean()
    z = torch.stack([m.z_loss for m in layers]).mean()
    for m in layers:  # do not keep the graph alive until the next forward
        m.aux_loss = m.z_loss = None
    return aux, z


def moe_stats(model: nn.Module) -> dict[str, object] | None:
    """Routing statistics of the last forward, as plain numbers; None for a dense model.

    util: per expert, the fraction of all top-k assignments it received, averaged over layers
    (1/E each when balanced); util_per_layer: the same per layer; dropped: the fraction of
    assignments dropped by the capacity limit; aux_loss, z_loss: means over layers.
    """
    layers = [m.stats for m in moe_layers(model) if m.stats is not None]
    if not layers:
        return None
    per_layer = [(s["routed"].float() / s["assignments"]).tolist() for s in layers]
    num_experts = len(per_layer[0])
    return {
        "util": [sum(layer[i] for layer in per_layer) / len(per_layer) for i in range(num_experts)],
        "util_per_layer": per_layer,
        "dropped": float(sum(s["dropped"] for s in layers)) / sum(s["assignments"] for s in layers),
        "aux_loss": float(sum(s["aux_loss"] for s in layers) / len(layers)),
        "z_loss": float(sum(s["z_loss"] for s in layers) / len(layers)),
    }


def utilization_summary(util: list[float], dropped: float = 0.0) -> str:
    """A compact line for progress bars and reports: the least and most used expert's share of
    the assignments against the balanced share 1/E, e.g. "9-17% (even 12.5%)", plus drops."""
    text = f"{100 * min(util):.0f}-{100 * max(util):.0f}% (even {100 / len(util):.3g}%)"
    return text + (f", {100 * dropped:.1f}% dropped" if dropped else "")
