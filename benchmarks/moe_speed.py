"""MoE training speed: an 8-expert top-2 GPT against the dense GPT with the same active parameters.

    python benchmarks/moe_speed.py                      # configs/moe-tiny.yaml, precision auto
    python benchmarks/moe_speed.py --set train.precision=fp32 --variants
    python benchmarks/moe_speed.py --profile 10       # + per-phase times and the ops the MoE pays for

The MoE model is the preset (`moe-tiny`: 8 SwiGLU experts of hidden H per layer, top-2). Its
dense peer is the same config without experts and with MLP hidden top_k * H: a token goes
through the same matmuls (2 experts of H = one MLP of 2H; only the router is extra), so the
tokens/s ratio measures what routing and dispatch cost. Goal: MoE step time at most 1.5x the
dense one.

One step is what `lmforge pretrain` does: forward + loss (with the MoE's auxiliary losses)
under the precision `train.precision` resolves to, backward, gradient clipping, fused AdamW
step, zero_grad; both models train on the same random windows of character-level Shakespeare
(as benchmarks/train_speed.py). The contenders alternate in blocks of `--block` steps, so
background load on a shared machine hits all alike, and we report medians.

`--variants` adds lmforge's dispatch without the row padding of `padded_groups`, and the
expert computations measured while choosing lmforge's (same routing,
gather/scatter and parameters, only the experts' part differs; SwiGLU experts only): experts'
weights stacked into (E, out, in) tensors and used per expert, the same padded to the largest
expert's count and run as 3 `bmm`s, and `torch.nn.functional.grouped_mm` over the sorted tokens.
lmforge's own (`lmforge.models.moe`) runs each expert's `MLP` on its slice of the sorted tokens.
`--set model.moe.num_experts=...` etc. change the MoE model (and its dense peer with it).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from train_speed import _machine, char_tokens, measured_peak, random_batches, timed_rounds

from lmforge.config import load_config
from lmforge.models import GPT
from lmforge.models.config import ModelConfig
from lmforge.models.moe import MoE, load_balancing_loss, padded_groups, route, router_z_loss
from lmforge.train.device import autocast, resolve_device, resolve_precision
from lmforge.train.optim import build_optimizer

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# Alternative dispatches (for the record in docs/BENCHMARKS.md); lmforge uses MoE.forward


class _Variant(MoE):
    """MoE with another expert computation; routing, losses and stats as in MoE.forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router_logits(x)
        r = route(logits, self.top_k)
        self.aux_loss = load_balancing_loss(logits.softmax(-1), r.routed, x.shape[0])
        self.z_loss = router_z_loss(logits)
        self.stats = {"routed": r.routed, "dropped": r.dropped, "assignments": x.shape[0] * self.top_k,
                      "aux_loss": self.aux_loss.detach(), "z_loss": self.z_loss.detach()}
        token, weight, sizes = padded_groups(r)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        tokens = x.to(dtype).index_select(0, token)
        stacked = [torch.stack([getattr(e, name).weight for e in self.experts]).to(dtype)
                   for name in ("gate", "up", "down")]
        y = self.experts_forward(tokens, sizes, *stacked) * weight.to(dtype)[:, None]
        return torch.zeros(x.shape, dtype=y.dtype).index_add_(0, token, y).view(shape)


class StackedLoop(_Variant):
    def experts_forward(self, tokens, sizes, gate, up, down):
        gates, ups, downs = gate.unbind(0), up.unbind(0), down.unbind(0)
        return torch.cat([F.linear(F.silu(F.linear(part, gates[e])) * F.linear(part, ups[e]), downs[e])
                          for e, part in enumerate(tokens.split(sizes))])


class PaddedBmm(_Variant):
    def experts_forward(self, tokens, sizes, gate, up, down):
        counts = torch.tensor(sizes)
        num_experts, cap = counts.numel(), int(counts.max())
        starts = counts.cumsum(0) - counts
        expert = torch.repeat_interleave(torch.arange(num_experts), counts)
        slot = expert * cap + torch.arange(tokens.shape[0]) - starts[expert]
        padded = tokens.new_zeros(num_experts * cap, tokens.shape[1]).index_copy(0, slot, tokens)
        padded = padded.view(num_experts, cap, -1)
        h = F.silu(padded @ gate.transpose(1, 2)) * (padded @ up.transpose(1, 2))
        return (h @ down.transpose(1, 2)).reshape(num_experts * cap, -1).index_select(0, slot)


