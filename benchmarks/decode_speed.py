"""CPU decoding speed: lmforge's `generate_batch` against transformers' `generate` on the same weights (issue 14).

    python benchmarks/decode_speed.py                      # 6x384 GPT-2, vocab 50304, 64 + 256 tokens
    python benchmarks/decode_speed.py --json decode.json --repeats 5
    python benchmarks/decode_speed.py --quick              # a smoke configuration (tiny model, seconds)
    python benchmarks/decode_speed.py --profile prof.txt   # torch.profiler of lmforge's fp32 decode
    py-spy record --format raw -o b1.txt -- python benchmarks/decode_speed.py --lmforge-only --batches 1 --threads 1

One random-weight GPT-2 (`--layers` x `--width`, vocab `--vocab`, learned positions, LayerNorm,
GPT-2's tanh-GELU; context `--block-size`) is built in lmforge (seed 0), saved as a checkpoint and
converted with lmforge's own `lmforge convert to-hf` machinery (`lmforge.export.hf.to_hf`); the
transformers side loads that directory as `GPT2LMHeadModel`, so both hold the same weights.

Rows (each at batch 1 and 8, every prompt `--prompt-len` random tokens, exactly `--new-tokens` new
tokens per row: no stop id, greedy):
  fp32   both sides in fp32.
  bf16   weights stored in bf16 on both sides: transformers `torch_dtype=torch.bfloat16`; lmforge
         `quantize_model(model, "bf16")` (every parameter cast, what `lmforge quantize --method bf16`
         writes) and `generate_batch` without autocast.
  int8 / int4  lmforge `quantize_model(model, "int8" / "int4")` (int4: `--group-size` 128), compared with
         transformers fp32 (the goal: faster than fp32 at batch 1; decoding is memory bound).
  fp32+layout  fp32 with `lmforge.infer.engine.inference_layout(model)`: every Linear weight stored
         (in, out), the layout CPU GEMVs stream fastest (same values, same greedy tokens).
  int8+head / int4+head / int8-dynamic+head  the same with `lm_head=True`: the (tied) output layer
         gets an 8-bit copy (int8 weight-only; W8A8 for int8-dynamic).
With `--plain-head`, fp32 rows time a third side: lmforge with `Engine(fast_head=False)` (the output
layer through `F.linear` as the model computes it, i.e. before the transposed-head change).
Timing: one process; per row a warm-up call of each side, then `--repeats` rounds that alternate
the two sides (background load hits both alike); the median wall time of a call gives tokens/s =
batch x new tokens / seconds (the prompt's prefill included, as a user sees it). `--clock cpu
--threads 1` times by the process's CPU seconds instead (when other processes take most of the
cores, wall time measures them; CPU time still carries their cache and memory-bandwidth contention). The ratio is
lmforge / transformers, printed with the issue's goals (>= 2x at batch 8, >= 1.5x at batch 1).
"same" compares the greedy tokens of the two sides (fp32 rows should agree; bf16 round-off can
flip a near-tie of the random model's flat logits).

llama.cpp (optional, never installed by this script): when `import llama_cpp` works, the same
weights are written as f32 and q8_0 GGUF and decoded at batch 1 with the same prompt (its own eval
loop, greedy, `n_threads` = torch's threads, a warm-up then `--repeats` timed calls, median). The
GGUF files come from llama.cpp's own `convert_hf_to_gguf.py` when `--llama-converter` names it
(shipped in llama-cpp-python's source distribution, vendor/llama.cpp/), else from lmforge's
`convert to-gguf` (whose greedy tokens equal llama.cpp's in tests/test_gguf.py); the checkpoint
carries a small byte-level BPE tokenizer for that (GGUF holds one; the random prompts are ids).
"same" there compares llama.cpp's f32 greedy tokens with lmforge fp32's at batch 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GOALS = {1: 1.5, 8: 2.0}  # lmforge / transformers tokens/s, issue 14 item 6
QUANTIZED = ("int8", "int8-dynamic", "int4", "int8+head", "int8-dynamic+head", "int4+head")  # goal: > fp32 at b1
VARIANTS = ("fp32", "fp32+layout", "bf16", *QUANTIZED)
CLOCK = [time.perf_counter]  # --clock cpu: time.process_time (the CPU seconds this process used)
QUICK = dict(layers=2, width=64, heads=2, vocab=512, block_size=64, prompt_len=8, new_tokens=16,
             batches=[1, 2], repeats=1, group_size=32)


def model_config(args: argparse.Namespace):
    from lmforge.models.config import ModelConfig

    return ModelConfig(vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads, n_embd=args.width,
                       block_size=args.block_size, dropout=0.0, bias=True, pos_encoding="learned",
                       norm="layernorm", mlp=args.mlp, tie_embeddings=True)


def bpe_tokenizer(tmp: Path, vocab_size: int) -> Path | None:
    """A small byte-level BPE tokenizer.json (what a GGUF file must carry), or None when the model's
    vocabulary is smaller than BPE's 256 byte tokens plus specials."""
    from lmforge.tokenizer.train import train_tokenizer

    if vocab_size < 320:
        return None
    (tmp / "corpus").mkdir(parents=True, exist_ok=True)
    (tmp / "corpus" / "a.txt").write_text("the king shall speak of love and death upon this night\n" * 50)
    train_tokenizer(tmp / "corpus", tmp / "tok", kind="bpe", vocab_size=300)
    return tmp / "tok" / "tokenizer.json"


