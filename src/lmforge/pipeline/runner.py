"""`lmforge run`: run a pipeline's stages in order, each as its own process, skipping what is up to date.

Each stage runs as `python -m lmforge ...` (or `sh -c` for a shell stage) with its record in
$LMFORGE_PIPELINE, its output streaming through. Ctrl-C (SIGINT/SIGTERM) is passed to the running
stage once per press: a training stage saves a checkpoint and stops, any other stage removes its
half-written output (atomic writes); the next `lmforge run` starts at that stage (a training stage
with `--resume`). `--reproduce DIR` re-runs the command that DIR's summary.json records.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.errors import Interrupted, TrainingFailed, UserError
from lmforge.fsutil import PIPELINE_ENV
from lmforge.pipeline import graph, state
from lmforge.pipeline.spec import Pipeline, Stage, load_pipeline


class StageFailed(TrainingFailed):
    """A stage exited with an error: `lmforge run` exits with the stage's own exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code if 0 < exit_code < 256 else 1


@contextlib.contextmanager
def _forward_signals(own_group: bool) -> Iterator[dict[str, Any]]:
    """SIGINT/SIGTERM to `lmforge run` go to the stage's process (`box["proc"]`; in its own process group
    it gets them only from here, once per press); `box["got"]` lists the signals received. Installed
    before the process starts, so that no signal can leave it running on its own."""
    box: dict[str, Any] = {"proc": None, "got": []}

    def forward(signum: int) -> None:
        if box["proc"] is not None and (own_group or signum != signal.SIGINT):  # else the terminal sent it
            with contextlib.suppress(ProcessLookupError):
                box["proc"].send_signal(signum)

    def handler(signum, frame) -> None:
        box["got"].append(signum)
        forward(signum)

    box["forward"] = forward
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread
            previous[sig] = signal.signal(sig, handler)
    try:
        yield box
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _tee(proc: subprocess.Popen, tmp: Path) -> None:
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        while chunk := os.read(proc.stdout.fileno(), 1 << 16):
            f.write(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()


def run_process(cmd: list[str], record: dict[str, Any] | None, *, cwd: str | None = None,
                interactive: bool = False, stdout_file: str | None = None) -> tuple[int, bool]:
    """Run one stage's process; (exit code, whether it was interrupted). `stdout_file` gets what it
    prints (written whole on success, as well as shown)."""
    env = dict(os.environ)
    env.pop(PIPELINE_ENV, None)
    if record is not None:
        env[PIPELINE_ENV] = json.dumps(record)
    sys.stdout.flush()
    tmp = None if stdout_file is None else Path(stdout_file).with_name(f".{Path(stdout_file).name}.tmp{os.getpid()}")
    with _forward_signals(own_group=not interactive) as box:
        box["proc"] = proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=None if tmp is None else subprocess.PIPE,
                                              process_group=None if interactive else 0)
        for signum in box["got"]:  # arrived while it started
            box["forward"](signum)
        if tmp is not None:
            _tee(proc, tmp)
        rc = proc.wait()
    if tmp is not None:
        if rc == 0:
            os.replace(tmp, stdout_file)
        else:
            tmp.unlink(missing_ok=True)
    return rc, bool(box["got"]) or rc in (130, -signal.SIGINT, -signal.SIGTERM)


def stage_argv(stage: Stage, resume: bool) -> list[str]:
    """The command line to run: a resumed training stage gets --resume instead of --overwrite."""
    if stage.shell is not None:
        return ["/bin/sh", "-c", stage.shell]
    argv = list(stage.argv or [])
    if resume:
        argv = [a for a in argv if a != "--overwrite"] + ["--resume"]
    return [sys.executable, "-m", "lmforge", *argv]


def shown_command(stage: Stage, resume: bool) -> str:
    return stage.command if not resume else "lmforge " + shlex.join(stage_argv(stage, True)[3:])


def _select(pipeline: Pipeline, ios: dict[str, graph.StageIO], force: list[str], start: str | None,
            until: str | None) -> set[str]:
    for name in [*force, *(n for n in (start, until) if n)]:
        pipeline.stage(name)  # an unknown name is an error naming the stages there are
    chosen = set(ios)
    if start:
        chosen &= graph.downstream(ios, start)
    if until:
        chosen &= graph.upstream(ios, until)
    return chosen


