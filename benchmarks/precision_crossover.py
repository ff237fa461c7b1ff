"""Where does bf16 autocast start to pay off on this CPU? (sets `CPU_BF16_MIN_WIDTH`)

Times a full training step (forward, backward, AdamW) in fp32 and in bf16 autocast for GPT
widths from tiny to small, alternating the two in one run, and prints the bf16/fp32 speed
ratio per width. `precision: auto` uses bf16 on AMX/AVX512-BF16 CPUs from the first width
where bf16 wins.

    .venv/bin/python benchmarks/precision_crossover.py [--widths 128 192 256 384] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmforge.models import GPT, ModelConfig
from lmforge.train.device import CPU_BF16_MIN_WIDTH, autocast, cpu_has_bf16
from lmforge.train.optim import build_optimizer


def step_ms(model, optimizer, x, y, precision: str, steps: int) -> float:
    times = []
    device = torch.device("cpu")
    for _ in range(steps):
        t0 = time.perf_counter()
        with autocast(device, precision):
            _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[128, 192, 256, 384])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"CPU bf16 support (AMX/AVX512-BF16): {cpu_has_bf16()}; threads: {torch.get_num_threads()}")
    print(f"{'width':>5} | {'layers':>6} | {'ctx':>4} | {'batch':>5} | "
          f"{'fp32 ms':>8} | {'bf16 ms':>8} | {'bf16 speed-up':>13}")
    for width in args.widths:
        # the shape grows with width like the presets do (nano: 128/4/64/12, small: 384/6/256/16)
        layers, ctx, batch = (4, 64, 12) if width <= 128 else (6, 256, 16) if width >= 384 else (4, 128, 16)
        cfg = ModelConfig(vocab_size=384, n_layer=layers, n_head=max(1, width // 64), n_embd=width, block_size=ctx)
        torch.manual_seed(0)
        model = GPT(cfg)
        optimizer = build_optimizer(model, 1e-4, 0.1, (0.9, 0.99), "cpu")
        x = torch.randint(0, 384, (batch, ctx))
        y = torch.randint(0, 384, (batch, ctx))
        results = {"fp32": [], "bf16": []}
        step_ms(model, optimizer, x, y, "fp32", 3)
        step_ms(model, optimizer, x, y, "bf16", 3)
        for _ in range(args.rounds):  # alternate so machine noise hits both alike
            for precision in results:
                results[precision].append(step_ms(model, optimizer, x, y, precision, args.steps))
        fp32, bf16 = statistics.median(results["fp32"]), statistics.median(results["bf16"])
        print(f"{width:>5} | {layers:>6} | {ctx:>4} | {batch:>5} | {fp32:>8.1f} | {bf16:>8.1f} | {fp32 / bf16:>12.2f}x")
    print(f"precision: auto uses bf16 on CPU from width {CPU_BF16_MIN_WIDTH}")


if __name__ == "__main__":
    main()
