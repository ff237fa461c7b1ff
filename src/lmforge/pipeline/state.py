"""Is a stage up to date? Its record (command, input hashes, lmforge version) against the one its output keeps.

A stage's record is what `lmforge run` passes to it in $LMFORGE_PIPELINE; `write_summary` stores it in
the output's summary.json (`pipeline`). Outputs without a summary.json (a shell stage's, a captured
stdout, a GGUF file) get it in a hidden stamp beside them (`.lmforge-pipeline.json` inside a directory,
`.NAME.lmforge-pipeline.json` beside a file); hidden files are left out of every content hash.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmforge
from lmforge.fsutil import atomic_write_json, file_sha256
from lmforge.pipeline.graph import StageIO
from lmforge.pipeline.spec import Stage

STAMP = ".lmforge-pipeline.json"
STARTED = ".lmforge-pipeline-started.json"  # in a training stage's run dir while it runs: what may resume it
# a stage's own report files: rewritten with new timestamps on every run, so not part of its content
VOLATILE = ("summary.json", "report.md")
COMPARED = ("argv", "shell", "stdout", "inputs", "lmforge")


class HashCache:
    """Content hashes of files and trees; a file's hash is reused while its size and mtime stay the same."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, int, int], str] = {}

    def file(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self.files:
            self.files[key] = file_sha256(path)
        return self.files[key]

    def tree(self, path: str | Path, skip: tuple[str, ...] = ()) -> str | None:
        """`fsutil.tree_sha256` of a file or directory (hidden files left out), except that a directory's
        own top-level summary.json and report.md are left out too (timestamps), and anything under `skip` (a
        stage's own output inside its input); None when it does not exist."""
        import hashlib

        path = Path(path)
        if path.is_file():
            return self.file(path)
        if not path.is_dir():
            return None
        h = hashlib.sha256()
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path)
            if any(part.startswith(".") for part in rel.parts) or (len(rel.parts) == 1 and p.name in VOLATILE):
                continue
            if skip and any(str(p) == s or str(p).startswith(s + os.sep) for s in skip):
                continue
            if p.is_file():
                h.update(str(rel).encode())
                h.update(self.file(p).encode())
        return h.hexdigest()


def display(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def make_record(pipeline_path: Path, stage: Stage, sio: StageIO, hashes: HashCache) -> dict[str, Any]:
    """What the stage's output must record to be up to date (plus its name and file, for people)."""
    record: dict[str, Any] = {"stage": stage.name, "file": str(pipeline_path)}
    if stage.shell is not None:
        record["shell"] = stage.shell
    else:
        record["argv"] = stage.argv
    if stage.stdout is not None:
        record["stdout"] = stage.stdout
    record["inputs"] = {display(p): hashes.tree(p, tuple(o for o in sio.outputs if o.startswith(p + os.sep)))
                        for p in sio.inputs}
    record["lmforge"] = lmforge.__version__
    return record


def stamp_path(output: str) -> Path:
    p = Path(output)
    return p / STAMP if p.is_dir() else p.with_name(f".{p.name}{STAMP}")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def recorded(output: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the record the output keeps or None, its summary.json or None)."""
    summary = read_json(Path(output) / "summary.json") if Path(output).is_dir() else None
    if isinstance(summary, dict) and isinstance(summary.get("pipeline"), dict):
        return summary["pipeline"], summary
    stamp = read_json(stamp_path(output))
    return (stamp if isinstance(stamp, dict) else None), (summary if isinstance(summary, dict) else None)


def mark_started(output: str, record: dict[str, Any]) -> None:
    """Before a training stage runs: the record that its checkpoints, if interrupted, belong to."""
    Path(output).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(output) / STARTED, record)


def write_stamp(output: str, record: dict[str, Any]) -> None:
    """After a successful run: the record for an output whose summary.json does not carry it."""
    if os.path.exists(output) and recorded(output)[0] != record:
        atomic_write_json(stamp_path(output), record)


def forget(output: str) -> None:
    """After a failed or interrupted run: the output is not up to date, whatever it records."""
    stamp_path(output).unlink(missing_ok=True)
    summary_file = Path(output) / "summary.json"
    summary = read_json(summary_file)
    if isinstance(summary, dict) and "pipeline" in summary:
        summary["pipeline_failed"] = summary.pop("pipeline")
        atomic_write_json(summary_file, summary)


def why_changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The first difference between a kept record and the current one, in words."""
    if old.get("lmforge") != new.get("lmforge"):
        return f"lmforge version changed ({old.get('lmforge')} -> {new.get('lmforge')})"
    for key in ("argv", "shell", "stdout"):
        if old.get(key) != new.get(key):
            return "command changed" if key != "stdout" else "stdout file changed"
    old_in, new_in = old.get("inputs") or {}, new.get("inputs") or {}
    for name, digest in new_in.items():
        if name not in old_in:
            return f"new input {name}"
        if old_in[name] != digest:
            return f"input {name} changed" if digest is not None else f"input {name} is missing"
    return "inputs changed"


@dataclass
class Verdict:
    run: bool
    why: str          # "up to date" or the reason it runs
    resume: bool = False


def resume_point(output: str, record: dict[str, Any]) -> int | None:
    """The step an interrupted training run of this same record reached, or None (start over)."""
    from lmforge.train.checkpoint import step_checkpoints

    steps = step_checkpoints(Path(output))
    if not steps:
        return None
    summary = read_json(Path(output) / "summary.json")
    if isinstance(summary, dict) and "pipeline" in summary:
        return None  # a finished run (the record differs, or it would be up to date)
    started = read_json(Path(output) / STARTED)  # written before a training stage starts
    same = isinstance(started, dict) and all(started.get(k) == record.get(k) for k in COMPARED)
    return steps[-1][0] if same else None


def verdict(stage: Stage, sio: StageIO, record: dict[str, Any], *, forced: bool) -> Verdict:
    """Run or skip, and why."""
    if not sio.outputs:
        return Verdict(True, "no output: runs every time")
    if stage.always:
        return Verdict(True, "always: true")
    for out in sio.outputs:
        if sio.resumable and (step := resume_point(out, record)) is not None:
            return Verdict(True, f"resumes the interrupted run from its step {step} checkpoint", resume=True)
    if forced:
        return Verdict(True, "forced")
    for out in sio.outputs:
        if not os.path.exists(out):
            return Verdict(True, f"no output {display(out)}")
        kept, summary = recorded(out)
        if kept is None:
            return Verdict(True, f"{display(out)} has no pipeline record (not made by lmforge run, or it failed)")
        if any(kept.get(k) != record.get(k) for k in COMPARED):
            return Verdict(True, why_changed(kept, record))
    return Verdict(False, "up to date")
