"""Task files: JSONL, one item per line, optionally opened by a header line naming the task.

    {"task": {"name": "shakespeare_speaker", "kind": "multiple_choice", "split": "test", ...}}
    {"context": "...", "choices": ["...", "..."], "gold": 1}
    ...

The header is optional (its only key is `task`); it names the kind (so `--kind` can be left
out), the split the items were drawn from (so every report says which data it read), and
kind-specific options (a label set, a prompt template, generation settings). Every item is
checked here, before any model runs, so a bad file fails in a second with `file:line` and
what to fix instead of after minutes of inference. The schema of every kind is in
docs/EVAL.md; `ITEM_FIELDS` below is the same list in code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.data.readers import iter_jsonl_objects
from lmforge.errors import UserError

KINDS = ("perplexity", "generation", "qa", "binary", "classification", "multiple_choice")

# required fields per kind (a tuple means: one of these); optional fields are listed in docs/EVAL.md
ITEM_FIELDS: dict[str, list[str | tuple[str, ...]]] = {
    "perplexity": ["text"],
    "generation": ["prompt", ("reference", "references")],
    "qa": ["question", ("answer", "answers")],
    "binary": ["question", "answer"],
    "classification": ["text", "label"],
    "multiple_choice": ["context", "choices", "gold"],
}

# header keys every kind accepts, and the extra ones per kind
# `fewshot`: a task file of solved train examples for `lmforge eval --fewshot` (eval/prompting.py)
_HEADER_KEYS = {"name", "kind", "split", "source", "description", "fewshot"}
_HEADER_EXTRA = {
    "perplexity": set(),
    "generation": {"max_new_tokens", "stop", "lang"},
    "qa": {"max_new_tokens", "stop", "template"},
    "binary": {"template", "max_new_tokens"},
    "classification": {"labels", "template"},
    "multiple_choice": set(),
}
BINARY_ANSWERS = ("yes", "no")


@dataclass
class Task:
    """A loaded, validated task file: its header options and its items (each with its line number)."""

    path: Path
    kind: str
    name: str
    split: str | None
    options: dict[str, Any]
    items: list[dict[str, Any]]
    lines: list[int] = field(default_factory=list)  # line number of each item in the file
    header: dict[str, Any] = field(default_factory=dict)  # the header object as written ({} if none)

    def where(self, index: int) -> str:
        """`file:line` of item `index`, for error messages."""
        return f"{self.path}:{self.lines[index]}"


def load_task(path: str | Path, kind: str | None = None) -> Task:
    """Read and validate a task file; `kind` (from the command line) must agree with its header."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task file {path} does not exist; pass a .jsonl task file (see docs/EVAL.md)")
    header: dict[str, Any] | None = None
    header_line = 0
    records: list[tuple[int, dict[str, Any]]] = []
    for lineno, record in iter_jsonl_objects(path):
        if set(record) == {"task"}:
            if header is not None or records:
                raise UserError(f"{path}:{lineno}: a task header ({{\"task\": ...}}) may only be the first line")
            if not isinstance(record["task"], dict):
                raise UserError(f"{path}:{lineno}: 'task' must be an object, e.g. {{\"task\": {{\"kind\": \"qa\"}}}}")
            header, header_line = record["task"], lineno
            continue
        records.append((lineno, record))

    header = header or {}
    file_kind = header.get("kind")
    if file_kind is not None and file_kind not in KINDS:
        raise UserError(f"{path}:{header_line}: unknown task kind {file_kind!r}; use one of {', '.join(KINDS)}")
    if kind is not None and kind not in KINDS:
        raise UserError(f"--kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind and file_kind and kind != file_kind:
        raise UserError(f"{path}:{header_line}: the file says kind {file_kind!r} but --kind is {kind!r}; "
                        "drop --kind or fix the header")
    kind = kind or file_kind
    if kind is None:
        raise UserError(f"{path}: no kind given; pass --kind or start the file with {{\"task\": {{\"kind\": ...}}}}")
    unknown = set(header) - _HEADER_KEYS - _HEADER_EXTRA[kind]
    if unknown:
        allowed = ", ".join(sorted(_HEADER_KEYS | _HEADER_EXTRA[kind]))
        raise UserError(f"{path}:{header_line}: unknown header key {sorted(unknown)[0]!r} for kind {kind}; "
                        f"allowed: {allowed}")
    if not records:
        raise UserError(f"{path}: no items; add one JSON object per line (see docs/EVAL.md)")

    options = {k: v for k, v in header.items() if k not in _HEADER_KEYS}
    if kind == "classification" and "labels" in options:
        labels = options["labels"]
        if (not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels)
                or len(set(labels)) != len(labels)):
            raise UserError(f"{path}:{header_line}: 'labels' must be a list of 2 or more distinct non-empty strings")
    task = Task(path=path, kind=kind, name=str(header.get("name") or path.stem), split=header.get("split"),
                options=options, items=[r for _, r in records], lines=[n for n, _ in records],
                header=dict(header))
    for i, item in enumerate(task.items):
        _check_item(task, i, item)
    if kind == "classification" and "labels" not in options:
        # no declared label set: the labels are those that occur (sorted, so the order is stable)
        task.options["labels"] = sorted({item["label"] for item in task.items})
        if len(task.options["labels"]) < 2:
            raise UserError(f"{path}: every item has the label {task.options['labels'][0]!r}; "
                            "a classification task needs 2+ labels (declare them in the header's 'labels')")
    return task