class GroupedMM(_Variant):
    def experts_forward(self, tokens, sizes, gate, up, down):
        offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
        h = (F.silu(F.grouped_mm(tokens, gate.transpose(1, 2), offs=offs))
             * F.grouped_mm(tokens, up.transpose(1, 2), offs=offs))
        return F.grouped_mm(h, down.transpose(1, 2), offs=offs)


class Unpadded(MoE):
    pad_groups = False  # lmforge's dispatch without rounding the experts' row counts up


VARIANTS = {"moe-unpadded": Unpadded, "moe-stacked-loop": StackedLoop, "moe-padded-bmm": PaddedBmm,
            "moe-grouped-mm": GroupedMM}


def with_variant(model: GPT, cls: type) -> GPT:
    for block in model.blocks:
        block.mlp.__class__ = cls  # same parameters, another forward
    return model


# --------------------------------------------------------------------------------------------


class Contender:
    def __init__(self, name: str, model: GPT, t, device: torch.device, precision: str) -> None:
        self.name, self.model, self.device, self.precision = name, model, device, precision
        self.grad_clip = t.grad_clip
        self.optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), device.type)
        self.times: list[float] = []
        self.phases: dict[str, list[float]] = {}
        self.losses: list[float] = []
        model.train()

    PHASES = ("forward", "backward", "clip", "adamw")

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One training step; its phases' times go to `self.phases` (CPU: no sync needed)."""
        marks = [time.perf_counter()]
        with autocast(self.device, self.precision):
            _, loss = self.model(x, y)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        marks.append(time.perf_counter())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        self.losses.append(loss.item())
        for name, t0, t1 in zip(self.PHASES, marks, marks[1:]):
            self.phases.setdefault(name, []).append(t1 - t0)
        return marks[-1] - marks[0]