def build_pair(args: argparse.Namespace, tmp: Path):
    """(lmforge model, path of its checkpoint, HF dir): random weights, converted by `to_hf`."""
    from lmforge.export.hf import to_hf
    from lmforge.models import build_model
    from lmforge.train.checkpoint import save_checkpoint, tied_aliases

    config = model_config(args)
    torch.manual_seed(0)
    model = build_model(config).eval()
    tokenizer = bpe_tokenizer(tmp, args.vocab)
    ckpt = save_checkpoint(tmp / "ckpt", model.state_dict(), config.to_dict(), tokenizer, None,
                           drop=tied_aliases(model))
    to_hf(ckpt, tmp / "hf")
    return model, ckpt, tmp / "hf"


def load_lmforge(ckpt: Path, variant: str, group_size: int = 128):
    """The checkpoint's weights in a fresh lmforge model, in `variant` (fp32, or a `quantize_model` method;
    "+head": with lm_head=True)."""
    from lmforge.compress.quantize import quantize_model
    from lmforge.models import build_model
    from lmforge.models.config import ModelConfig
    from lmforge.train.checkpoint import load_weights_into, read_model_config, read_weights

    model = build_model(ModelConfig.from_dict(read_model_config(ckpt)))
    load_weights_into(model, read_weights(ckpt), ckpt / "model.safetensors")
    model.eval()
    if variant == "fp32":
        return model
    if variant == "fp32+layout":
        from lmforge.infer.engine import inference_layout

        return inference_layout(model)
    method, _, head = variant.partition("+")
    return quantize_model(model, method, group_size=group_size, lm_head=head == "head").eval()


