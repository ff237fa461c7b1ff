"""Issue 14's comparison table: every compressed variant of one checkpoint, side by side.

    .venv/bin/python benchmarks/variants.py --ckpt runs/demo/model --out runs/variants/demo --group-size 64 \\
        --pruned heads25=runs/prune/heads25 --pruned heads50=runs/prune/heads50 \\
        --student runs/distill/student_kd

One row per variant — fp32 (the reference), bf16, int8, int8-dynamic, int4 round-to-nearest, GPTQ,
AWQ (int4, `--group-size`), the pruned checkpoints and the distilled student given, the ONNX export
(onnxruntime) and GGUF q8_0 (llama-cpp-python, when installed) — with its size on disk, its held-out
perplexity and its greedy decode speed at batch 1 and 8. The variants are made with the lmforge
commands (`quantize`, `convert to-onnx`, `convert to-gguf`) into `--out` and reused when already there.

Every perplexity is computed here the same way for every runtime: the first `--eval-tokens` tokens of
the checkpoint's held-out text (its token dir's val split, as `lmforge quantize` reports), cut into
disjoint windows of the context, next-token cross-entropy over all of them. Decode speed: prompts of
`--prompt-tokens` held-out tokens, exactly `--new-tokens` greedy tokens, median of `--repeats` runs
after a warm-up; `--threads` torch/onnxruntime/llama.cpp threads.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

QUANT_METHODS = ("bf16", "int8", "int8-dynamic", "int4", "gptq", "awq")
GROUPED = ("int4", "gptq", "awq")


def lmforge(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lmforge", *args], check=True)


def dir_bytes(path: Path, suffixes=(".safetensors", ".onnx", ".gguf", ".data")) -> int:
    """Bytes of the weight files (what a user ships), not of reports and tokenizers."""
    if (path / "checkpoints").is_dir():  # a run dir: its best checkpoint, not every step's
        from lmforge.train.checkpoint import resolve_checkpoint

        path = resolve_checkpoint(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if p.suffix in suffixes or ".onnx" in p.name)


def make_variants(args: argparse.Namespace) -> dict[str, Path]:
    """The variant dirs/files, made with lmforge's commands unless already there."""
    out, ckpt, made = args.out, args.ckpt, {"fp32": args.ckpt}
    out.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        dest = out / method
        if not (dest / "summary.json").is_file():
            group = ["--group-size", str(args.group_size)] if method in GROUPED else []
            lmforge("quantize", "--ckpt", str(ckpt), "--method", method, "--out", str(dest), *group,
                    "--eval-tokens", "1024", "--overwrite")
        made[method] = dest
    for spec in args.pruned:
        name, _, path = spec.partition("=")
        made[name] = Path(path)
    if args.student:
        made["distilled student"] = args.student
    if "onnx" in args.formats:
        if not (out / "onnx" / "onnx_config.json").is_file():
            lmforge("convert", "to-onnx", str(ckpt), str(out / "onnx"), "--overwrite")
        made["onnx"] = out / "onnx"
    if "gguf" in args.formats:
        if not (out / "model-q8_0.gguf").is_file():
            lmforge("convert", "to-gguf", str(ckpt), str(out / "model-q8_0.gguf"), "--type", "q8_0")
        made["gguf q8_0"] = out / "model-q8_0.gguf"
    return made


def windows(ids: np.ndarray, block: int) -> list[np.ndarray]:
    """Disjoint windows of block + 1 tokens (inputs are the first block, targets the last block)."""
    return [ids[i:i + block + 1] for i in range(0, len(ids) - 1, block) if len(ids[i:i + block + 1]) > 1]


def window_ppl(logits_of: Callable[[np.ndarray], np.ndarray], ids: np.ndarray, block: int) -> float:
    """exp(mean next-token cross-entropy) over the windows; `logits_of(inputs (T,)) -> (T, vocab)`."""
    total, count = 0.0, 0
    for w in windows(ids, block):
        logits = torch.from_numpy(np.asarray(logits_of(w[:-1]), dtype=np.float32))
        total += float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(w[1:]).long(), reduction="sum"))
        count += len(w) - 1
    return math.exp(total / count)


def median_tokens_per_s(run: Callable[[], object], tokens: int, repeats: int) -> float:
    run()  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return tokens / statistics.median(seconds)


def torch_row(path: Path, ids: np.ndarray, prompts: list[list[int]], args) -> dict:
    from lmforge.infer.generate import generate_batch
    from lmforge.train.checkpoint import load_pretrained

    model, _ = load_pretrained(path)
    model.eval()
    block = model.config.block_size
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    @torch.inference_mode()
    def logits_of(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x).long()[None])[0][0].float().numpy()

    row = {"ppl": window_ppl(logits_of, ids, block), "params": sum(p.numel() for p in model.parameters())}
    for batch in (1, 8):
        batch_prompts = prompts[:batch]
        row[f"tok_s_b{batch}"] = median_tokens_per_s(
            lambda bp=batch_prompts: generate_batch(model, bp, args.new_tokens, temperature=0.0),
            batch * args.new_tokens, args.repeats)
    row["dtype"] = str(dtype).replace("torch.", "")
    return row


