"""Accounting for `data prepare`: per step and per reason, documents and bytes in, out and removed.

A `Tally` is filled by one shard and merged in shard order, so totals and the example
snippets (the first three removed documents per reason) do not depend on the worker count.
The invariant the report and tests check: documents_in = kept + removed + unreadable.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

STEPS = ("read", "normalize", "langid", "quality", "repetition", "safety", "exact_dedup", "near_dedup",
         "paragraph_dedup")
EXAMPLES_PER_REASON = 3
SNIPPET_CHARS = 240


def new_tally() -> dict[str, Any]:
    return {
        "documents_in": 0, "bytes_in": 0,
        "steps": {step: {"docs_in": 0, "bytes_in": 0, "removed": {}} for step in STEPS},
        "examples": {}, "unreadable": {}, "unreadable_examples": [],
        "changes": {}, "pii": {}, "langs": {},
    }


def enter(tally: dict[str, Any], step: str, nbytes: int) -> None:
    s = tally["steps"][step]
    s["docs_in"] += 1
    s["bytes_in"] += nbytes


def remove(tally: dict[str, Any], step: str, reason: str, nbytes: int, text: str) -> None:
    counts = tally["steps"][step]["removed"].setdefault(reason, [0, 0])
    counts[0] += 1
    counts[1] += nbytes
    examples = tally["examples"].setdefault(reason, [])
    if len(examples) < EXAMPLES_PER_REASON:
        examples.append(snippet(text))


def unreadable(tally: dict[str, Any], reason: str, where: str, detail: str, nbytes: int) -> None:
    tally["documents_in"] += 1
    tally["bytes_in"] += nbytes
    counts = tally["unreadable"].setdefault(reason, [0, 0])
    counts[0] += 1
    counts[1] += nbytes
    if sum(1 for e in tally["unreadable_examples"] if e["reason"] == reason) < 20:
        tally["unreadable_examples"].append({"reason": reason, "where": where, "detail": detail})


def snippet(text: str) -> str:
    text = " ".join(text[: SNIPPET_CHARS * 2].split())
    return text[:SNIPPET_CHARS] + ("…" if len(text) > SNIPPET_CHARS else "")


def merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    """Add `other` (a later shard) to `into`; examples keep the earliest ones."""
    into["documents_in"] += other["documents_in"]
    into["bytes_in"] += other["bytes_in"]
    for step, s in other["steps"].items():
        t = into["steps"][step]
        t["docs_in"] += s["docs_in"]
        t["bytes_in"] += s["bytes_in"]
        for reason, (docs, nbytes) in s["removed"].items():
            counts = t["removed"].setdefault(reason, [0, 0])
            counts[0] += docs
            counts[1] += nbytes
    for reason, examples in other["examples"].items():
        mine = into["examples"].setdefault(reason, [])
        mine.extend(examples[: EXAMPLES_PER_REASON - len(mine)])
    for reason, (docs, nbytes) in other["unreadable"].items():
        counts = into["unreadable"].setdefault(reason, [0, 0])
        counts[0] += docs
        counts[1] += nbytes
    into["unreadable_examples"].extend(other["unreadable_examples"][: max(0, 200 - len(into["unreadable_examples"]))])
    for key in ("changes", "pii", "langs"):
        into[key] = dict(Counter(into[key]) + Counter(other[key]))


def removed_by_reason(tally: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in tally["steps"].values():
        for reason, (docs, _) in s["removed"].items():
            out[reason] = out.get(reason, 0) + docs
    return out