def load_hf(hf_dir: Path, dtype: torch.dtype):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(hf_dir, torch_dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # exactly max_new_tokens, like lmforge's side
    model.generation_config.pad_token_id = 0
    return model


def run_lmforge(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from lmforge.infer.generate import generate_batch

    return generate_batch(model, prompts, new_tokens, temperature=0.0)


def run_lmforge_plain_head(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """generate_batch's engine with fast_head=False (the output layer as the model computes it)."""
    from lmforge.infer.engine import Engine, SamplingParams

    engine = Engine(model, max_batch=len(prompts), fast_head=False)
    index = {engine.add(p, SamplingParams(new_tokens, temperature=0.0)): i for i, p in enumerate(prompts)}
    ids: list[list[int]] = [[] for _ in prompts]
    while engine.has_work:
        for event in engine.step():
            ids[index[event.request_id]].append(event.token_id)
    return ids


def run_hf(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    return out[:, ids.shape[1]:].tolist()


def timed(fn, *a) -> tuple[list[list[int]], float]:
    start = CLOCK[0]()
    ids = fn(*a)
    return ids, CLOCK[0]() - start


def measure(sides: dict, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    """Warm-up each side, then `repeats` alternating rounds; per side tokens/s (median), ids, counts."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    ids = {name: fn(prompts, new_tokens) for name, fn in sides.items()}  # warm-up
    for _ in range(repeats):
        for name, fn in sides.items():
            ids[name], seconds = timed(fn, prompts, new_tokens)
            times[name].append(seconds)
    tokens = len(prompts) * new_tokens
    return {name: {"tokens_per_s": tokens / statistics.median(times[name]), "seconds": times[name],
                   "new_tokens": [len(row) for row in ids[name]], "ids": ids[name]} for name in sides}


def row_result(variant: str, batch: int, measured: dict) -> dict:
    ours, theirs = measured["lmforge"], measured["transformers"]
    ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
    plain = measured.get("plain_head")
    extra = {} if plain is None else {"lmforge_plain_head_tokens_per_s": plain["tokens_per_s"],
                                      "plain_head_same_tokens": plain["ids"] == ours["ids"]}
    return {**extra, "variant": variant, "batch": batch, "lmforge_tokens_per_s": ours["tokens_per_s"],
            "transformers_tokens_per_s": theirs["tokens_per_s"], "ratio": ratio, "goal": GOALS.get(batch),
            "same_tokens": ours["ids"] == theirs["ids"], "lmforge_ids": ours["ids"],
            "lmforge_new_tokens": ours["new_tokens"],
            "transformers_new_tokens": theirs["new_tokens"], "lmforge_seconds": ours["seconds"],
            "transformers_seconds": theirs["seconds"]}


def run_rows(args: argparse.Namespace, ckpt: Path, hf_dir: Path, prompts: list[list[int]]) -> list[dict]:
    """Every (variant, batch) row; int8/int4 compare against transformers fp32."""
    hf = {"fp32": load_hf(hf_dir, torch.float32)}
    if "bf16" in args.variants:
        hf["bf16"] = load_hf(hf_dir, torch.bfloat16)
    rows = []
    for variant in args.variants:
        ours = load_lmforge(ckpt, variant, args.group_size)
        theirs = hf["bf16" if variant == "bf16" else "fp32"]
        for batch in args.batches:
            sides = {"lmforge": lambda p, n, m=ours: run_lmforge(m, p, n),
                     "transformers": lambda p, n, m=theirs: run_hf(m, p, n)}
            if args.plain_head and variant == "fp32":
                sides["plain_head"] = lambda p, n, m=ours: run_lmforge_plain_head(m, p, n)
            rows.append(row_result(variant, batch, measure(sides, prompts[:batch], args.new_tokens, args.repeats)))
            print_row(rows[-1], flush=True)
    return rows


def print_header(args: argparse.Namespace, llama: dict) -> None:
    print(f"GPT-2 {args.layers}x{args.width}, vocab {args.vocab}, context {args.block_size}, mlp {args.mlp}; "
          f"prompt {args.prompt_len} + {args.new_tokens} new tokens, greedy; torch threads "
          f"{torch.get_num_threads()}; median of {args.repeats}; {args.clock} clock")
    print(f"llama.cpp: {llama.get('status')}")
    print(f"{'variant':<12} {'batch':>5} {'lmforge tok/s':>14} {'transformers tok/s':>19} {'ratio':>7} "
          f"{'goal':>6}  same tokens")


def print_row(r: dict, flush: bool = False) -> None:
    goal = r["goal"]
    if r["variant"] in QUANTIZED:
        goal_text = "> fp32" if r["batch"] == 1 else ""
    else:
        goal_text = f">={goal}x" if goal else ""
    mark = "" if not goal or r["variant"] in QUANTIZED else (" ok" if r["ratio"] >= goal else " MISS")
    plain = r.get("lmforge_plain_head_tokens_per_s")
    plain_text = "" if plain is None else (f"  (plain head {plain:.1f} tok/s: fast head "
                                           f"{r['lmforge_tokens_per_s'] / plain:.2f}x, same tokens "
                                           f"{'yes' if r['plain_head_same_tokens'] else 'no'})")
    print(f"{r['variant']:<12} {r['batch']:>5} {r['lmforge_tokens_per_s']:>14.1f} "
          f"{r['transformers_tokens_per_s']:>19.1f} {r['ratio']:>6.2f}x {goal_text:>6}{mark}  "
          f"{'yes' if r['same_tokens'] else 'no'}{plain_text}", flush=flush)


def quant_vs_fp32(rows: list[dict]) -> list[str]:
    """int8/int4 vs lmforge fp32 at the same batch (goal at batch 1: faster)."""
    fp32 = {r["batch"]: r["lmforge_tokens_per_s"] for r in rows if r["variant"] == "fp32"}
    lines = []
    for r in rows:
        if (r["variant"] in QUANTIZED or r["variant"] == "fp32+layout") and r["batch"] in fp32:
            x = r["lmforge_tokens_per_s"] / fp32[r["batch"]]
            verdict = (" ok" if x > 1 else " MISS") if r["batch"] == 1 and r["variant"] in QUANTIZED else ""
            lines.append(f"lmforge {r['variant']} / lmforge fp32 at batch {r['batch']}: {x:.2f}x{verdict}")
    return lines


def llama_lines(rows: list[dict], llama: dict) -> list[str]:
    """llama.cpp's f32 / q8_0 tokens/s at batch 1 against every lmforge batch-1 row of this run."""
    lines = []
    ours = {r["variant"]: r for r in rows if r["batch"] == 1}
    for key in ("f32", "q8_0"):
        if f"{key}_tokens_per_s" not in llama:
            continue
        theirs = llama[f"{key}_tokens_per_s"]
        vs = ", ".join(f"{v} {r['lmforge_tokens_per_s'] / theirs:.2f}x" for v, r in ours.items())
        same = ""
        if key == "f32" and "fp32" in ours:
            agree = llama["f32_ids"] == ours["fp32"]["lmforge_ids"][0]
            same = f"; greedy tokens = lmforge fp32's: {'yes' if agree else 'no'}"
        lines.append(f"llama.cpp {key} batch 1: {theirs:.1f} tok/s; lmforge / llama.cpp: {vs}{same}")
    return lines


# --------------------------------------------------------------------------------------------
# llama.cpp (optional)


def llama_cpp_column(args: argparse.Namespace, hf_dir: Path, ckpt: Path, prompt: list[int], tmp: Path) -> dict:
    """llama-cpp-python's batch-1 tokens/s (and greedy ids) for f32 and q8_0 GGUF files of these
    weights, or why not: llama.cpp's converter on `hf_dir` if given, else lmforge's `to_gguf`."""
    try:
        import llama_cpp
    except ImportError:
        return {"status": "not installed (pip install llama-cpp-python: an optional bench dependency)"}
    converter = "llama.cpp convert_hf_to_gguf.py" if args.llama_converter else "lmforge convert to-gguf"
    result: dict = {"status": f"installed; measured on GGUF files from {converter}"}
    for outtype in ("f32", "q8_0"):
        gguf = tmp / f"model-{outtype}.gguf"
        failed = gguf_file(args, hf_dir, ckpt, outtype, gguf)
        if failed:
            return {"status": f"installed, but the GGUF conversion failed: {failed}"}
        llm = llama_cpp.Llama(str(gguf), n_ctx=args.block_size, n_threads=torch.get_num_threads(),
                              n_batch=args.block_size, verbose=False)
        seconds, ids = [], []
        for _ in range(args.repeats + 1):  # the first is the warm-up
            llm.reset()
            start = CLOCK[0]()
            ids = []
            for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
                ids.append(int(token))
                if len(ids) == args.new_tokens:
                    break
            seconds.append(CLOCK[0]() - start)
        result[f"{outtype}_tokens_per_s"] = args.new_tokens / statistics.median(seconds[1:])
        result[f"{outtype}_ids"] = ids
        del llm
    return result


def gguf_file(args: argparse.Namespace, hf_dir: Path, ckpt: Path, outtype: str, out: Path) -> str | None:
    """Write `out` (f32 or q8_0); None, or the reason it failed (one line)."""
    if args.llama_converter:
        done = subprocess.run([sys.executable, args.llama_converter, str(hf_dir), "--outtype", outtype,
                               "--outfile", str(out)], capture_output=True, text=True)
        return (done.stderr.strip().splitlines() or ["?"])[-1] if done.returncode else None
    from lmforge.errors import UserError
    from lmforge.export.gguf import to_gguf

    try:
        to_gguf(ckpt, out, qtype=outtype)
    except UserError as e:
        return str(e)
    return None


# --------------------------------------------------------------------------------------------
# profile


def profile(args: argparse.Namespace, ckpt: Path, prompts: list[list[int]], out: Path | None) -> dict:
    """torch.profiler of lmforge fp32 decoding at each batch: the op table (self CPU time) to `out`;
    without `out` (--lmforge-only), just warm-up + `--repeats` timed calls, for an outside profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = load_lmforge(ckpt, "fp32")
    parts, speeds = [], {}
    for batch in args.batches:
        run_lmforge(model, prompts[:batch], args.new_tokens)  # warm-up
        if out is None:
            seconds = [timed(run_lmforge, model, prompts[:batch], args.new_tokens)[1] for _ in range(args.repeats)]
            speeds[batch] = batch * args.new_tokens / statistics.median(seconds)
            print(f"lmforge fp32 batch {batch}: {speeds[batch]:.1f} tokens/s", flush=True)
            continue
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            _, seconds = timed(run_lmforge, model, prompts[:batch], args.new_tokens)
        table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30)
        parts.append(f"== lmforge fp32, batch {batch}: {batch * args.new_tokens} tokens in {seconds:.2f} s "
                     f"(profiled)\n{table}")
    if out is not None:
        out.write_text("\n\n".join(parts))
        print(f"profile written to {out}")
    return {"lmforge_fp32_tokens_per_s": speeds}


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--block-size", type=int, default=320, help="context (>= prompt + new tokens)")
    parser.add_argument("--mlp", default="gelu_tanh", choices=["gelu_tanh", "gelu", "relu"],
                        help="activation (GPT-2's is gelu_tanh = transformers' gelu_new)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--variants", nargs="+",
                        default=["fp32", "fp32+layout", "bf16", "int8", "int4", "int8+head", "int4+head"],
                        choices=VARIANTS)
    parser.add_argument("--plain-head", action="store_true",
                        help="fp32 rows also time lmforge with Engine(fast_head=False) (the plain output layer)")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed rounds (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: time by the process's CPU seconds (with --threads 1 only), for a machine "
                             "so busy that wall time measures the other processes")
    parser.add_argument("--llama-converter", help="llama.cpp's convert_hf_to_gguf.py (llama.cpp column)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke configuration: " + str(QUICK))
    parser.add_argument("--json", type=Path, help="write the rows (and the llama.cpp column) here")
    parser.add_argument("--profile", type=Path, help="profile lmforge fp32 decoding into this file instead")
    parser.add_argument("--lmforge-only", action="store_true",
                        help="only time lmforge fp32 decoding (warm-up + --repeats calls; e.g. under py-spy)")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (idle worker threads would count as work)")
    if args.prompt_len + args.new_tokens > args.block_size:
        parser.error(f"--prompt-len + --new-tokens must fit --block-size {args.block_size}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    rng = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, args.vocab, (max(args.batches), args.prompt_len), generator=rng).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        _, ckpt, hf_dir = build_pair(args, Path(tmp))
        if args.profile or args.lmforge_only:
            return profile(args, ckpt, prompts, args.profile)
        llama = llama_cpp_column(args, hf_dir, ckpt, prompts[0], Path(tmp))
        print_header(args, llama)
        rows = run_rows(args, ckpt, hf_dir, prompts)
    for line in quant_vs_fp32(rows):
        print(line)
    for line in llama_lines(rows, llama):
        print(line)
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("json", "profile")}, "rows": rows,
              "llama_cpp": llama, "torch_threads": torch.get_num_threads()}
    if args.json:
        from lmforge.fsutil import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