def _check_item(task: Task, index: int, item: dict[str, Any]) -> None:
    where = task.where(index)
    for required in ITEM_FIELDS[task.kind]:
        names = required if isinstance(required, tuple) else (required,)
        if not any(n in item for n in names):
            raise UserError(f"{where}: missing field {' or '.join(repr(n) for n in names)} for a {task.kind} item")

    def text_field(name: str, allow_empty: bool = False) -> str:
        value = item[name]
        if not isinstance(value, str):
            raise UserError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise UserError(f"{where}: field {name!r} is empty; give it some text or remove the item")
        return value

    def text_list(name: str) -> list[str]:
        value = item[name]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise UserError(f"{where}: field {name!r} must be a string or a non-empty list of strings")
        if any(not v.strip() for v in value):
            raise UserError(f"{where}: field {name!r} holds an empty reference; every reference needs text")
        return value

    if task.kind == "perplexity":
        text_field("text")
    elif task.kind == "generation":
        text_field("prompt")
        item["references"] = text_list("references" if "references" in item else "reference")
    elif task.kind == "qa":
        text_field("question")
        if "context" in item:
            text_field("context", allow_empty=True)
        item["answers"] = text_list("answers" if "answers" in item else "answer")
    elif task.kind == "binary":
        text_field("question")
        answer = item["answer"]
        if not isinstance(answer, str) or answer.strip().lower() not in BINARY_ANSWERS:
            raise UserError(f"{where}: 'answer' is {answer!r}; a binary item's answer must be \"yes\" or \"no\"")
        item["answer"] = answer.strip().lower()
    elif task.kind == "classification":
        text_field("text")
        label = item["label"]
        if not isinstance(label, str) or not label:
            raise UserError(f"{where}: 'label' must be a non-empty string, got {label!r}")
        labels = task.options.get("labels")
        if labels is not None and label not in labels:
            raise UserError(f"{where}: label {label!r} is not in the label set {labels} declared in the header; "
                            "fix the label or add it to 'labels'")
    elif task.kind == "multiple_choice":
        text_field("context", allow_empty=True)
        choices = item["choices"]
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c for c in choices)):
            raise UserError(f"{where}: 'choices' must be a list of 2 or more non-empty strings")
        gold = item["gold"]
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise UserError(f"{where}: 'gold' is {gold!r}; it must be the index (0..{len(choices) - 1}) "
                            "of the right choice")
