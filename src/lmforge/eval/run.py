"""`lmforge eval`: run task files against a checkpoint and write results.json, report.md and plots.

A task is a JSONL task file (see `tasks.py`, docs/EVAL.md), a directory of them, or a token
directory from `lmforge tokenize` (perplexity over one of its splits). Every result names the
split it read: the task header's `split`, `--split`, or for a token directory the split
itself. Evaluating on training data is allowed but flagged, since it measures memorization.

Output (`out` is replaced atomically): for one task, `results.json`, `report.md`, plots and
`summary.json` directly in `out`; for several, one such directory per task under `out` plus
an overview `report.md` and `results.json` indexing them.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import UserError
from lmforge.eval import report, seq2seq
from lmforge.eval.prompting import IGNORES_SHOTS, load_template, make_prompter
from lmforge.eval.runners import RUNNERS, Result, Settings, run_perplexity_sequences
from lmforge.eval.tasks import KINDS, Task, load_task
from lmforge.fsutil import atomic_dir, atomic_write_json, atomic_write_text, write_summary

TRAIN_NOTE = "training data: these numbers measure memorization, not generalization to unseen text"
# kinds that score the model on passages of text: on the training split they are inflated, so
# they warn (knowledge questions about the training text, e.g. binary or qa, are fine there)
PASSAGE_KINDS = ("perplexity", "generation", "multiple_choice")


def _task_sources(paths: list[str | Path]) -> list[Path]:
    """Expand directories of task files; keep token directories (meta.json) as they are."""
    sources: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not (p / "meta.json").is_file():
            found = sorted(p.glob("*.jsonl"))
            if not found:
                raise UserError(f"{p}: no .jsonl task files inside; pass a task file, a directory of them, "
                                "or a token directory from `lmforge tokenize`")
            sources += found
        elif not p.exists():
            raise UserError(f"task {p} does not exist; pass a .jsonl task file (see docs/EVAL.md)")
        else:
            sources.append(p)
    return sources


def _split_note(split: str | None) -> str | None:
    if split is None:
        return "not stated by the task file (add \"split\" to its header, or pass --split)"
    if split.split()[0].lower() in ("train", "training"):
        return TRAIN_NOTE
    return None


def _token_dir_task(path: Path, split: str | None, model, tokenizer, limit: int | None, settings: Settings,
                    kind: str | None) -> tuple[dict[str, Any], Result]:
    """Perplexity over one split of a token directory (default: val)."""
    import numpy as np

    from lmforge.tokenizer.shards import load_split, read_meta

    if kind not in (None, "perplexity"):
        raise UserError(f"{path} is a token directory: only --kind perplexity applies to it")
    seq2seq.require_lm(model, "perplexity", allow_seq2seq=False)
    split = split or "val"
    meta = read_meta(path)
    if meta.get("eos_id") != tokenizer.eos_id or meta.get("vocab_size") != tokenizer.vocab_size:
        raise UserError(f"{path}/meta.json was made with another tokenizer (vocab {meta.get('vocab_size')}, "
                        f"eos {meta.get('eos_id')}) than the checkpoint's; re-tokenize with the checkpoint's tokenizer")
    shards = load_split(path, split)
    block = model.config.block_size
    # the stream starts right after a document boundary: prefix the eos that precedes every document.
    # An int64 array, not a list: a split can hold far more tokens than a Python list should.
    ids = np.concatenate([np.array([tokenizer.eos_id]), *shards]).astype(np.int64)
    if limit:
        ids = ids[:limit * block + 1]  # exactly `limit` windows of block_size predicted tokens
        text_ids = ids[1:][ids[1:] != tokenizer.eos_id]
        n_bytes = len(tokenizer.decode(text_ids.tolist()).encode("utf-8"))
    else:  # the UTF-8 bytes of the split's documents, counted when it was tokenized
        n_bytes = int(meta["splits"][split]["bytes"])
    result = run_perplexity_sequences(model, [ids], [n_bytes], settings)
    result.notes.append(f"the '{split}' token stream of {path}: every token (including the <|eos|> document "
                        "separators) is predicted once, in disjoint windows of the model's context")
    info = {"task": f"{path.name}_{split}_perplexity", "kind": "perplexity", "task_file": str(path),
            "split": split, "items_in_file": int(meta["splits"][split]["tokens"])}
    return info, result


def evaluate(ckpt: str | Path, tasks: list[str | Path], out: str | Path, *, kind: str | None = None,
             split: str | None = None, limit: int | None = None, seed: int = 0, batch_size: int = 16,
             answer_mode: str = "loglikelihood", max_new_tokens: int | None = None, temperature: float = 0.0,
             device: str = "cpu", progress: bool = True, fewshot: int | Sequence[int] = 0, fewshot_seed: int = 0,
             cot: bool = False, template: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint (or run dir) on each task; returns {"tasks": [result, ...], ...}.

    `fewshot` K > 0 puts K solved train examples before each item, `cot` adds the template's reasoning
    cue to generation/qa items and scores the answer after its marker, `template` is a prompt template
    file (eval/prompting.py). A list of K (`[0, 1, 3, 5]`) runs each, into `out/fewshot_K/`, and writes
    them side by side in `out/results.json` and `out/report.md`; it returns {"runs": {K: [result, ...]}, ...}.
    """
    from lmforge.train.checkpoint import load_pretrained, resolve_checkpoint

    _check_options(kind, limit, batch_size, temperature)
    shots = [fewshot] if isinstance(fewshot, int) else list(fewshot)
    sources = _task_sources(tasks)
    # load (= validate) every task file, template and few-shot pool before the model: a bad line fails in a second
    loaded = {p: load_task(p, kind) for p in sources if not (p.is_dir() and (p / "meta.json").is_file())}
    names = _task_names(sources, loaded, split)
    prompt_template = load_template(template) if template is not None or len(shots) > 1 else None
    prompters = {k: {p: make_prompter(t, k, fewshot_seed, cot, prompt_template) for p, t in loaded.items()}
                 for k in shots}

    start = time.perf_counter()
    checkpoint = resolve_checkpoint(ckpt)
    model, tokenizer = load_pretrained(checkpoint, device)
    settings = Settings(batch_size=batch_size, seed=seed, answer_mode=answer_mode,
                        max_new_tokens=max_new_tokens, temperature=temperature, progress=progress)
    config = {"tasks": [str(s) for s in sources], "kind": kind, "split": split, "limit": limit, "seed": seed,
              "batch_size": batch_size, "answer_mode": answer_mode, "max_new_tokens": max_new_tokens,
              "temperature": temperature, "device": device}
    if shots != [0] or cot or template is not None:
        config.update(fewshot=shots if len(shots) > 1 else shots[0], fewshot_seed=fewshot_seed, cot=cot,
                      template=str(template) if template is not None else None)
    inputs = {"checkpoint": checkpoint, **{f"task:{n}": s for n, s in zip(names, sources)}}
    cache: dict[Path, tuple[dict[str, Any], Any]] = {}  # tasks that read no prompt run once for all K
    runs = {}
    for k in shots:
        runs[k] = _run_tasks(sources, loaded, prompters[k], split, model, tokenizer, limit, settings, kind,
                             str(checkpoint), cache)
    wall = time.perf_counter() - start
    if len(shots) == 1:
        results, extras = runs[shots[0]]
        _write_outputs(Path(out), results, extras, str(checkpoint), config, inputs, wall)
        return {"checkpoint": str(checkpoint), "out": str(out), "tasks": results, "wall_time_s": wall}
    _write_fewshot_outputs(Path(out), runs, str(checkpoint), config, inputs, wall)
    return {"checkpoint": str(checkpoint), "out": str(out), "fewshot": shots,
            "runs": {k: results for k, (results, _) in runs.items()}, "wall_time_s": wall}