def onnx_row(path: Path, ids: np.ndarray, prompts: list[list[int]], args) -> dict:
    from lmforge.export.onnx_runtime import OnnxModel

    onnx = OnnxModel(path)
    session, c = onnx.sessions["model"], onnx.config

    def logits_of(x: np.ndarray) -> np.ndarray:
        past = {f"past_key_values.{i}.{kv}": np.zeros((1, c["num_kv_heads"], 0, c["head_dim"]), np.float32)
                for i in range(c["num_layers"]) for kv in ("key", "value")}  # an empty cache: the whole window
        feed = {"input_ids": x[None].astype(np.int64), "attention_mask": np.ones((1, len(x)), np.int64), **past}
        return session.run(None, feed)[0][0]

    row = {"ppl": window_ppl(logits_of, ids, c["block_size"])}
    for batch in (1, 8):
        row[f"tok_s_b{batch}"] = median_tokens_per_s(lambda b=batch: onnx.greedy(prompts[:b], args.new_tokens),
                                                     batch * args.new_tokens, args.repeats)
    return row


def gguf_row(path: Path, ids: np.ndarray, prompts: list[list[int]], args, block: int) -> dict:
    try:
        import llama_cpp
    except ImportError:
        return {"note": "llama-cpp-python not installed (bench extra)"}
    llm = llama_cpp.Llama(str(path), n_ctx=block, n_threads=args.threads, logits_all=True, verbose=False)

    def logits_of(x: np.ndarray) -> np.ndarray:
        llm.reset()
        llm.eval(x.tolist())
        return np.array(llm.scores[:len(x)])

    def decode() -> None:
        llm.reset()
        for i, _ in enumerate(llm.generate(prompts[0], top_k=1, temp=0.0, reset=True)):
            if i + 1 == args.new_tokens:
                break

    return {"ppl": window_ppl(logits_of, ids, block),
            "tok_s_b1": median_tokens_per_s(decode, args.new_tokens, args.repeats),
            "note": "llama.cpp (batch 1 only: llama-cpp-python decodes one sequence)"}


def heldout_ids(args) -> tuple[np.ndarray, list[list[int]], int]:
    from lmforge.compress.heldout import heldout_text
    from lmforge.train.checkpoint import load_pretrained

    model, tokenizer = load_pretrained(args.ckpt)
    text = heldout_text(args.ckpt, tokenizer, None, args.eval_tokens)
    if text is None:
        sys.exit(f"{args.ckpt}: no token dir recorded to take held-out text from")
    ids = text.ids.astype(np.int64)
    step = args.prompt_tokens
    prompts = [ids[1 + i * step:1 + (i + 1) * step].tolist() for i in range(8)]
    return ids, prompts, model.config.block_size


def measure_all(variants: dict[str, Path], args) -> list[dict]:
    ids, prompts, block = heldout_ids(args)
    rows = []
    for name, path in variants.items():
        print(f"measuring {name} ({path}) ...", file=sys.stderr, flush=True)
        if name == "onnx":
            row = onnx_row(path, ids, prompts, args)
        elif name.startswith("gguf"):
            row = gguf_row(path, ids, prompts, args, block)
        else:
            row = torch_row(path, ids, prompts, args)
        rows.append({"variant": name, "path": str(path), "bytes": dir_bytes(path), **row})
        print_row(rows[-1], rows[0])
    return rows


def print_row(row: dict, ref: dict) -> None:
    def speed(key: str) -> str:
        if key not in row:
            return "-"
        return f"{row[key]:.1f} ({row[key] / ref[key]:.2f}x)"

    loss = 100 * (row["ppl"] / ref["ppl"] - 1)
    print(f"| {row['variant']} | {row['bytes'] / 2**20:.1f} MiB ({row['bytes'] / ref['bytes']:.2f}x) | "
          f"{row['ppl']:.3f} ({loss:+.2f}%) | {speed('tok_s_b1')} | {speed('tok_s_b8')} |", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="the fp32 checkpoint (or run dir) to compress")
    p.add_argument("--out", type=Path, required=True, help="where the variants are written (and reused)")
    p.add_argument("--group-size", type=int, default=128, help="int4/GPTQ/AWQ group size (default 128)")
    p.add_argument("--methods", default=",".join(QUANT_METHODS), help="quantize methods to include")
    p.add_argument("--formats", default="onnx,gguf", help="export formats to include (onnx, gguf)")
    p.add_argument("--pruned", action="append", default=[], metavar="NAME=DIR", help="a pruned checkpoint row")
    p.add_argument("--student", type=Path, default=None, help="a distilled student's run dir")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.formats = [f for f in args.formats.split(",") if f]
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = make_variants(args)
    print(f"# variants of {args.ckpt}: {args.eval_tokens} held-out tokens, prompts of {args.prompt_tokens}, "
          f"{args.new_tokens} new tokens greedy, {args.threads} threads, median of {args.repeats}")
    print("| variant | size | held-out ppl (vs fp32) | tokens/s batch 1 (vs fp32) | tokens/s batch 8 (vs fp32) |")
    print("|---|---|---|---|---|")
    rows = measure_all(variants, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