def bench(preset: str, steps: int, warmup: int, block: int, overrides: list[str], variants: bool,
          quiet: bool, profile_steps: int = 0) -> dict:
    tokens, vocab = char_tokens()
    cfg = load_config(REPO / "configs" / f"{preset}.yaml", overrides)
    t = cfg.train
    moe_cfg = ModelConfig.from_dict(cfg.model.to_dict())
    moe_cfg.vocab_size = 64 * math.ceil(vocab / 64)  # as the trainer pads it
    if not moe_cfg.moe.num_experts:
        raise SystemExit(f"configs/{preset}.yaml has no experts (model.moe.num_experts=0)")
    dense_cfg = ModelConfig.from_dict({**moe_cfg.to_dict(), "moe": {"num_experts": 0},
                                       "mlp_hidden": moe_cfg.moe.top_k * moe_cfg.ffn_hidden})
    device = resolve_device(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    precision = resolve_precision(t.precision, device, moe_cfg.n_embd)

    models = {}
    for name, config in [("dense", dense_cfg), ("moe", moe_cfg)] + (
            [(v, moe_cfg) for v in VARIANTS] if variants else []):
        torch.manual_seed(t.seed)
        model = GPT(ModelConfig.from_dict(config.to_dict())).to(device)
        models[name] = with_variant(model, VARIANTS[name]) if name in VARIANTS else model
    contenders = [Contender(n, m, t, device, precision) for n, m in models.items()]

    rounds = math.ceil(steps / block)
    batches = random_batches(tokens, warmup + rounds * block + profile_steps, t.batch_size, moe_cfg.block_size,
                             seed=t.seed)
    for c in contenders:
        for x, y in batches[:warmup]:
            c.step(x, y)
    timed_rounds(contenders, batches, warmup, rounds, block, quiet=quiet)
    if profile_steps:
        profile(contenders, batches, profile_steps)

    peak = measured_peak(device, precision)
    tokens_per_step = t.batch_size * moe_cfg.block_size
    dense_ms = 1000 * statistics.median(contenders[0].times)
    result = {"preset": preset, "overrides": overrides, "precision": precision, "device": str(device),
              "threads": torch.get_num_threads(), "batch_size": t.batch_size, "block_size": moe_cfg.block_size,
              "num_experts": moe_cfg.moe.num_experts, "top_k": moe_cfg.moe.top_k,
              "expert_hidden": moe_cfg.ffn_hidden, "dense_hidden": dense_cfg.ffn_hidden,
              "steps": len(contenders[0].times), "peak_flops": peak, "contenders": {}}
    for c in contenders:
        ms = 1000 * statistics.median(c.times)
        tps = tokens_per_step / (ms / 1000)
        fpt = c.model.flops_per_token()
        result["contenders"][c.name] = {
            "params": c.model.num_params(), "active_params": c.model.num_params(active=True),
            "ms_per_step": round(ms, 2), "tokens_per_s": round(tps, 1), "mfu": round(fpt * tps / peak, 4),
            "step_time_vs_dense": round(ms / dense_ms, 3), "last_loss": round(c.losses[-1], 4)}
    result["ratio"] = result["contenders"]["moe"]["step_time_vs_dense"]
    return result


def print_table(r: dict) -> None:
    print(f"preset {r['preset']}{' ' + ' '.join(r['overrides']) if r['overrides'] else ''}: {r['precision']} on "
          f"{r['device']} x{r['threads']} threads, batch {r['batch_size']} x {r['block_size']} tokens, "
          f"{r['steps']} timed steps each (median); {r['num_experts']} experts of hidden {r['expert_hidden']}, "
          f"top-{r['top_k']}; dense hidden {r['dense_hidden']}")
    print(f"  {'model':<18} {'params':>9} {'active':>9} {'ms/step':>9} {'tokens/s':>10} {'MFU':>7} {'time/dense':>11}")
    for name, c in r["contenders"].items():
        print(f"  {name:<18} {c['params'] / 1e6:>8.2f}M {c['active_params'] / 1e6:>8.2f}M {c['ms_per_step']:>9.1f} "
              f"{c['tokens_per_s']:>10,.0f} {100 * c['mfu']:>6.1f}% {c['step_time_vs_dense']:>10.2f}x")
    verdict = "within" if r["ratio"] <= 1.5 else "NOT within"
    print(f"  MoE step time / dense (same active parameters): {r['ratio']:.2f}x ({verdict} the 1.5x goal)")


def profile(contenders: list[Contender], batches: list, steps: int, top: int = 8) -> None:
    """Where the MoE's extra time goes: per-phase medians of the timed steps, then torch
    profiler's self-CPU time per op over `steps` more steps of the dense model and the MoE."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    dense, moe = contenders[0], contenders[1]
    print("per-phase medians of the timed steps (ms):")
    for name in Contender.PHASES:
        a, b = (1000 * statistics.median(c.phases[name][-len(c.times):]) for c in (dense, moe))
        print(f"  {name:<9} dense {a:7.1f}  moe {b:7.1f}  (+{b - a:.1f})")
    ops = {}
    for c in (dense, moe):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for x, y in batches[-steps:]:
                c.step(x, y)
        ops[c.name] = {e.key: (e.self_cpu_time_total / 1000 / steps, e.count / steps) for e in prof.key_averages()}
    names = sorted(set(ops["dense"]) | set(ops["moe"]),
                   key=lambda k: -(ops["moe"].get(k, (0, 0))[0] - ops["dense"].get(k, (0, 0))[0]))
    print(f"ops with the largest extra self-CPU time per step ({steps} profiled steps each):")
    for k in names[:top]:
        (a, na), (b, nb) = ops["dense"].get(k, (0.0, 0)), ops["moe"].get(k, (0.0, 0))
        print(f"  {k:<28} dense {a:7.1f} ms in {na:5.0f} calls  moe {b:7.1f} ms in {nb:5.0f} calls  (+{b - a:.1f} ms)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="moe-tiny", help="a configs/*.yaml with model.moe.num_experts > 0")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--block", type=int, default=5, help="steps per model before switching")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. train.precision=fp32, model.moe.top_k=1")
    p.add_argument("--variants", action="store_true", help="also time the alternative dispatches")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also print per-phase times and the ops that cost the MoE more (profiling STEPS steps)")
    args = p.parse_args(argv)
    result = bench(args.preset, args.steps, args.warmup, args.block, args.overrides, args.variants, args.json,
                   args.profile)
    if args.json:
        print(json.dumps({"machine": _machine(), "torch": torch.__version__, **result}, indent=1))
    else:
        print(f"machine: {_machine()}, torch {torch.__version__}")
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
