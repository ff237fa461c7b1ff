"""DPO's reference: log-probs precomputed once vs a live reference model — peak memory.

    python benchmarks/dpo_memory.py                       # the `small` preset's shape, full fine-tuning
    python benchmarks/dpo_memory.py --preset gpt2-124m    # ~124M parameters
    python benchmarks/dpo_memory.py --preset nano --pairs 16 --steps 2 --block-size 64   # smoke
    python benchmarks/dpo_memory.py --json

Full fine-tuning changes the base weights, so DPO needs a frozen copy of the base as its
reference (`lmforge align` loads it: `lmforge.posttrain.run.load_base_for_reference`). Each
configuration runs the real `lmforge align dpo` (`lmforge.posttrain.align.align`, adapter.method
full) on the same base checkpoint (random weights of the preset's shape; a char tokenizer with
lmforge's chat tokens) and the same random preference pairs (and held-out pairs for its
evaluation), each in its own subprocess, so that its peak RSS (`ru_maxrss`) is its own:

- `precompute` (dpo.reference: precompute): the copy computes every pair's reference log-probs
  before the policy is built and is then freed; the steps read a table;
- `live` (dpo.reference: live): the copy stays in memory and runs (no_grad) on every batch.

A third subprocess only imports lmforge's post-training modules and torch (`bare`): the
interpreter's own RSS, subtracted to give each configuration's net peak. Printed: the peak and
net RSS of each configuration and the ratio precompute / live (goal, issue 12: below 1).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the king my lord shall speak of love and death upon this night good sir thou art".split()
MODES = ("precompute", "live")


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def prepare(work: Path, preset: str, block_size: int | None, pairs: int) -> tuple[Path, Path]:
    """A char tokenizer with the chat tokens, a base checkpoint of the preset's shape (random
    weights) and `pairs` random preference pairs; returns (base dir, pairs file)."""
    from lmforge.config import load_config
    from lmforge.models import build_model
    from lmforge.models.config import ModelConfig
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.train import train_tokenizer
    from lmforge.train import checkpoint as ckpt
    from lmforge.train.objectives import padded_vocab

    rng = random.Random(0)
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    (work / "corpus" / "a.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(4000)))
    train_tokenizer(work / "corpus", work / "tok", kind="char")
    tok = Tokenizer.load(work / "tok" / "tokenizer.json")
    model_cfg = ModelConfig.from_dict(load_config(preset).model.to_dict())
    model_cfg.vocab_size = padded_vocab(tok.vocab_size)
    model_cfg.block_size = block_size or model_cfg.block_size
    model = build_model(model_cfg)
    base = work / "base"
    ckpt.save_checkpoint(base, model.state_dict(), model_cfg.to_dict(), work / "tok" / "tokenizer.json", None,
                         drop=ckpt.tied_aliases(model))
    words = max(4, model_cfg.block_size // 12)  # prompt + reply well inside the block (chars)
    for name, n in (("pairs.jsonl", pairs), ("val.jsonl", max(2, pairs // 16))):
        with open(work / name, "w") as f:
            for _ in range(n):
                prompt = " ".join(rng.choice(WORDS) for _ in range(words))
                chosen, rejected = rng.sample(WORDS, 2)
                f.write(json.dumps({"prompt": prompt, "chosen": f"{chosen} {chosen}", "rejected": rejected}) + "\n")
    return base, work / "pairs.jsonl"


def child(mode: str, work: Path, steps: int, batch: int, threads: int) -> dict:
    """One configuration in this process: `lmforge align dpo` with adapter.method full."""
    import torch

    from lmforge.config import load_config
    from lmforge.posttrain import run  # noqa: F401 - what align imports, so that `bare` holds it too
    from lmforge.posttrain.align import align

    if mode == "bare":
        return {"mode": mode, "peak_rss": max_rss_bytes(), "torch": torch.__version__}
    sets = ["adapter.method=full", f"dpo.reference={mode}", f"train.max_steps={steps}", f"train.batch_size={batch}",
            f"train.eval_every={steps}", "train.eval_steps=1", "train.precision=fp32", f"train.threads={threads}",
            "train.warmup_steps=0", "train.keep_last=1", f"data.val_file={work / 'val.jsonl'}"]
    t0 = time.perf_counter()
    summary = align(load_config("dpo", sets), work / f"run-{mode}", base=work / "base", data=work / "pairs.jsonl",
                    overwrite=True, force=True)
    return {"mode": mode, "peak_rss": max_rss_bytes(), "seconds": round(time.perf_counter() - t0, 2),
            "params": summary["metrics"]["total_params"], "steps": summary["metrics"]["steps"]}


def run_child(mode: str, args: argparse.Namespace, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--work", str(work), "--steps", str(args.steps),
           "--batch", str(args.batch), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="configs/<preset>.yaml: the model shape (default small)")
    p.add_argument("--block-size", type=int, default=None, help="override the preset's block_size")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", choices=("bare", *MODES), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.work), args.steps, args.batch, args.threads)))
        return
    with tempfile.TemporaryDirectory(prefix="dpo_memory_") as tmp:
        work = Path(tmp)
        prepare(work, args.preset, args.block_size, args.pairs)
        bare = run_child("bare", args, work)
        results = {mode: run_child(mode, args, work) for mode in MODES}
    for r in results.values():
        r["net_rss"] = r["peak_rss"] - bare["peak_rss"]
    ratio = results["precompute"]["peak_rss"] / results["live"]["peak_rss"]
    net_ratio = results["precompute"]["net_rss"] / results["live"]["net_rss"]
    out = {"preset": args.preset, "block_size": args.block_size, "pairs": args.pairs, "steps": args.steps,
           "batch": args.batch, "bare_rss": bare["peak_rss"], "results": results,
           "ratio_precompute_over_live": round(ratio, 4), "net_ratio_precompute_over_live": round(net_ratio, 4)}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    params = results["live"]["params"]
    print(f"DPO, full fine-tuning, preset {args.preset} ({params / 1e6:.2f}M parameters), {args.pairs} pairs, "
          f"{args.steps} steps of {args.batch} pairs, fp32 on CPU; bare interpreter {mib(bare['peak_rss'])}")
    print(f"{'reference':<12}{'peak RSS':>14}{'net of bare':>14}{'seconds':>10}")
    for mode, r in results.items():
        print(f"{mode:<12}{mib(r['peak_rss']):>14}{mib(r['net_rss']):>14}{r['seconds']:>10.1f}")
    print(f"precompute / live: {ratio:.3f} of the peak RSS, {net_ratio:.3f} net of the bare interpreter "
          f"(goal: < 1)")


if __name__ == "__main__":
    main()
