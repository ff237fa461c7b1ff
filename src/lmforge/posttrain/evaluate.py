"""Post-training evaluation: base vs fine-tuned models on held-out tasks (`lmforge posttrain-eval`).

For each model, on the held-out files of `lmforge data make-sft` (the test split):

- `speaker_acc`, `speaker_ci95`: which of four characters speaks the next line, picked by
  log-likelihood (`lmforge.eval.scoring`), with the Wilson score interval. Each model is asked in
  its own format: a `plain` model (a pretrained base) reads the passage and scores each candidate
  as play text (the speaker prefix and the line, as make-tasks' speaker task writes them); a `chat`
  model reads the chat question and scores each candidate as the assistant's answer (the name and
  the end-of-turn token).
- `pref_acc` (and `pref_acc_by_kind`): the share of held-out preference pairs whose chosen reply
  has the higher summed log-likelihood (ties count as wrong); a chat model reads the pair through
  the chat template (`ChatTemplate.encode_reply`, as DPO scores it), a plain model the user turn
  as text, a newline, then the reply.
- `ends_by_itself`: the share of held-out prompts (chat template, greedy, at most `max_new_tokens`
  new tokens) whose reply ends with the end-of-turn token. Every model is asked in the chat format
  here: a base model has never seen it, which is the point of the comparison.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lmforge.errors import UserError

FORMATS = ("plain", "chat")
SPEAKER_KEYS = ("context", "choices", "gold", "messages", "answers")


@dataclass
class ModelSpec:
    """A model to evaluate: its name in the table, checkpoint (or run dir) and prompt format."""

    name: str
    path: Path
    format: str


# summary.json's own keys; each model's metrics sit under its name at the top level too
RESERVED_NAMES = ("stage", "created", "config", "inputs", "metrics", "versions", "wall_time_s", "samples", "goals")


def parse_models(values: list[str], formats: list[str] | None = None) -> list[ModelSpec]:
    """`NAME=DIR` specs (a model named `base` is prompted in plain text, others in the chat format),
    then `NAME=plain|chat` overrides."""
    specs: list[ModelSpec] = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--model {value!r}: write NAME=DIR, e.g. --model sft=runs/demo/posttrain/sft")
        if any(s.name == name for s in specs):
            raise UserError(f"--model {value!r}: the name {name!r} is given twice; name each model once")
        if name in RESERVED_NAMES:
            raise UserError(f"--model {value!r}: {name!r} is a key of summary.json; pick another model name")
        specs.append(ModelSpec(name, Path(path), "plain" if name == "base" else "chat"))
    for value in formats or []:
        name, _, fmt = value.partition("=")
        spec = next((s for s in specs if s.name == name), None)
        if spec is None or fmt not in FORMATS:
            raise UserError(f"--format {value!r}: write NAME=plain|chat for a NAME given with --model "
                            f"({', '.join(s.name for s in specs)})")
        spec.format = fmt
    if not specs:
        raise UserError("no --model given; pass --model NAME=DIR (e.g. base=runs/demo/model)")
    return specs


def read_speaker_items(path: Path) -> list[dict[str, Any]]:
    """The four-choice speaker items of `speaker_heldout.jsonl` (both formats), each line checked."""
    items = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path} is missing; pass --data the output dir of `lmforge data make-sft`") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}:{lineno}: not JSON ({e}); re-run `lmforge data make-sft`") from None
        missing = [k for k in SPEAKER_KEYS if k not in item] if isinstance(item, dict) else list(SPEAKER_KEYS)
        if missing or len(item["choices"]) != len(item["answers"]) or not 0 <= item["gold"] < len(item["choices"]):
            what = f"no {missing[0]!r}" if missing else "choices, answers and gold do not agree"
            raise UserError(f"{path}:{lineno}: {what}; re-run `lmforge data make-sft`")
        items.append(item)
    if not items:
        raise UserError(f"{path}: no speaker items; re-run `lmforge data make-sft` on more held-out text")
    return items


# ---- the three measurements ---------------------------------------------------------------------

def speaker_accuracy(model, tokenizer, template, items: list[dict[str, Any]], fmt: str, *, batch_size: int = 16,
                     progress: bool = True) -> dict[str, Any]:
    """The true speaker among the candidates by log-likelihood, in the model's format; Wilson 95% CI."""
    from lmforge.eval import scoring
    from lmforge.eval.metrics import wilson_interval

    requests: list[tuple[list[int], list[int]]] = []
    for item in items:
        if fmt == "plain":
            requests += [scoring.encode_pair(tokenizer, item["context"], choice) for choice in item["choices"]]
        else:
            requests += [template.encode_reply(item["messages"], answer) for answer in item["answers"]]
    results = scoring.loglikelihoods(model, requests, batch_size=batch_size, desc="speaker", progress=progress)
    correct, k = 0, 0
    for item in items:
        lls = [r.logprob for r in results[k:k + len(item["choices"])]]
        k += len(lls)
        correct += max(range(len(lls)), key=lls.__getitem__) == item["gold"]
    low, high = wilson_interval(correct, len(items))
    return {"speaker_acc": correct / len(items), "speaker_ci95": [low, high], "speaker_n": len(items)}


