"""`lmforge plan`'s predicted peak training memory vs the peak measured on CPU.

    python benchmarks/plan_memory.py            # every case below, ~2 min on 2 cores
    python benchmarks/plan_memory.py --quick    # nano and demo only
    python benchmarks/plan_memory.py --only bert-mini t5-small transformer-base

For each case, one real training step (forward, backward, AdamW step) runs on CPU and its peak
is measured (`lmforge.peakmem.measure_training_peak`: glibc's live malloc bytes sampled after
every ATen op, plus the exact bytes of parameters and optimizer state), next to
`lmforge.plan.training_memory`'s prediction for the same setup. The micro-batch is the one the
preset's objective cuts (clm windows; mlm + nsp rows for bert-mini, or the contrastive objective's
two dropout views of each row; span corruption's 128
encoder and 29 decoder positions for t5-small and transformer-base), at the preset's batch
size. The attention is what the CPU takes (`cpu`: per attention, SDPA in fp32, the hand-written
path in bf16 or with dropout, SDPA's math path with T5's position bias; `fused`: SDPA
everywhere), or SDPA forced (`fused*`: what a GPU runs). LoRA wraps every block Linear (qkv,
out, gate, up, down) with rank-8 adapters (tests/test_plan.py's reference `LoRALinear`); QLoRA
stores the base in bitsandbytes' NF4 (needs the dev extra). Vocabulary 320 where the preset
leaves it to the tokenizer.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # bitsandbytes looks for a hub kernel on AVX512-BF16 CPUs

ROOT = Path(__file__).resolve().parent.parent

CASES = [  # preset, overrides, precision, attention ("cpu", "fused" or "fused*": SDPA forced), method
    ("nano", [], "fp32", "fused", "full"),
    ("nano", [], "bf16", "cpu", "full"),
    ("nano", [], "bf16", "fused*", "full"),
    ("demo", [], "fp32", "fused", "full"),
    ("demo", [], "bf16", "cpu", "full"),
    ("small", [], "fp32", "fused", "full"),
    ("small", [], "bf16", "cpu", "full"),
    ("llama-tiny", ["train.batch_size=4"], "bf16", "cpu", "full"),
    ("moe-tiny", ["train.batch_size=4"], "fp32", "fused", "full"),
    ("moe-tiny", ["train.batch_size=4"], "bf16", "cpu", "full"),
    ("moe-tiny", [], "bf16", "cpu", "full"),
    ("nano", [], "bf16", "cpu", "lora"),
    ("demo", [], "bf16", "cpu", "lora"),
    ("small", ["train.batch_size=4"], "bf16", "cpu", "lora"),
    ("moe-tiny", ["train.batch_size=4"], "bf16", "cpu", "lora"),
    ("nano", [], "bf16", "cpu", "qlora"),
    ("demo", [], "bf16", "cpu", "qlora"),
    ("small", ["train.batch_size=4"], "bf16", "cpu", "qlora"),
    ("bert-mini", [], "fp32", "cpu", "full"),  # dropout 0.1: the hand-written attention in fp32 too
    ("bert-mini", [], "bf16", "cpu", "full"),
    ("bert-mini", ["objective=contrastive"], "fp32", "cpu", "full"),  # two dropout views, no MLM head
    ("bert-mini", ["objective=contrastive"], "bf16", "cpu", "full"),
    ("t5-small", [], "fp32", "cpu", "full"),  # relative bias: SDPA's math path in self-attention
    ("t5-small", [], "bf16", "cpu", "full"),
    ("t5-small", ["model.dropout=0.1"], "fp32", "cpu", "full"),
    ("transformer-base", [], "fp32", "fused", "full"),
    ("transformer-base", [], "bf16", "cpu", "full"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="nano and demo only")
    parser.add_argument("--only", nargs="+", metavar="PRESET", help="only these presets")
    args = parser.parse_args()

    from lmforge.config import load_config
    from lmforge.models import ModelConfig
    from lmforge.models.blocks import Attention
    from lmforge.peakmem import measure_training_peak, reference_lora
    from lmforge.plan import LoRA, objective_lengths, training_memory

    cases = [c for c in CASES if (not args.quick or c[0] in ("nano", "demo")) and (not args.only or c[0] in args.only)]
    print(f"{'preset':<21}{'batch':>6} {'precision':<10}{'attention':<10}{'method':<7}"
          f"{'predicted':>11}{'measured':>11}{'ratio':>7}  peak at")
    for preset, overrides, precision, attention, method in cases:
        cfg = load_config(ROOT / "configs" / f"{preset}.yaml", overrides)
        config = ModelConfig.from_dict({**cfg.model.to_dict(), "vocab_size": cfg.model.vocab_size or 320})
        batch = cfg.train.batch_size
        seq_len, decoder_len = objective_lengths(cfg, config.block_size)
        lora = LoRA.parse(8, quantized=method == "qlora") if method != "full" else None
        kernel = "fused" if attention.startswith("fused") else "cpu"
        predicted = training_memory(config, batch, seq_len, precision=precision, attention=kernel, lora=lora,
                                    decoder_len=decoder_len, objective=cfg.objective)
        saved = Attention._use_cpu_attention
        if attention == "fused*":
            Attention._use_cpu_attention = lambda self, *a, **k: False
        try:
            measured = measure_training_peak(config, batch, precision, cfg=cfg,
                                             adapt=(lambda m, lora=lora: reference_lora(m, lora)) if lora else None)
        finally:
            Attention._use_cpu_attention = saved
        label = " ".join([preset, *(o.removeprefix("model.").removeprefix("objective=")
                                    for o in overrides if not o.startswith("train."))])
        print(f"{label:<21}{batch:>6} {precision:<10}{attention:<10}{method:<7}"
              f"{predicted['peak'] / 2**20:>8.1f}MiB{measured['peak'] / 2**20:>8.1f}MiB"
              f"{predicted['peak'] / measured['peak']:>7.3f}  {predicted['peak_phase']}", flush=True)


if __name__ == "__main__":
    main()
