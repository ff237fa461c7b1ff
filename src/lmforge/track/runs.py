"""`lmforge runs list` and `lmforge runs compare`: the training runs under a directory, and what
differs between some of them — their configs, final metrics and curves overlaid in one plot.

    lmforge runs list runs/
    lmforge runs compare runs/a runs/b --out compare.png

A run dir is one a training stage wrote (`summary.json` with stage pretrain, finetune, align,
distill; or a `metrics.jsonl` of a run still going or interrupted before its report).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.track.loggers import flat_config
from lmforge.train.report import read_metrics, save_figure

RUN_STAGES = ("pretrain", "finetune", "align", "distill")
LIST_COLUMNS = ("run", "stage", "steps", "final_train_loss", "final_val_loss", "best_val_loss", "tokens_per_s",
                "wall_time_s", "created")
FINAL_KEYS = ("steps", "stop_reason", "final_train_loss", "final_val_loss", "best_val_loss", "best_step",
              "tokens_per_s", "mfu", "params")


def read_run(path: Path) -> dict[str, Any] | None:
    """A run dir's summary (or a stand-in built from metrics.jsonl); None if `path` is not a run dir."""
    summary_path, metrics_path = path / "summary.json", path / "metrics.jsonl"
    summary: dict[str, Any] = {}
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{summary_path}: not valid JSON ({e.msg}, line {e.lineno}); "
                            "delete the file or re-run the stage") from e
        if summary.get("stage") not in RUN_STAGES:
            return None
    elif not metrics_path.is_file():
        return None
    if not summary:  # running or interrupted before its report: the last logged record
        records = read_metrics(metrics_path)
        last = records[-1] if records else {}
        vals = [r["val_loss"] for r in records if "val_loss" in r]
        summary = {"stage": "(running)", "metrics": {"steps": last.get("step"), "final_train_loss": last.get("loss"),
                                                      "final_val_loss": vals[-1] if vals else None,
                                                      "best_val_loss": min(vals) if vals else None}}
        if (path / "config.yaml").is_file():
            import yaml

            summary["config"] = yaml.safe_load((path / "config.yaml").read_text())
    return summary


def find_runs(root: str | Path) -> list[Path]:
    """Run dirs under `root` (itself included), sorted; checkpoint dirs are not searched."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory; give the directory that holds your runs (e.g. runs/)")
    found = []
    for path in sorted([root, *(p for p in root.rglob("*") if p.is_dir())]):
        if "checkpoints" in path.relative_to(root).parts:
            continue
        if read_run(path) is not None:
            found.append(path)
    return found


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def list_runs(root: str | Path) -> list[dict[str, Any]]:
    """One row per run dir under `root`: stage, steps, losses, speed, wall time, date."""
    rows = []
    for path in find_runs(root):
        summary = read_run(path) or {}
        m = summary.get("metrics", {})
        rows.append({"run": str(path), "stage": summary.get("stage"), "steps": m.get("steps"),
                     "final_train_loss": m.get("final_train_loss"), "final_val_loss": m.get("final_val_loss"),
                     "best_val_loss": m.get("best_val_loss"), "tokens_per_s": m.get("tokens_per_s"),
                     "wall_time_s": summary.get("wall_time_s"), "created": summary.get("created")})
    return rows


def differing_config(configs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The flattened config keys whose values are not the same in every run (missing = None)."""
    flats = [flat_config(c or {}) for c in configs]
    keys = sorted(set().union(*flats))
    return {k: [f.get(k) for f in flats] for k in keys if len({json.dumps(f.get(k)) for f in flats}) > 1}


def compare_runs(dirs: list[str | Path], out_png: str | Path | None = None) -> dict[str, Any]:
    """Configs that differ, final metrics side by side, and train/val curves overlaid in `out_png`."""
    if len(dirs) < 2:
        raise UserError("runs compare: give at least two run dirs")
    runs = []
    for d in dirs:
        summary = read_run(Path(d))
        if summary is None:
            raise UserError(f"{d}: not a training run dir (no summary.json of a training stage, no metrics.jsonl)")
        runs.append((Path(d), summary))
    result = {"runs": [str(p) for p, _ in runs],
              "config_diff": differing_config([s.get("config", {}) for _, s in runs]),
              "final": {k: [s.get("metrics", {}).get(k) for _, s in runs] for k in FINAL_KEYS}}
    if out_png is not None:
        plot_runs([p for p, _ in runs], Path(out_png))
        result["plot"] = str(out_png)
    return result


def plot_runs(paths: list[Path], out_png: Path) -> None:
    """Train loss (thin line) and val loss (dots) of every run against step, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for i, path in enumerate(paths):
        records, color = read_metrics(path / "metrics.jsonl"), f"C{i % 10}"
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=0.8, alpha=0.5, color=color,
                label=f"{path} train")
        evals = [r for r in records if "val_loss" in r]
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3, color=color,
                label=f"{path} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("runs compared")
    save_figure(fig, out_png)


def format_compare(result: dict[str, Any]) -> str:
    names = [Path(r).name or r for r in result["runs"]]
    lines = ["configs that differ:"]
    diff = result["config_diff"]
    lines.append(markdown_table(["key", *names], [[k, *v] for k, v in diff.items()]) if diff else "(none)")
    lines += ["", "final metrics:",
              markdown_table(["metric", *names], [[k, *v] for k, v in result["final"].items()])]
    if "plot" in result:
        lines += ["", f"curves: {result['plot']}"]
    return "\n".join(lines)
