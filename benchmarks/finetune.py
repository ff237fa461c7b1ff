"""Fine-tuning cost: full vs LoRA vs QLoRA, and our LoRA against peft + transformers, same shapes.

    python benchmarks/finetune.py                                   # small and gpt2-124m (~124M)
    python benchmarks/finetune.py --presets small --steps 2 --warmup 1 --batch 2 --block-size 32  # smoke
    python benchmarks/finetune.py --json

For each preset (configs/<preset>.yaml; `gpt2-124m` is the ~100M-parameter model: 85M in its
blocks, 124M with the embeddings) every method trains on the same random token batches, each in
its own subprocess so that its peak RSS (`ru_maxrss`) is its own: `full` (every weight trained),
`lora` and `qlora` (`lmforge.adapters`, as `lmforge finetune` applies them: the attention and MLP
Linears, rank `--rank`), and `peft` (transformers' GPT2LMHeadModel of the same shape, built from
a config — nothing downloaded — with peft's LoRA on c_attn, c_proj and c_fc, the same Linears).
A step is what the trainer does: forward + loss under the precision `train.precision` resolves
to, backward, gradient clipping, AdamW step (`lmforge.train.optim.build_optimizer`; peft's model
gets the same AdamW), zero_grad. Reported per method: trainable parameters, optimizer-state
bytes, the bytes of the frozen Linear weights in memory (QLoRA's NF4 codes and statistics against
the same weights in bf16), the process's peak RSS (which includes building the model in fp32,
before QLoRA quantizes it), the peak RSS of the training steps alone (Linux: VmHWM after
`clear_refs`), the RSS of the interpreter with its imports, and median ms/step. `train.device`
and `train.compile` are honoured (`--set train.device=cuda`: the CUDA peak is reported too).

The step-time ratio LoRA vs peft comes from one more subprocess that holds both models and times
them alternately in blocks of `--block` steps (benchmarks/train_speed.py's `timed_rounds`), so
background load on a shared machine falls on both alike. GPT-2's own activation is tanh-GELU
(`gelu_new`); where the preset uses another one (`small`: exact GELU, much faster on CPU), a third
contender, peft on a GPT-2 with our activation, separates what the activation choice alone buys.

Goals (issue 12): LoRA's optimizer state < 2% of full's; QLoRA's frozen weights <= 30% of their
bf16 size; LoRA's step >= 1.5x faster than peft + transformers.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
METHODS = ("full", "lora", "qlora", "peft")
# the 124M shape with a CPU-sized batch, eager (its preset compiles, for GPUs; --set train.compile=true)
PRESET_DEFAULTS = {"small": {}, "gpt2-124m": {"batch": 4, "block_size": 256, "sets": ["train.compile=false"]}}
PEFT_TARGETS = ["c_attn", "c_proj", "c_fc"]  # GPT-2's attention and MLP Linears (Conv1D)


# ---- one configuration (runs in a child process) ----------------------------------------------


def shape(spec: dict):
    """The preset's model config, training options and precision, with the benchmark's overrides."""
    from lmforge.config import load_config
    from lmforge.models.config import ModelConfig
    from lmforge.train.device import resolve_device, resolve_precision

    sets = PRESET_DEFAULTS.get(spec["preset"], {}).get("sets", [])
    sets += [f"model.block_size={spec['block_size']}"] if spec.get("block_size") else []
    cfg = load_config(REPO / "configs" / f"{spec['preset']}.yaml", sets + spec.get("overrides", []))
    mc = ModelConfig.from_dict(vars(cfg.model).copy())
    mc.vocab_size = mc.vocab_size or spec["vocab"]
    mc.dropout = 0.0
    device = resolve_device(cfg.train.device)
    return mc, cfg.train, resolve_precision(cfg.train.precision, device, mc.n_embd), device


def ours(mc, method: str, rank: int):
    """lmforge's GPT with the method's adapter, as `lmforge finetune` applies it."""
    from lmforge.adapters import AdapterOptions, adapter_transform
    from lmforge.models import GPT

    model = GPT(mc)
    transform = adapter_transform(AdapterOptions(method=method, lora_rank=rank, lora_alpha=2.0 * rank))
    return transform(model) if transform else model


def peft_gpt2(mc, rank: int, activation: str | None = None):
    """transformers' GPT-2 of the same shape (random init, from a config) with peft's LoRA."""
    import peft

    sys.path.insert(0, str(HERE))
    from train_speed import HF_ACTIVATION, hf_gpt2

    model = hf_gpt2(mc, activation or HF_ACTIVATION.get(mc.mlp, "gelu_new"))
    config = peft.LoraConfig(r=rank, lora_alpha=2.0 * rank, lora_dropout=0.0, target_modules=PEFT_TARGETS,
                             fan_in_fan_out=True)  # GPT-2's Conv1D stores its weight transposed
    return peft.get_peft_model(model, config)


def frozen_linear_bytes(model) -> dict:
    """Bytes of the frozen 2-D Linear weights in memory (NF4 buffers for QLoRA) and their bf16 size."""
    from lmforge.adapters.qlora import quantized_bytes

    nf4, nf4_numel = quantized_bytes(model)
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad and p.dim() == 2
              and "embed" not in n and "wte" not in n and "wpe" not in n]
    numel = nf4_numel + sum(p.numel() for p in frozen)
    return {"bytes": nf4 + sum(p.numel() * p.element_size() for p in frozen), "bf16_bytes": 2 * numel,
            "numel": numel}


def optimizer_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t))


def make_step(model, optimizer, precision: str, grad_clip: float, hf: bool, device: torch.device):
    import torch.nn.functional as F

    from lmforge.train.device import autocast

    def step(x, y) -> float:
        t0 = time.perf_counter()
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            if hf:
                logits = model(input_ids=x).logits
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
            else:
                _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - t0

    return step


def build(spec: dict, method: str, activation: str | None = None):
    """(model, optimizer, step) for one method on the spec's shape."""
    from lmforge.train.optim import build_optimizer

    mc, t, precision, device = shape(spec)
    torch.manual_seed(0)
    hf = method.startswith("peft")
    model = peft_gpt2(mc, spec["rank"], activation) if hf else ours(mc, method, spec["rank"])
    model.to(device).train()
    opt = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), device.type)
    # train.compile: both stacks compiled alike (the warm-up steps absorb the compilation)
    run = torch.compile(model) if t.compile else model
    return model, opt, make_step(run, opt, precision, t.grad_clip, hf, device)