def _run_stage(pipeline: Pipeline, stage: Stage, sio: graph.StageIO, record: dict[str, Any],
               v: state.Verdict) -> None:
    """Run one stage that is out of date; its outputs record it on success and forget it on failure."""
    if sio.resumable and not v.resume:
        for out in sio.outputs:
            state.mark_started(out, record)
    print(f"$ {shown_command(stage, v.resume)}", flush=True)
    rc, interrupted = run_process(stage_argv(stage, v.resume), record, interactive=sio.command == "chat",
                                  stdout_file=stage.stdout)
    if rc != 0 or interrupted:
        for out in sio.outputs:
            state.forget(out)
        again = " ".join(["lmforge run", shlex.quote(str(pipeline.path)),
                          *(f"--var {shlex.quote(f'{k}={v}')}" for k, v in pipeline.overrides.items())])
        if interrupted:
            raise Interrupted(f"stage {stage.name} interrupted; `{again}` starts again at it"
                              + (" (from its checkpoint)" if sio.resumable else ""))
        raise StageFailed(f"stage {stage.name} failed (exit code {rc}); fix it and `{again}` starts again at it",
                          rc)
    for out in sio.outputs:
        state.write_stamp(out, record)


def run_pipeline(path: str | Path, *, variables: dict[str, str] | None = None, force: list[str] = (),
                 start: str | None = None, until: str | None = None, dry_run: bool = False) -> dict[str, str]:
    """Run (or with `dry_run`, plan) a pipeline; returns {stage: what happened}. All bad input is
    reported before any stage runs."""
    pipeline = load_pipeline(path, variables)
    ios = graph.build_graph(pipeline)
    stages = graph.order(pipeline, ios)
    chosen = _select(pipeline, ios, list(force), start, until)
    hashes, result, t0 = state.HashCache(), {}, time.perf_counter()
    width = max(len(s.name) for s in stages)
    print(f"pipeline {pipeline.path}: {len(stages)} stages" + (" (dry run: nothing runs)" if dry_run else ""))
    for i, stage in enumerate(stages, 1):
        head = f"[{i}/{len(stages)}] {stage.name:<{width}}"
        if stage.name not in chosen:
            result[stage.name] = "not selected"
            print(f"{head}  skipped (not selected by --from/--until)")
            continue
        sio = ios[stage.name]
        record = state.make_record(pipeline.path, stage, sio, hashes)
        v = state.verdict(stage, sio, record, forced=stage.name in force)
        waits = [d for d in sio.deps if result.get(d) == "run"]
        if dry_run and not v.run and waits:
            v = state.Verdict(True, f"after {waits[0]} runs, if its output changes")
        result[stage.name] = "run" if v.run else "up to date"
        if not v.run:
            print(f"{head}  up to date")
            continue
        print(f"{head}  run (why: {v.why})" if dry_run else f"== {head}  run (why: {v.why}) ==", flush=True)
        if dry_run:
            print(f"    {shown_command(stage, v.resume)}")
        else:
            _run_stage(pipeline, stage, sio, record, v)
    ran = sum(r == "run" for r in result.values())
    print(f"pipeline {'plan' if dry_run else 'done'}: {ran} {'would run' if dry_run else 'ran'}, "
          f"{sum(r == 'up to date' for r in result.values())} up to date ({time.perf_counter() - t0:.1f} s)")
    return result


def reproduce_argv(summary: dict[str, Any], where: Path) -> list[str]:
    """The recorded command line, to re-create the output in place: a resumed training run starts over."""
    rec = summary.get("reproduce")
    if not isinstance(rec, dict) or not rec.get("argv"):
        raise UserError(f"{where}: no reproduce.argv (written by lmforge >= this version's commands, not a "
                        "library call); run the stage's command yourself")
    argv = [a for a in rec["argv"] if a != "--resume"]
    if summary.get("stage") in graph.TRAINING_COMMANDS and "--overwrite" not in argv:
        argv.append("--overwrite")
    return argv


def reproduce(run_dir: str | Path, *, dry_run: bool = False) -> list[str]:
    """Re-run the stage whose output is `run_dir`, as its summary.json records it (cwd, command)."""
    from lmforge import fsutil

    where = Path(run_dir) / "summary.json"
    summary = state.read_json(where)
    if not isinstance(summary, dict):
        raise UserError(f"{where}: missing or not JSON; give an output dir of an lmforge stage")
    argv, rec = reproduce_argv(summary, where), summary["reproduce"]
    cwd = rec.get("cwd") if rec.get("cwd") and Path(rec["cwd"]).is_dir() else None
    commit, _ = fsutil.source_revision()
    if rec.get("git_commit") and commit and rec["git_commit"] != commit:
        print(f"note: recorded at lmforge commit {rec['git_commit'][:12]}, this checkout is {commit[:12]}")
    print(f"reproducing {run_dir}: lmforge {shlex.join(argv)}" + (f"  (in {cwd})" if cwd else ""), flush=True)
    if dry_run:
        return argv
    record = summary.get("pipeline") if isinstance(summary.get("pipeline"), dict) else None
    rc, interrupted = run_process([sys.executable, "-m", "lmforge", *argv], record, cwd=cwd)
    if interrupted:
        raise Interrupted("interrupted")
    if rc != 0:
        raise StageFailed(f"the reproduced command failed (exit code {rc})", rc)
    return argv