def _run_tasks(sources: list[Path], loaded: dict[Path, Task], prompters: dict[Path, Any], split: str | None,
               model, tokenizer, limit: int | None, settings: Settings, kind: str | None, checkpoint: str,
               cache: dict[Path, tuple[dict[str, Any], Any]]) -> tuple[list[dict[str, Any]], list]:
    """Run every task once; a task that reads no prompt (perplexity) is taken from `cache` after its first run."""
    results: list[dict[str, Any]] = []
    extras: list[tuple[str, list[float]] | None] = []
    for source in sources:
        if source in cache:
            results.append(cache[source][0])
            extras.append(cache[source][1])
            continue
        torch.manual_seed(settings.seed)
        prompter = prompters.get(source)
        if source in loaded:
            info, result = _file_task(source, loaded[source], split, model, tokenizer, limit, settings, prompter)
            task_split = loaded[source].split or split
        else:
            info, result = _token_dir_task(source, split, model, tokenizer, limit, settings, kind)
            task_split = info["split"]
        note = _split_note(task_split)
        if note == TRAIN_NOTE and info["kind"] in PASSAGE_KINDS:
            warnings.warn(f"{info['task']}: evaluating on the training split; {TRAIN_NOTE}", stacklevel=2)
        record = {**info, "split_note": note, "checkpoint": checkpoint, "limit": limit, "seed": settings.seed,
                  "temperature": settings.temperature,
                  "metrics": result.metrics, "notes": result.notes, "predictions": result.predictions}
        if prompter is not None:
            record["prompting"] = prompter.info()
        results.append(record)
        extras.append(result.item_scores)
        if info["kind"] in IGNORES_SHOTS:
            cache[source] = (record, result.item_scores)
    return results, extras


