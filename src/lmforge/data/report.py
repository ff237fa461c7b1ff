"""`report.md` of `lmforge data prepare`: what came in, what went out, and what was removed why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.data.tally import STEPS
from lmforge.fsutil import atomic_write_text

_WHY = {
    "read": "input documents", "normalize": "decoding, Unicode, HTML, boilerplate; empty after cleaning",
    "langid": "language not allowed / low confidence", "quality": "Gopher quality rules (CJK-aware)",
    "repetition": "Gopher repetition rules", "safety": "blocklist (PII is replaced, not removed)",
    "exact_dedup": "same normalized text as an earlier document",
    "near_dedup": "MinHash-LSH near duplicate of a kept document",
    "paragraph_dedup": "every long paragraph already seen",
}


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def _groups_line(summary: dict[str, Any]) -> str:
    if not summary.get("config", {}).get("split", {}).get("group"):
        return "Split groups: off (split.group=false): every document is split by its own content hash."
    g = summary["metrics"]["split_groups"]
    return (f"Split groups: {g['grouped_documents']:,} kept documents in {g['groups']:,} groups (largest "
            f"{g['largest_group']:,}) share one split with the documents whose spelling-normalized words overlap "
            "theirs (split.group: another edition or a reworded copy is held out with a held-out text).")


def write_report(path: Path, total: dict[str, Any], outputs: dict[str, list[int]], summary: dict[str, Any]) -> None:
    kept = sum(n for n, _ in outputs.values())
    removed = summary["removed"]
    unreadable = summary["unreadable"]
    m = summary["metrics"]
    lines = [
        "# Data preparation report", "",
        f"{total['documents_in']:,} input documents ({_mb(total['bytes_in'])} MB) = {kept:,} kept "
        f"+ {sum(removed.values()):,} removed + {sum(unreadable.values()):,} unreadable "
        f"(the invariant holds exactly).", "",
        f"Wall time {summary.get('wall_time_s', 0):.1f} s ({m['mb_per_s']:.2f} MB/s), {m['shards']} shards, "
        f"{m['workers']} workers, executor {m['executor']}.", "",
        "## Output", "", "| split | documents | MB |", "|---|---:|---:|",
    ]
    lines += [f"| {split} | {n:,} | {_mb(b)} |" for split, (n, b) in outputs.items()]
    lines += ["", _groups_line(summary)]
    lines += ["", "## Steps", "", "| step | what | docs in | MB in | docs out | MB out | docs removed | MB removed |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for step in STEPS:
        s = total["steps"][step]
        if s["docs_in"] == 0:
            continue
        gone = sum(d for d, _ in s["removed"].values())
        gone_b = sum(b for _, b in s["removed"].values())
        lines.append(f"| {step} | {_WHY[step]} | {s['docs_in']:,} | {_mb(s['bytes_in'])} | {s['docs_in'] - gone:,} | "
                     f"{_mb(s['bytes_in'] - gone_b)} | {gone:,} | {_mb(gone_b)} |")
    lines += ["", "## Removed, per reason", ""]
    if not removed:
        lines.append("Nothing was removed.")
    for step in STEPS:
        for reason, (docs, nbytes) in sorted(total["steps"][step]["removed"].items()):
            lines += [f"### {reason} ({step}): {docs:,} documents, {_mb(nbytes)} MB", ""]
            lines += [f"- `{_cell(example)}`" for example in total["examples"].get(reason, [])]
            lines.append("")
    lines += ["## Unreadable input", ""]
    if not unreadable:
        lines.append("None.")
    else:
        lines += ["| reason | count |", "|---|---:|"] + [f"| {r} | {n:,} |" for r, n in sorted(unreadable.items())]
        lines += ["", "| reason | where | detail |", "|---|---|---|"]
        lines += [f"| {e['reason']} | {_cell(e['where'])} | {_cell(e['detail'])} |"
                  for e in total["unreadable_examples"][:50]]
    lines += ["", "## Changed, not removed", ""]
    changes = {**{f"pii <{k}>": v for k, v in total["pii"].items()}, **total["changes"]}
    lines += [f"- {k}: {v:,}" for k, v in sorted(changes.items())] or ["- nothing"]
    if total["langs"]:
        langs = ", ".join(f"{k} {v:,}" for k, v in sorted(total["langs"].items(), key=lambda kv: -kv[1])[:15])
        lines += ["", f"Languages (documents after language id): {langs}"]
    atomic_write_text(path, "\n".join(lines) + "\n")