def batches(spec: dict, vocab: int, n: int) -> list:
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, vocab, (spec["batch"], spec["block_size"] + 1), generator=g) for _ in range(n)]
    return [(w[:, :-1], w[:, 1:]) for w in windows]


def reset_peak_rss() -> bool:
    """Start a new peak-RSS (VmHWM) measurement: Linux's clear_refs 5 (since 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset() -> int | None:
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def run_one(spec: dict) -> dict:
    """Child: train one method for warmup + steps; its costs (see the module docstring)."""
    from lmforge.adapters import qlora  # noqa: F401  (the imports of every method, before the baseline)
    from lmforge.adapters.qlora import quantized_bytes

    if spec["method"] == "peft":
        import peft  # noqa: F401
        import transformers  # noqa: F401
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mc, _, precision, device = shape(spec)
    model, opt, step = build(spec, spec["method"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) + quantized_bytes(model)[1]  # NF4 weights are buffers
    data = batches(spec, mc.vocab_size, spec["warmup"] + spec["steps"])
    # the process peak includes building the model in fp32 (QLoRA quantizes it afterwards): the
    # training steps' own peak is measured apart
    resettable = reset_peak_rss()
    times = [step(x, y) for x, y in data]
    return {"method": spec["method"], "precision": precision, "trainable": trainable, "params": total,
            "optimizer_bytes": optimizer_bytes(opt), "frozen": frozen_linear_bytes(model),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_imports": rss_imports,
            "peak_rss_training": peak_rss_since_reset() if resettable else None,
            "peak_cuda": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "device": str(device), "ms_per_step": 1000 * statistics.median(times[spec["warmup"]:])}


def run_race(spec: dict) -> dict:
    """Child: our LoRA and peft's, alternately in blocks (and peft with our activation, if it differs)."""
    sys.path.insert(0, str(HERE))
    from train_speed import HF_ACTIVATION, timed_rounds

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    mc = shape(spec)[0]
    contenders = {"lora": build(spec, "lora")[2], "peft": build(spec, "peft")[2]}
    ours_act = HF_ACTIVATION.get(mc.mlp)
    if ours_act and ours_act != "gelu_new":
        contenders["peft-same-act"] = build(spec, "peft", ours_act)[2]
    racers = [Racer(name, fn) for name, fn in contenders.items()]
    rounds = max(1, math.ceil(spec["steps"] / spec["block"]))
    data = batches(spec, mc.vocab_size, spec["warmup"] + rounds * spec["block"])
    for r in racers:
        for x, y in data[:spec["warmup"]]:
            r.step(x, y)
        r.times.clear()
    timed_rounds(racers, data, spec["warmup"], rounds, spec["block"], f"[{spec['preset']}] ", quiet=spec["quiet"])
    return {r.name: 1000 * statistics.median(r.times) for r in racers}


class Racer:
    """What `timed_rounds` needs: a name, a step that returns its seconds, and the times."""

    def __init__(self, name: str, step) -> None:
        self.name, self._step, self.times = name, step, []

    def step(self, x, y) -> float:
        return self._step(x, y)


# ---- the parent ---------------------------------------------------------------------------------


