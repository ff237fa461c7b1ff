"""One runner per task kind: items + model -> metrics and per-item predictions.

A runner only turns items into model queries (through `scoring`) and the answers into
metrics (through `metrics`); loading, limits, outputs and reports live in `run.py`.
Prompt templates are per task (the header's `template`); the defaults are below and in
docs/EVAL.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from lmforge.errors import UserError
from lmforge.eval import metrics as M
from lmforge.eval import scoring, seq2seq
from lmforge.eval.tasks import Task
from lmforge.infer.generate import is_encoder_decoder
from lmforge.models import has_capability

DEFAULT_TEMPLATES = {
    "binary": "Question: {question}\nAnswer:",
    "qa": "{context}\n\nQuestion: {question}\nAnswer:",
    "qa_no_context": "Question: {question}\nAnswer:",
    "classification": "{text}\nLabel:",
}
ANSWER_MODES = ("loglikelihood", "generate")


@dataclass
class Settings:
    """How to run: batch size, seed, binary answer mode, generation overrides, progress bars."""

    batch_size: int = 16
    seed: int = 0
    answer_mode: str = "loglikelihood"
    max_new_tokens: int | None = None  # overrides the task header / kind default
    temperature: float = 0.0  # 0 = greedy
    progress: bool = True
    prompter: Any = None  # eval.prompting.Prompter: few-shot examples, CoT cue, template (None: the plain prompts)


@dataclass
class Result:
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    item_scores: tuple[str, list[float]] | None = None  # (name, per-item score) for a histogram


def _fill(task: Task, template: str, index: int, **fields: str) -> str:
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"{task.path}: template {template!r} cannot be filled for the item at line "
                        f"{task.lines[index]} ({type(e).__name__}: {e}); use only the fields "
                        f"{', '.join('{' + k + '}' for k in fields)}") from None


def _base(task: Task, i: int) -> dict[str, Any]:
    item = task.items[i]
    return {"line": task.lines[i], **({"id": item["id"]} if "id" in item else {})}


def run_perplexity_sequences(model, sequences: list, n_bytes: list[int], settings: Settings) -> Result:
    """Perplexity over token sequences (each starting with the token that precedes a document)."""
    seq2seq.require_lm(model, "perplexity", allow_seq2seq=False)
    nll = scoring.rolling_nll(model, sequences, batch_size=settings.batch_size, progress=settings.progress)
    metrics = scoring.perplexity_metrics(sum(x.nats for x in nll), sum(x.tokens for x in nll), sum(n_bytes))
    predictions = [{"tokens": x.tokens, "bytes": b, "loss": x.nats / max(x.tokens, 1)} for x, b in zip(nll, n_bytes)]
    return Result({**metrics, "n": len(sequences)}, predictions,
                  item_scores=("loss (nats/token)", [p["loss"] for p in predictions]) if len(predictions) > 1 else None)


def run_perplexity(task: Task, model, tokenizer, settings: Settings) -> Result:
    sequences = [[tokenizer.eos_id, *tokenizer.encode(item["text"])] for item in task.items]
    n_bytes = [len(item["text"].encode("utf-8")) for item in task.items]
    result = run_perplexity_sequences(model, sequences, n_bytes, settings)
    for i, p in enumerate(result.predictions):
        p.update(_base(task, i))
    return result


def _max_new(task: Task, settings: Settings, default_max: int) -> int:
    return int(settings.max_new_tokens or task.options.get("max_new_tokens") or default_max)


def _prompted(task: Task, model, tokenizer, queries: list[str], settings: Settings, reserve) -> list[str]:
    """The queries with the prompter's instruction, shots and CoT cue (as they are without a prompter)."""
    if settings.prompter is None:
        return queries
    return settings.prompter.prompts(task, queries, model, tokenizer, reserve)


