"""Human-readable outputs of `lmforge eval`: report.md per task (and an overview), and plots.

Plots (matplotlib, Agg backend): the confusion matrix of binary and classification tasks
(`confusion_matrix.png`, counts with row-normalized shading) and a histogram of the per-item
score of kinds that have one (`item_scores.png`: sentence chrF, token F1, loss per document).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.fsutil import atomic_write_text

HEADLINE = {
    "perplexity": ["loss", "perplexity", "bits_per_byte", "tokens"],
    "generation": ["bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum"],
    "qa": ["exact_match", "f1"],
    "binary": ["accuracy", "precision", "recall", "f1", "specificity", "unparsed"],
    "classification": ["accuracy", "f1_macro", "f1_micro"],
    "multiple_choice": ["acc", "acc_norm", "chance"],
}
SCALE = {"bleu": "0-100", "chrf": "0-100"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"[{value[0]:.3f}, {value[1]:.3f}]"
    return str(value)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def plot_confusion(labels_gold: list[str], labels_pred: list[str], matrix: list[list[int]], path: Path,
                   title: str) -> None:
    """Counts in cells, shading by the share of the gold row (so rare classes are readable too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.array(matrix, dtype=float)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.6 * max(len(labels_gold), len(labels_pred)) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=110)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels_pred)), labels_pred, rotation=45 if len(labels_pred) > 4 else 0, ha="right"
                  if len(labels_pred) > 4 else "center")
    ax.set_yticks(range(len(labels_gold)), labels_gold)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for r in range(counts.shape[0]):
        for c in range(counts.shape[1]):
            ax.text(c, r, f"{int(counts[r, c])}", ha="center", va="center",
                    color="white" if share[r, c] > 0.6 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of gold row")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def plot_histogram(values: list[float], name: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.hist(values, bins=min(30, max(5, len(values) // 4)), color="tab:blue", alpha=0.8)
    ax.set_xlabel(name)
    ax.set_ylabel("items")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def write_plots(result: dict[str, Any], item_scores: tuple[str, list[float]] | None, out: Path) -> list[str]:
    """Draw the plots of one task into `out`; returns their file names."""
    files = []
    m, kind, name = result["metrics"], result["kind"], result["task"]
    if kind == "binary":
        cols = ["yes", "no"] + (["unparsed"] if m["unparsed"] else [])
        matrix = [[m["tp"], m["fn"]] + ([m["unparsed_yes"]] if m["unparsed"] else []),
                  [m["fp"], m["tn"]] + ([m["unparsed_no"]] if m["unparsed"] else [])]
        plot_confusion(["yes", "no"], cols, matrix, out / "confusion_matrix.png",
                       f"{name}: accuracy {m['accuracy']:.3f} (n={m['n']})")
        files.append("confusion_matrix.png")
    elif kind == "classification":
        cm = m["confusion_matrix"]
        plot_confusion(cm["labels"], cm["labels"], cm["matrix"], out / "confusion_matrix.png",
                       f"{name}: accuracy {m['accuracy']:.3f} (n={m['n']})")
        files.append("confusion_matrix.png")
    if item_scores is not None and item_scores[1]:
        plot_histogram(item_scores[1], item_scores[0], out / "item_scores.png", f"{name}: {item_scores[0]} per item")
        files.append("item_scores.png")
    return files


def _examples(result: dict[str, Any], k: int = 5) -> list[str]:
    """A few predictions, formatted per kind (errors first where a prediction can be wrong)."""
    kind, preds = result["kind"], result["predictions"]
    lines: list[str] = []

    def short(text: str, n: int = 160, head: bool = False) -> str:
        text = text.replace("\n", " / ")
        if len(text) <= n:
            return text
        return text[:n] + "..." if head else "..." + text[-n:]

    if kind == "generation":
        for p in preds[:k]:
            lines += [f"- prompt: `{short(p['prompt'])}`", f"  - model: `{short(p['prediction'], 200)}`",
                      f"  - reference: `{short(p['references'][0], 200)}` (chrF {p['chrf']:.1f})"]
    elif kind == "qa":
        for p in preds[:k]:
            lines.append(f"- {short(p['question'])} -> `{short(p['prediction'])}` (gold: {p['answers'][:3]}; "
                         f"EM {p['exact_match']:.0f}, F1 {p['f1']:.2f})")
    elif kind in ("binary", "classification"):
        gold_key = "answer" if kind == "binary" else "label"
        wrong = [p for p in preds if p["predicted"] != p[gold_key]]
        right = [p for p in preds if p["predicted"] == p[gold_key]]
        text_key = "question" if kind == "binary" else "text"
        for p in (wrong[:k] + right[:2]):
            lines.append(f"- {'wrong' if p in wrong else 'right'}: {short(p[text_key])} -> predicted "
                         f"**{p['predicted']}**, gold {p[gold_key]}")
    elif kind == "multiple_choice":
        for p in preds[:k]:
            marks = ["**" if j == p["gold"] else "" for j in range(len(p["choices"]))]
            choices = "; ".join(f"{marks[j]}{short(c, 60, head=True)}{marks[j]} ({ll:.2f})"
                                for j, (c, ll) in enumerate(zip(p["choices"], p["loglikelihoods"])))
            lines.append(f"- line {p['line']}: picked {p['pred']} (norm {p['pred_norm']}), gold {p['gold']}: {choices}")
    elif kind == "perplexity":
        worst = sorted(preds, key=lambda p: -p["loss"])[:k]
        for p in worst:
            lines.append(f"- {'line ' + str(p['line']) if 'line' in p else 'stream'}: loss {p['loss']:.3f} over "
                         f"{p['tokens']} tokens")
    return lines


def task_report(result: dict[str, Any], plots: list[str]) -> str:
    m = result["metrics"]
    lines = [
        f"# Evaluation: {result['task']}", "",
        f"- checkpoint: `{result['checkpoint']}`",
        f"- task: `{result['task_file']}` (kind **{result['kind']}**)",
        f"- split read: **{result['split']}**" + (f" — {result['split_note']}" if result.get("split_note") else ""),
        f"- items: {m.get('n')}" + (f" (first {result['limit']} of {result['items_in_file']}, --limit)"
                                    if result.get("limit") else ""),
        f"- seed: {result['seed']}" + (f"; answers read by {m['answer_mode']}" if "answer_mode" in m else ""),
    ]
    if result.get("description"):
        lines.append(f"- about: {result['description']}")
    if result.get("prompting"):
        lines.append(f"- prompting: {prompting_line(result['prompting'], m)}")
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    for key, value in m.items():
        if key in ("per_class", "confusion_matrix"):
            continue
        lines.append(f"| {key}{' (' + SCALE[key] + ')' if key in SCALE else ''} | {_fmt(value)} |")
    if "per_class" in m:
        lines += ["", "| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
        for label, c in m["per_class"].items():
            lines.append(f"| {label} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |")
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    examples = _examples(result)
    if examples:
        lines += ["", "## Examples", ""] + examples
    lines += ["", "Per-item predictions: `results.json` (`predictions`).", ""]
    return "\n".join(lines)


def headline(result: dict[str, Any]) -> str:
    m = result["metrics"]
    parts = []
    for key in HEADLINE[result["kind"]]:
        if key in m:
            parts.append(f"{key} {_fmt(m[key])}")
    ci = m.get("accuracy_ci95") or m.get("acc_ci95")
    if ci:
        parts.insert(1, f"95% CI {_fmt(ci)}")
    return ", ".join(parts)


def overview_report(checkpoint: str, results: list[dict[str, Any]]) -> str:
    lines = [f"# Evaluation of `{checkpoint}`", "", "| task | kind | split | items | headline |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| [{r['task']}]({r['task']}/report.md) | {r['kind']} | {r['split']} | {r['metrics'].get('n')} "
                     f"| {headline(r)} |")
    lines.append("")
    return "\n".join(lines)


def write_task_report(result: dict[str, Any], plots: list[str], out: Path) -> None:
    atomic_write_text(out / "report.md", task_report(result, plots))


def prompting_line(p: dict[str, Any], m: dict[str, Any]) -> str:
    """`3-shot (mean 2.40 given), seed 0, template T, chain of thought (5 answers unparsed)`."""
    text = f"{p['fewshot']}-shot"
    if "shots_mean" in p and p["fewshot"]:
        text += f" (mean {p['shots_mean']:.2f} given)"
    text += f", --fewshot-seed {p['fewshot_seed']}, template `{p['template']}`"
    if p.get("pool"):
        text += f", examples from `{p['pool']}`"
    if p.get("cot"):
        text += ", chain of thought" + (f" ({m['cot_parse_failures']} of {m.get('n')} answers unparsed)"
                                        if "cot_parse_failures" in m else " (not applied to this kind)")
    return text


def summary_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """A task's metrics without the bulky tables (for summary.json and the few-shot comparison)."""
    return {k: v for k, v in metrics.items() if k not in ("per_class", "confusion_matrix")}


def fewshot_results(checkpoint: str, runs: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """The runs of `eval --fewshot 0,1,3,5` side by side: per task, its metrics by number of shots."""
    shots = list(runs)
    first = runs[shots[0]]
    tasks: dict[str, Any] = {}
    for i, r in enumerate(first):
        by_shots = {}
        for k in shots:
            run = runs[k][i]
            p = run.get("prompting") or {}
            by_shots[str(k)] = {**summary_metrics(run["metrics"]),
                                **({"shots_mean": p["shots_mean"]} if "shots_mean" in p else {})}
        tasks[r["task"]] = {"kind": r["kind"], "split": r["split"], "task_file": r["task_file"],
                            "by_shots": by_shots,
                            "results": {str(k): f"fewshot_{k}/" + (f"{r['task']}/" if len(first) > 1 else "")
                                        + "results.json" for k in shots}}
    p = next((run.get("prompting") for run in first if run.get("prompting")), {}) or {}
    return {"checkpoint": checkpoint, "fewshot": shots, "fewshot_seed": p.get("fewshot_seed"),
            "cot": p.get("cot", False), "template": p.get("template"), "tasks": tasks}


FEWSHOT_COLUMNS = {
    "perplexity": ["perplexity", "bits_per_byte"],
    "generation": ["chrf", "bleu", "rougeL", "cot_parse_failures"],
    "qa": ["exact_match", "f1", "cot_parse_failures"],
    "binary": ["accuracy", "accuracy_ci95", "f1", "unparsed"],
    "classification": ["accuracy", "accuracy_ci95", "f1_macro"],
    "multiple_choice": ["acc", "acc_ci95", "acc_norm", "acc_norm_ci95"],
}


def fewshot_report(table: dict[str, Any]) -> str:
    """report.md of a few-shot comparison: one table per task, a row per number of shots."""
    lines = [f"# Few-shot evaluation of `{table['checkpoint']}`", "",
             f"Shots: {', '.join(map(str, table['fewshot']))} (examples from each task's train-split pool, "
             f"--fewshot-seed {table['fewshot_seed']}); template `{table['template']}`"
             + ("; chain of thought on generation/qa tasks" if table["cot"] else "") + ".",
             "`shots given` is the mean number of shots that fit the model's context (the last shots of a "
             "prompt that is too long are dropped).", ""]
    for name, t in table["tasks"].items():
        lines += [f"## {name} ({t['kind']}, split {t['split']})", ""]
        if t["kind"] == "perplexity":
            lines += ["Perplexity reads no prompt: the same for every number of shots "
                      f"({headline({'kind': 'perplexity', 'metrics': t['by_shots'][str(table['fewshot'][0])]})}).", ""]
            continue
        cols = [c for c in FEWSHOT_COLUMNS[t["kind"]] if any(c in m for m in t["by_shots"].values())]
        lines += ["| shots | shots given | " + " | ".join(c.replace("_ci95", " 95% CI") for c in cols) + " |",
                  "|---" * (len(cols) + 2) + "|"]
        for k, m in t["by_shots"].items():
            given = f"{m['shots_mean']:.2f}" if "shots_mean" in m else k
            lines.append(f"| {k} | {given} | " + " | ".join(_fmt(m.get(c, "")) for c in cols) + " |")
        lines += ["", f"Per-shot results: {', '.join(f'[{k}]({path})' for k, path in t['results'].items())}", ""]
    return "\n".join(lines)