def child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{spec.get('method', 'race')} on {spec['preset']} failed:\n{proc.stderr[-3000:]}")
    if not spec["quiet"]:
        sys.stderr.write(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_preset(preset: str, args) -> dict:
    defaults = PRESET_DEFAULTS.get(preset, {})
    spec = {"preset": preset, "steps": args.steps, "warmup": args.warmup, "block": args.block, "rank": args.rank,
            "batch": args.batch or defaults.get("batch"), "block_size": args.block_size or defaults.get("block_size"),
            "vocab": args.vocab, "threads": args.threads, "overrides": args.overrides, "quiet": args.json}
    mc, t = shape(spec)[:2]
    spec["batch"], spec["block_size"] = spec["batch"] or t.batch_size, spec["block_size"] or mc.block_size
    runs = {}
    for method in args.methods:
        if not args.json:
            print(f"[{preset}] {method} ...", file=sys.stderr, flush=True)
        runs[method] = child({**spec, "method": method})
    race = child({**spec, "mode": "race"}) if {"lora", "peft"} <= set(args.methods) else {}
    return {"preset": preset, "batch": spec["batch"], "block_size": spec["block_size"], "rank": args.rank,
            "shape": {k: getattr(mc, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size", "mlp", "bias")},
            "runs": runs, "race_ms_per_step": race, "ratios": ratios(runs, race)}


def ratios(runs: dict, race: dict) -> dict:
    out = {}
    if "full" in runs and "lora" in runs:
        out["lora_optimizer_vs_full"] = runs["lora"]["optimizer_bytes"] / max(1, runs["full"]["optimizer_bytes"])
    if "qlora" in runs:
        f = runs["qlora"]["frozen"]
        out["qlora_frozen_vs_bf16"] = f["bytes"] / max(1, f["bf16_bytes"])
    if race:
        out["peft_ms_vs_lora"] = race["peft"] / race["lora"]
        if "peft-same-act" in race:
            out["peft_same_act_ms_vs_lora"] = race["peft-same-act"] / race["lora"]
    return out


def print_table(r: dict) -> None:
    s = r["shape"]
    print(f"\n{r['preset']}: {s['n_layer']} layers x {s['n_embd']}, vocab {s['vocab_size']}, {s['mlp']}, batch "
          f"{r['batch']} x {r['block_size']} tokens, LoRA rank {r['rank']}, "
          f"{next(iter(r['runs'].values()))['precision']} on {next(iter(r['runs'].values()))['device']}")
    print(f"  {'method':<7} {'trainable':>12} {'params':>12} {'optim MB':>9} {'frozen W MB':>11} "
          f"{'(bf16 MB)':>9} {'peak RSS MB':>11} {'(training)':>10} {'(imports)':>9} {'ms/step':>9}")
    mb = 1 / 2**20
    for name, x in r["runs"].items():
        f = x["frozen"]
        print(f"  {name:<7} {x['trainable']:>12,} {x['params']:>12,} {x['optimizer_bytes'] * mb:>9.1f} "
              f"{f['bytes'] * mb:>11.1f} {f['bf16_bytes'] * mb:>9.1f} {x['peak_rss'] * mb:>11.0f} "
              f"{(x['peak_rss_training'] or 0) * mb:>10.0f} "
              f"{x['rss_imports'] * mb:>9.0f} {x['ms_per_step']:>9.1f}"
              + (f"  (CUDA peak {x['peak_cuda'] * mb:.0f} MB)" if x.get("peak_cuda") else ""))
    q = r["ratios"]
    if "lora_optimizer_vs_full" in q:
        print(f"  LoRA optimizer state / full's: {100 * q['lora_optimizer_vs_full']:.2f}% (goal < 2%)")
    if "qlora_frozen_vs_bf16" in q:
        print(f"  QLoRA frozen weights / their bf16 size: {100 * q['qlora_frozen_vs_bf16']:.1f}% (goal <= 30%)")
    if r["race_ms_per_step"]:
        race = ", ".join(f"{k} {v:.1f} ms" for k, v in r["race_ms_per_step"].items())
        print(f"  alternating blocks (median ms/step): {race}")
        print(f"  peft + transformers step / our LoRA step: {q['peft_ms_vs_lora']:.2f}x (goal >= 1.5x)")
        if "peft_same_act_ms_vs_lora" in q:
            print(f"  ... with peft's GPT-2 on our activation: {q['peft_same_act_ms_vs_lora']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="small,gpt2-124m", help="comma-separated configs/ presets")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=10, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    p.add_argument("--block", type=int, default=5, help="LoRA vs peft: steps per model before switching")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--batch", type=int, help="batch size (default: the preset's; gpt2-124m: 4)")
    p.add_argument("--block-size", type=int, help="tokens per row (default: the preset's; gpt2-124m: 256)")
    p.add_argument("--vocab", type=int, default=128, help="vocabulary of a preset that leaves it to the tokenizer")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every method, e.g. train.precision=fp32, train.compile=true, "
                        "train.device=cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(run_race(spec) if spec.get("mode") == "race" else run_one(spec)))
        return 0
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: {unknown[0]!r} is not one of {', '.join(METHODS)}")
    results = [bench_preset(name, args) for name in args.presets.split(",") if name]
    if args.json:
        print(json.dumps({"torch": torch.__version__, "results": results}, indent=1))
    else:
        print(f"torch {torch.__version__}")
        for r in results:
            print_table(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