def _cot_task(task: Task, model, settings: Settings) -> Task | None:
    """Under --cot, the task with a longer reply budget (the template's, at most half a decoder's context)
    and the template's separator as the stop."""
    prompter = settings.prompter
    if prompter is None or not prompter.cot:
        return None
    budget = prompter.template.cot_max_new_tokens
    if not is_encoder_decoder(model):
        budget = min(budget, model.config.block_size // 2)
    prompter.cot_budget = budget
    sep = prompter.template.separator
    return replace(task, options={**task.options, "max_new_tokens": budget, "stop": [sep] if sep else []})


def _cot_answers(replies: list[str], settings: Settings) -> tuple[list[str], list[bool], dict[str, Any]]:
    """The final answers parsed after the template's answer marker ("" when there is none), which parsed,
    and the parse-failure metrics."""
    from lmforge.eval.prompting import parse_answer

    parsed = [parse_answer(r, settings.prompter.template.answer_markers) for r in replies]
    failures = sum(p is None for p in parsed)
    metrics = {"cot_parse_failures": failures, "cot_parse_failure_rate": failures / max(len(replies), 1)}
    return [p or "" for p in parsed], [p is not None for p in parsed], metrics


def _generate(task: Task, model, tokenizer, prompts: list[str], settings: Settings, default_max: int,
              default_stop: list[str] | None) -> tuple[list[str], list[str]]:
    max_new = _max_new(task, settings, default_max)
    stop = task.options.get("stop", default_stop)
    if isinstance(stop, str):
        stop = [stop]
    truncated: list[int] = []
    replies = scoring.generate_replies(model, tokenizer, prompts, int(max_new), stop, seed=settings.seed,
                                       temperature=settings.temperature, progress=settings.progress,
                                       batch_size=settings.batch_size,
                                       on_truncate=truncated.append)
    encdec = is_encoder_decoder(model)
    room = "the encoder's context" if encdec else "the context minus max_new_tokens"
    notes = [f"{len(truncated)} prompt(s) longer than {room} were cut from the left"] if truncated else []
    if encdec and int(max_new) > model.config.block_size - 1:
        notes.append(f"max_new_tokens={max_new} is more than the decoder's context allows: replies end after "
                     f"{model.config.block_size - 1} tokens")
    notes.append(f"replies sampled at temperature {settings.temperature}, item i with seed {settings.seed} + i"
                 if settings.temperature else "greedy replies")
    return replies, notes


def run_generation(task: Task, model, tokenizer, settings: Settings) -> Result:
    import sacrebleu

    seq2seq.require_lm(model, "a generation task")
    run_task = _cot_task(task, model, settings) or task
    prompts = _prompted(task, model, tokenizer, [item["prompt"] for item in task.items], settings,
                        _max_new(run_task, settings, 64))
    replies, notes = _generate(run_task, model, tokenizer, prompts, settings, 64, None)
    raw, parsed, cot_metrics = replies, None, {}
    if run_task is not task:  # chain of thought: score the final answer after the marker
        replies, parsed, cot_metrics = _cot_answers(raw, settings)
    references = [item["references"] for item in task.items]
    lang = task.options.get("lang")
    metrics = M.corpus_bleu_chrf(replies, references, lang=lang)
    cjk = lang in ("zh", "ja", "ko") or (lang is None and M.has_cjk([r for refs in references for r in refs]))
    rouge, per_item = M.rouge_scores(replies, references, cjk=cjk)
    metrics.update(rouge)
    metrics["n"] = len(replies)
    metrics.update(cot_metrics)
    predictions = []
    chrfs = []
    for i, (reply, refs, scores) in enumerate(zip(replies, references, per_item)):
        chrf = sacrebleu.sentence_chrf(reply, list(refs)).score
        chrfs.append(chrf)
        predictions.append({**_base(task, i), "prompt": prompts[i], "prediction": reply, "references": refs,
                            "chrf": chrf, **scores, **({"reply": raw[i], "parsed": parsed[i]} if parsed else {})})
    return Result(metrics, predictions, notes, item_scores=("sentence chrF", chrfs))


def run_qa(task: Task, model, tokenizer, settings: Settings) -> Result:
    seq2seq.require_lm(model, "a qa task")
    template = task.options.get("template")
    prompts = []
    for i, item in enumerate(task.items):
        context = item.get("context", "")
        t = template or (DEFAULT_TEMPLATES["qa"] if context else DEFAULT_TEMPLATES["qa_no_context"])
        prompts.append(_fill(task, t, i, question=item["question"], context=context))
    run_task = _cot_task(task, model, settings) or task
    prompts = _prompted(task, model, tokenizer, prompts, settings, _max_new(run_task, settings, 32))
    replies, notes = _generate(run_task, model, tokenizer, prompts, settings, 32, ["\n"])
    raw, parsed, cot_metrics = replies, None, {}
    if run_task is not task:  # chain of thought: score the final answer after the marker
        replies, parsed, cot_metrics = _cot_answers(raw, settings)
    predictions, ems, f1s = [], [], []
    for i, (reply, item) in enumerate(zip(replies, task.items)):
        em, f1 = M.exact_match(reply, item["answers"]), M.token_f1(reply, item["answers"])
        ems.append(em)
        f1s.append(f1)
        predictions.append({**_base(task, i), "question": item["question"], "prediction": reply.strip(),
                            "answers": item["answers"], "exact_match": em, "f1": f1,
                            **({"reply": raw[i], "parsed": parsed[i]} if parsed else {})})
    n = len(replies)
    return Result({"exact_match": sum(ems) / n, "f1": sum(f1s) / n, "n": n, **cot_metrics}, predictions, notes,
                  item_scores=("token F1", f1s))


def run_binary(task: Task, model, tokenizer, settings: Settings) -> Result:
    seq2seq.require_lm(model, "a binary task")
    if settings.answer_mode not in ANSWER_MODES:
        raise UserError(f"--answer-mode {settings.answer_mode!r} is not one of {', '.join(ANSWER_MODES)}")
    template = task.options.get("template", DEFAULT_TEMPLATES["binary"])
    prompts = [_fill(task, template, i, question=item["question"]) for i, item in enumerate(task.items)]
    reserve = 2 if settings.answer_mode == "loglikelihood" else _max_new(task, settings, 8)
    prompts = _prompted(task, model, tokenizer, prompts, settings, reserve)
    gold = [item["answer"] for item in task.items]
    predictions: list[dict[str, Any]] = []
    notes: list[str] = []
    if settings.answer_mode == "loglikelihood":
        scores = scoring.score_labels(model, tokenizer, prompts, ["yes", "no"], batch_size=settings.batch_size,
                                      progress=settings.progress)
        predicted = ["yes" if s[0] > s[1] else "no" for s in scores]  # a tie (never in practice) reads "no"
        for i, s in enumerate(scores):
            predictions.append({**_base(task, i), "question": task.items[i]["question"], "answer": gold[i],
                                "predicted": predicted[i], "logprob_yes": s[0], "logprob_no": s[1]})
    else:
        replies, notes = _generate(task, model, tokenizer, prompts, settings, 8, ["\n"])
        predicted = [M.parse_yes_no(r) for r in replies]
        for i, reply in enumerate(replies):
            predictions.append({**_base(task, i), "question": task.items[i]["question"], "answer": gold[i],
                                "predicted": predicted[i], "reply": reply})
    metrics = M.binary_metrics(gold, predicted)
    metrics["answer_mode"] = settings.answer_mode
    return Result(metrics, predictions, notes)


def run_classification(task: Task, model, tokenizer, settings: Settings) -> Result:
    labels = task.options["labels"]
    template = task.options.get("template", DEFAULT_TEMPLATES["classification"])
    prompts = [_fill(task, template, i, text=item["text"]) for i, item in enumerate(task.items)]
    if not has_capability(model, "classify"):  # a classification head reads the raw text: no prompt to extend
        reserve = max(len(tokenizer.encode(" " + label)) for label in labels)
        prompts = _prompted(task, model, tokenizer, prompts, settings, reserve)
    if has_capability(model, "classify") and "labels" not in task.header:
        raise UserError(f"{task.path}: a classification head outputs labels by position; declare them in the "
                        "header, in the head's output order: {\"task\": {\"labels\": [...]}}")
    scores = scoring.score_labels(model, tokenizer, prompts, labels, batch_size=settings.batch_size,
                                  progress=settings.progress, texts=[item["text"] for item in task.items])
    predicted = [labels[max(range(len(labels)), key=lambda k, s=s: s[k])] for s in scores]
    gold = [item["label"] for item in task.items]
    predictions = [{**_base(task, i), "text": task.items[i]["text"], "label": gold[i], "predicted": predicted[i],
                    "scores": dict(zip(labels, s))} for i, s in enumerate(scores)]
    return Result(M.classification_metrics(gold, predicted, labels), predictions)


def run_multiple_choice(task: Task, model, tokenizer, settings: Settings) -> Result:
    seq2seq.require_lm(model, "a multiple_choice task")
    encode_pair = seq2seq.pair_encoder(model)  # an encoder-decoder: context to the encoder
    contexts = [item["context"] for item in task.items]
    if settings.prompter is not None:
        reserve = [max(len(tokenizer.encode(c)) for c in item["choices"]) for item in task.items]
        contexts = _prompted(task, model, tokenizer, contexts, settings, reserve)
    requests = []
    for i, item in enumerate(task.items):
        for choice in item["choices"]:
            requests.append(encode_pair(tokenizer, contexts[i], choice))
    results = scoring.loglikelihoods(model, requests, batch_size=settings.batch_size, desc="scoring choices",
                                     progress=settings.progress)
    predictions = []
    correct = correct_norm = 0
    k = 0
    for i, item in enumerate(task.items):
        n = len(item["choices"])
        lls = [r.logprob for r in results[k:k + n]]
        k += n
        # acc_norm divides by the choice's length in UTF-8 bytes (lm-evaluation-harness)
        norm = [ll / max(len(c.encode("utf-8")), 1) for ll, c in zip(lls, item["choices"])]
        pred = max(range(n), key=lambda j: lls[j])
        pred_norm = max(range(n), key=lambda j: norm[j])
        correct += pred == item["gold"]
        correct_norm += pred_norm == item["gold"]
        predictions.append({**_base(task, i), "gold": item["gold"], "pred": pred, "pred_norm": pred_norm,
                            "loglikelihoods": lls, "choices": item["choices"]})
    n_items = len(task.items)
    lo, hi = M.wilson_interval(correct, n_items)
    lo_n, hi_n = M.wilson_interval(correct_norm, n_items)
    mean_choices = sum(len(item["choices"]) for item in task.items) / n_items
    return Result({"acc": correct / n_items, "acc_ci95": [lo, hi], "acc_norm": correct_norm / n_items,
                   "acc_norm_ci95": [lo_n, hi_n],
                   "chance": sum(1 / len(item["choices"]) for item in task.items) / n_items,
                   "mean_choices": mean_choices, "n": n_items}, predictions)


RUNNERS = {
    "perplexity": run_perplexity,
    "generation": run_generation,
    "qa": run_qa,
    "binary": run_binary,
    "classification": run_classification,
    "multiple_choice": run_multiple_choice,
}