def _check_options(kind: str | None, limit: int | None, batch_size: int, temperature: float) -> None:
    if kind is not None and kind not in KINDS:
        raise UserError(f"--kind {kind!r} is not one of {', '.join(KINDS)}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if not temperature >= 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")


def _task_names(sources: list[Path], loaded: dict[Path, Task], split: str | None) -> list[str]:
    """Each task's output name (distinct); a task file's header split must agree with --split."""
    names = [safe_name(loaded[p].name) if p in loaded else p.name for p in sources]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"two tasks are named {dup!r}; give them different file names or header names")
    for p, task in loaded.items():
        if split is not None and task.split is not None and task.split != split:
            raise UserError(f"{p}: the header says split {task.split!r} but --split is {split!r}; drop --split")
    return names


def _file_task(source: Path, task: Task, split: str | None, model, tokenizer, limit: int | None,
               settings: Settings, prompter=None) -> tuple[dict[str, Any], Result]:
    """Run a task file's runner (on its first `limit` items), with the prompter's few-shot/CoT prompts if any."""
    n_file = len(task.items)
    if limit:
        task.items, task.lines = task.items[:limit], task.lines[:limit]
    if prompter is not None:
        settings = replace(settings, prompter=prompter)
    result = RUNNERS[task.kind](task, model, tokenizer, settings)
    if prompter is not None:
        result.notes += prompter.notes(task)
    info = {"task": safe_name(task.name), "kind": task.kind, "task_file": str(source),
            "split": task.split or split or "unstated", "items_in_file": n_file}
    for key in ("description", "source"):
        if task.header.get(key):
            info[key] = task.header[key]
    return info, result


def _write_outputs(out: Path, results: list[dict[str, Any]], extras: list, checkpoint: str,
                   config: dict[str, Any], inputs: dict[str, Any], wall: float) -> None:
    """One task: its files in `out`; several: a directory each plus an overview (`out` replaced atomically)."""
    with atomic_dir(out) as tmp:
        _write_into(tmp, results, extras, checkpoint, config, inputs, wall)


def _write_into(tmp: Path, results: list[dict[str, Any]], extras: list, checkpoint: str,
                config: dict[str, Any], inputs: dict[str, Any], wall: float) -> None:
    if len(results) == 1:
        _write_task(results[0], extras[0], tmp)
    else:
        for result, extra in zip(results, extras):
            (tmp / result["task"]).mkdir()
            _write_task(result, extra, tmp / result["task"])
        atomic_write_json(tmp / "results.json", {
            "checkpoint": checkpoint,
            "tasks": {r["task"]: {"kind": r["kind"], "split": r["split"], "task_file": r["task_file"],
                                  "metrics": r["metrics"], "results": f"{r['task']}/results.json"}
                      for r in results},
        })
        atomic_write_text(tmp / "report.md", report.overview_report(checkpoint, results))
    write_summary(tmp, "eval", config=config, inputs=inputs,
                  metrics={r["task"]: report.summary_metrics(r["metrics"]) for r in results}, wall_time_s=wall)


def _write_fewshot_outputs(out: Path, runs: dict[int, tuple[list[dict[str, Any]], list]], checkpoint: str,
                           config: dict[str, Any], inputs: dict[str, Any], wall: float) -> None:
    """`fewshot_K/` per K (as a single run writes it) and the runs side by side in results.json and report.md."""
    with atomic_dir(out) as tmp:
        for k, (results, extras) in runs.items():
            (tmp / f"fewshot_{k}").mkdir()
            _write_into(tmp / f"fewshot_{k}", results, extras, checkpoint, {**config, "fewshot": k}, inputs, wall)
        table = report.fewshot_results(checkpoint, {k: results for k, (results, _) in runs.items()})
        atomic_write_json(tmp / "results.json", table)
        atomic_write_text(tmp / "report.md", report.fewshot_report(table))
        write_summary(tmp, "eval", config=config, inputs=inputs,
                      metrics={name: t["by_shots"] for name, t in table["tasks"].items()},
                      wall_time_s=wall)


def _write_task(result: dict[str, Any], item_scores, out: Path) -> None:
    plots = report.write_plots(result, item_scores, out)
    result["plots"] = plots
    atomic_write_json(out / "results.json", result)
    report.write_task_report(result, plots, out)


def safe_name(name: str) -> str:
    """A task name usable as a directory name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
