"""Files on disk: atomic writes, content hashes and the `summary.json` every stage writes.

Every artifact is written to a temporary path beside its destination and renamed into place,
so an interrupted run never leaves something half-written that looks complete.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmforge


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file + rename (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temp name and rename it to `path` only if the block succeeds.

    An existing `path` is replaced (the old one is removed after the new one is in place); if
    the final rename fails, the old one is put back and the temp dir removed.
    """
    path = Path(path)
    if path.name in ("", ".", ".."):  # "." or "dir/..": name the directory itself
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not (path.exists() or path.is_symlink()):
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_symlink() or not old.is_dir():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_sha256(path: str | Path) -> str:
    """Content hash of a file, or of every file under a directory (names + contents, sorted).

    Hidden files and directories (temp files, `.old` dirs) are skipped.
    """
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            h.update(str(rel).encode())
            h.update(file_sha256(p).encode())
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {"lmforge": lmforge.__version__, "python": sys.version.split()[0], "platform": platform.platform()}
    # never import torch just to name its version: that costs ~150 MB of resident memory in
    # stages that do not use it (data prepare)
    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].__version__
    else:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out["torch"] = importlib.metadata.version("torch")
    return out


# ---- the reproducibility record (summary["reproduce"]) and the pipeline record (summary["pipeline"]) ----

_INVOCATION: list[str] | None = None
PIPELINE_ENV = "LMFORGE_PIPELINE"  # `lmforge run` puts the stage's record (JSON) here for write_summary


def set_invocation(argv: list[str] | None) -> None:
    """Record the command line (`lmforge` left out) that this process runs; `cli.main` calls it, and
    every summary.json written afterwards carries it in `reproduce`."""
    global _INVOCATION
    _INVOCATION = None if argv is None else [str(a) for a in argv]


def _git(args: list[str], cwd: Path) -> str | None:
    import subprocess

    try:
        done = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def source_revision() -> tuple[str | None, bool]:
    """(git commit, dirty) of the lmforge source tree when the package runs from a git checkout,
    else (None, False); asked once per process, never raises."""
    src = Path(lmforge.__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], src)
    if commit is None:
        return None, False
    status = _git(["status", "--porcelain", "--untracked-files=no", "--", "."], src)
    return commit, bool(status)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.split(":")[0].strip() in ("model name", "Hardware", "cpu model"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def _cpu_and_host() -> dict[str, Any]:
    import socket

    return {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "hostname": socket.gethostname()}


def host_info() -> dict[str, Any]:
    """CPU model, GPU (when torch is loaded and sees one; torch is never imported for this) and hostname."""
    gpu = None
    torch = sys.modules.get("torch")
    with contextlib.suppress(Exception):
        if torch is not None and torch.cuda.is_available():
            n = torch.cuda.device_count()
            gpu = torch.cuda.get_device_name(0) + (f" x{n}" if n > 1 else "")
    return {**_cpu_and_host(), "gpu": gpu}


def reproduce_record() -> dict[str, Any]:
    """summary.json's `reproduce`: the command that wrote it, where it ran, the source revision, the host."""
    import shlex

    commit, dirty = source_revision()
    argv = _INVOCATION
    return {"command": None if argv is None else "lmforge " + shlex.join(argv), "argv": argv, "cwd": os.getcwd(),
            "git_commit": commit, "git_dirty": dirty, "host": host_info()}


def pipeline_record() -> Any:
    """The JSON in $LMFORGE_PIPELINE (set by `lmforge run` for its stages), or None."""
    raw = os.environ.get(PIPELINE_ENV)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


# every stage's name in summary.json: the command as it is typed
STAGES = ("data fetch", "data prepare", "data make-tasks", "tokenizer train", "tokenize", "pretrain", "eval",
          "convert from-hf", "convert to-hf", "convert to-onnx",
          "finetune", "merge", "align", "data make-sft", "posttrain-eval",
          "quantize")
STAGES += ("rag index",)
STAGES += ("distill",)
STAGES += ("prune",)
STAGES += ("rag eval",)


def write_summary(
    out_dir: str | Path,
    stage: str,
    *,
    config: Any = None,
    inputs: dict[str, str | Path] | None = None,
    metrics: dict[str, Any] | None = None,
    wall_time_s: float | None = None,
    hash_inputs: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `out_dir/summary.json`: stage, resolved config, inputs (path + hash), metrics, versions.

    `stage` is the command that wrote it, spelt as it is typed (one of `STAGES`). `reproduce` records the
    command line (`set_invocation`), cwd, git commit of the lmforge source and host; `pipeline` the record of
    the `lmforge run` stage that ran it ($LMFORGE_PIPELINE), which decides whether the stage is up to date."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} for summary.json; add it to lmforge.fsutil.STAGES")
    summary: dict[str, Any] = {"stage": stage, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if config is not None:
        summary["config"] = config
    if inputs:
        summary["inputs"] = {
            name: {"path": str(p), **({"sha256": tree_sha256(p)} if hash_inputs and Path(p).exists() else {})}
            for name, p in inputs.items()
        }
    summary["metrics"] = metrics or {}
    if extra:
        summary.update(extra)
    summary["versions"] = versions()
    summary["reproduce"] = reproduce_record()
    if (record := pipeline_record()) is not None:
        summary["pipeline"] = record
    if wall_time_s is not None:
        summary["wall_time_s"] = round(wall_time_s, 3)
    atomic_write_json(Path(out_dir) / "summary.json", summary)
    return summary