def plain_prompt(messages: list[dict[str, str]]) -> str:
    """A chat prompt as plain text for a base model: the turns' contents, then a newline."""
    return "\n\n".join(m["content"] for m in messages) + "\n"


def preference_accuracy(model, tokenizer, template, pairs: list, fmt: str, *, batch_size: int = 16,
                        progress: bool = True) -> dict[str, Any]:
    """The share of pairs whose chosen reply the model finds more likely than the rejected one."""
    from lmforge.data.sft import kind_of
    from lmforge.eval import scoring
    from lmforge.posttrain.data import encode_pair

    requests: list[tuple[list[int], list[int]]] = []
    for pair in pairs:
        if fmt == "plain":
            prompt = plain_prompt(pair.messages)
            requests += [scoring.encode_pair(tokenizer, prompt, pair.chosen),
                         scoring.encode_pair(tokenizer, prompt, pair.rejected)]
        else:
            prompt_ids, chosen, rejected = encode_pair(template, pair)
            requests += [(prompt_ids, chosen), (prompt_ids, rejected)]
    results = scoring.loglikelihoods(model, requests, batch_size=batch_size, desc="pairs", progress=progress)
    wins = [results[2 * i].logprob > results[2 * i + 1].logprob for i in range(len(pairs))]
    by_kind: dict[str, list[bool]] = {}
    for pair, win in zip(pairs, wins):
        by_kind.setdefault(kind_of(pair.messages) or "other", []).append(win)
    return {"pref_acc": sum(wins) / len(wins), "pref_n": len(wins),
            "pref_acc_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}}


def replies_that_end(model, tokenizer, template, prompts: list[list[dict[str, str]]], *, max_new_tokens: int = 32,
                     batch_size: int = 64, progress: bool = True) -> tuple[dict[str, Any], list[str]]:
    """({ends_by_itself, ends_n, prompts_cut}, the replies): greedy replies to the chat prompts; a reply
    ends by itself when its last token is the end-of-turn token. A prompt longer than the context
    minus `max_new_tokens` keeps its end (the question)."""
    from lmforge.infer.generate import generate_batch

    room = model.config.block_size - max_new_tokens
    if room < 2:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
                        f"{model.config.block_size} tokens; lower it")
    ids = [template.encode(messages, add_generation_prompt=True) for messages in prompts]
    cut = sum(len(x) > room for x in ids)
    ids = [x[-room:] for x in ids]
    stop = set(template.stop_ids) | ({tokenizer.eos_id} if getattr(tokenizer, "eos_id", None) is not None else set())
    new: list[list[int]] = []
    for start in tqdm(range(0, len(ids), batch_size), desc="replies", unit="batch", disable=not progress, leave=False):
        new += generate_batch(model, ids[start:start + batch_size], max_new_tokens, temperature=0.0, stop_ids=stop)
    ended = sum(bool(x) and x[-1] == template.end_id for x in new)
    texts = [tokenizer.decode([t for t in x if t not in stop]) for x in new]
    return {"ends_by_itself": ended / len(new), "ends_n": len(new), "prompts_cut": cut}, texts


# ---- the command --------------------------------------------------------------------------------

