"""Decoding speed: the generation engine (`lmforge.infer.engine`) against the code it replaced.

    python benchmarks/generate_speed.py                         # nano GPT and T5-style, batch 1 and 8
    python benchmarks/generate_speed.py --device cuda --new-tokens 256 --rounds 5
    python benchmarks/generate_speed.py --new-tokens 4 --rounds 1 --prompt-len 4   # a smoke run

Both sides run `lmforge.infer.generate_batch` (today a thin wrapper over the engine; before, its
own left-padded batch loop) on the same checkpoint, prompts, seeds and device: the baseline is
the repository at `--baseline` (default 96a791b, the last commit before the engine), checked out
with `git worktree add --detach` into a temporary directory and imported from there in a
subprocess (PYTHONPATH at its src); the current code runs in a subprocess the same way. The
two alternate `--rounds` times, each subprocess timing every case once after a warm-up run, so
background load hits both alike; we report median tokens/s (new tokens of all rows / wall
time of the call, CUDA synchronized), the ratio engine / baseline, and whether both wrote the
same tokens (they should: same seeds, same sampling).

Models (random weights, saved once and loaded by both sides): `nano` (configs/nano.yaml: a
4-layer GPT-2-style decoder, learned positions) and `t5` (configs/t5-small.yaml: a T5-style
encoder-decoder, relative position bias), vocab 512. Every row writes exactly `--new-tokens`
tokens (no stop ids), sampled with `--temperature`/`--top-k` (0 = greedy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRESETS = {"nano": "nano.yaml", "t5": "t5-small.yaml"}
VOCAB = 512


def model_section(preset: str, block_size: int | None) -> dict:
    import yaml

    model = dict(yaml.safe_load((REPO / "configs" / PRESETS[preset]).read_text())["model"])
    model["vocab_size"] = VOCAB
    if block_size:
        model["block_size"] = block_size
    return model


# --------------------------------------------------------------------------------------------
# The worker: runs in a subprocess against one version of lmforge (PYTHONPATH)


def worker(spec: dict) -> dict:
    """Time generate_batch on every case of `spec` once (after a warm-up); tokens/s and the ids."""
    import torch

    import lmforge
    from lmforge.models import build_model
    from lmforge.models.config import ModelConfig

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    results = {}
    for preset, checkpoint in spec["checkpoints"].items():
        model = build_model(ModelConfig(**spec["models"][preset]))
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
        model.to(device).eval()
        for batch in spec["batch_sizes"]:
            timed(model, spec["prompts"][:batch], spec, device)  # warm-up: kernels, allocator
            ids, seconds = timed(model, spec["prompts"][:batch], spec, device)
            results[f"{preset} batch {batch}"] = {"tokens_per_s": sum(map(len, ids)) / seconds, "ids": ids}
    return {"source": lmforge.__file__, "cases": results}


def timed(model, prompts: list[list[int]], spec: dict, device) -> tuple[list[list[int]], float]:
    """One `generate_batch` call (seed i for prompt i): the new ids and the wall time."""
    import torch

    from lmforge.infer.generate import generate_batch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    ids = generate_batch(model, prompts, spec["new_tokens"], temperature=spec["temperature"],
                         top_k=spec["top_k"] or None, seeds=list(range(len(prompts))))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return ids, time.perf_counter() - start


def run_worker(src: Path, spec_file: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src))
    out = subprocess.run([sys.executable, __file__, "--worker", str(spec_file)], env=env, check=True,
                         capture_output=True, text=True, cwd=src.parent)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(result["source"]).resolve().is_relative_to(src.resolve()):  # an installed lmforge won
        raise SystemExit(f"the worker imported {result['source']}, not the lmforge under {src}")
    return result["cases"]


# --------------------------------------------------------------------------------------------
# The driver


def make_spec(args: argparse.Namespace, tmp: Path) -> dict:
    import torch

    from lmforge.models import build_model
    from lmforge.models.config import ModelConfig

    models, checkpoints = {}, {}
    for preset in args.models:
        models[preset] = model_section(preset, args.block_size)
        torch.manual_seed(0)
        model = build_model(ModelConfig(**models[preset]))
        checkpoints[preset] = str(tmp / f"{preset}.pt")
        torch.save(model.state_dict(), checkpoints[preset])
    rng = torch.Generator().manual_seed(1)
    # prompts of different lengths (1/2 .. 1x --prompt-len), so batches have rows of different lengths
    lengths = [max(1, args.prompt_len // 2 + (i * args.prompt_len) // (2 * max(args.batch_sizes))) for i in
               range(max(args.batch_sizes))]
    prompts = [torch.randint(3, VOCAB, (n,), generator=rng).tolist() for n in lengths]
    return dict(models=models, checkpoints=checkpoints, prompts=prompts, batch_sizes=args.batch_sizes,
                new_tokens=args.new_tokens, temperature=args.temperature, top_k=args.top_k,
                device=args.device, threads=args.threads)


def baseline_tree(rev: str) -> Path:
    """A detached worktree of `rev` (made once, reused); its src directory."""
    where = Path(tempfile.gettempdir()) / f"lmf-base-{rev}"
    if not where.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), rev], check=True,
                       capture_output=True)
    return where / "src"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", default="96a791b", help="git revision of the code to compare against")
    parser.add_argument("--models", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, default=16, help="the longest prompt; the others are shorter")
    parser.add_argument("--block-size", type=int, default=None, help="override the presets' context")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each side")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(Path(args.worker).read_text()))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(make_spec(args, Path(tmp))))
        sides = {"baseline": baseline_tree(args.baseline), "engine": REPO / "src"}
        runs: dict[str, list[dict]] = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, src in sides.items():
                runs[name].append(run_worker(src, spec_file))
    report(runs, args)


def report(runs: dict[str, list[dict]], args: argparse.Namespace) -> None:
    print(f"device {args.device}, {args.new_tokens} new tokens per row, temperature {args.temperature}, "
          f"top_k {args.top_k}, median of {args.rounds} rounds (baseline = {args.baseline})")
    print(f"{'case':<16} {'baseline tok/s':>15} {'engine tok/s':>13} {'ratio':>7}  same tokens")
    for case in runs["engine"][0]:
        base = statistics.median(r[case]["tokens_per_s"] for r in runs["baseline"])
        new = statistics.median(r[case]["tokens_per_s"] for r in runs["engine"])
        same = all(r[case]["ids"] == runs["baseline"][0][case]["ids"] for r in runs["engine"] + runs["baseline"])
        print(f"{case:<16} {base:>15.1f} {new:>13.1f} {new / base:>6.2f}x  {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