def evaluate_models(specs: list[ModelSpec], data: str | Path, out: str | Path, *, limit: int | None = None,
                    max_new_tokens: int = 32, batch_size: int = 16, device: str = "cpu",
                    progress: bool = True) -> dict[str, Any]:
    """Measure each model on the held-out files in `data` (a `data make-sft` output); writes
    `out/summary.json` (metrics: {model name: {speaker_acc, speaker_ci95, pref_acc, ends_by_itself,
    ...}}, each model's also at the top level under its name (`summary["sft"]["speaker_acc"]`), plus
    `goals` when models named base, sft and dpo are there) and returns it.
    `limit`: at most this many items of each held-out file (the first ones)."""
    from lmforge.fsutil import write_summary
    from lmforge.posttrain.data import read_pairs, read_sft
    from lmforge.tokenizer.chat import chat_template
    from lmforge.train.checkpoint import load_pretrained, resolve_checkpoint

    data, out = Path(data), Path(out)
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    speaker = read_speaker_items(data / "speaker_heldout.jsonl")[:limit]
    pairs = read_pairs(data / "preferences_heldout.jsonl")[:limit]
    prompts = [_prompt_turns(e.messages) for e in read_sft(data / "sft_heldout.jsonl")[:limit] if e.messages]
    checkpoints = {s.name: resolve_checkpoint(s.path) for s in specs}  # every path checked before any work
    start = time.perf_counter()
    metrics: dict[str, dict[str, Any]] = {}
    samples: dict[str, list[dict[str, str]]] = {}
    for spec in tqdm(specs, desc="models", unit="model", disable=not progress):
        torch.manual_seed(0)
        model, tokenizer = load_pretrained(checkpoints[spec.name], device)
        template = chat_template(tokenizer)
        kw = {"batch_size": batch_size, "progress": progress}
        row: dict[str, Any] = {"format": spec.format}
        row.update(speaker_accuracy(model, tokenizer, template, speaker, spec.format, **kw))
        row.update(preference_accuracy(model, tokenizer, template, pairs, spec.format, **kw))
        ends, replies = replies_that_end(model, tokenizer, template, prompts, max_new_tokens=max_new_tokens,
                                         progress=progress)
        row.update(ends)
        metrics[spec.name] = row
        samples[spec.name] = [{"prompt": p[-1]["content"][-160:], "reply": r} for p, r in zip(prompts[:3], replies)]
        del model
    config = {"models": {s.name: {"path": str(s.path), "format": s.format} for s in specs}, "limit": limit,
              "max_new_tokens": max_new_tokens, "batch_size": batch_size, "device": device,
              "speaker_ci95": "Wilson score interval"}
    extra: dict[str, Any] = {**metrics, "samples": samples}
    goals = check_goals(metrics)
    if goals:
        extra["goals"] = goals
    return write_summary(out, "posttrain-eval", config=config, inputs={"data": data, **checkpoints},
                         metrics=metrics, wall_time_s=time.perf_counter() - start, extra=extra)


def _prompt_turns(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The turns before the last assistant reply (what the model is asked to answer)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def check_goals(metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """issue 12's demo goals, when models named base, sft and dpo were measured: SFT's speaker accuracy
    beats the base's by a margin outside the 95% CIs (each accuracy outside the other's interval), DPO's
    preference accuracy beats SFT's, and SFT ends >= 90% of its replies by itself."""
    if not {"base", "sft", "dpo"} <= set(metrics):
        return {}
    base, sft, dpo = metrics["base"], metrics["sft"], metrics["dpo"]
    return {"sft_beats_base_speaker": bool(sft["speaker_ci95"][0] > base["speaker_acc"]
                                           and base["speaker_ci95"][1] < sft["speaker_acc"]),
            "speaker_margin": sft["speaker_acc"] - base["speaker_acc"],
            "dpo_beats_sft_pref": bool(dpo["pref_acc"] > sft["pref_acc"]),
            "sft_ends_by_itself_90": bool(sft["ends_by_itself"] >= 0.9)}


def format_table(summary: dict[str, Any]) -> str:
    """The summary's metrics as a text table (one row per model), then the goals if any."""
    lines = [f"{'model':<8} {'format':<6} {'speaker_acc':>11} {'95% CI (Wilson)':>16} {'pref_acc':>8} "
             f"{'ends_by_itself':>14}"]
    for name, m in summary["metrics"].items():
        ci = f"[{m['speaker_ci95'][0]:.3f}, {m['speaker_ci95'][1]:.3f}]"
        lines.append(f"{name:<8} {m['format']:<6} {m['speaker_acc']:>11.3f} {ci:>16} {m['pref_acc']:>8.3f} "
                     f"{m['ends_by_itself']:>14.3f}")
    first = next(iter(summary["metrics"].values()))
    lines.append(f"(held out: {first['speaker_n']} speaker items, {first['pref_n']} pairs, {first['ends_n']} prompts)")
    for goal, value in summary.get("goals", {}).items():
        lines.append(f"{goal}: {value:+.3f}" if isinstance(value, float) else f"{goal}: {'yes' if value else 'NO'}")
    return "\n".join(lines)
