"""The pipeline's DAG: each stage's command checked against the CLI, its inputs and outputs, the order.

A stage's output is its `--out` (or positional OUT) unless `outputs:` says otherwise; its inputs are
the paths in its input flags (--input, --ckpt, --tokenizer, --data, --base, --teacher, --index, ...,
the recipe file), any argument naming another stage's output (`--set data.tokens=DIR`,
`--model sft=DIR`), and paths in the recipe file naming one — unless `inputs:` says otherwise. A stage
depends on the stage whose output it reads (the most specific one when outputs nest).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.pipeline.spec import Pipeline, Stage

# the namespace attributes whose values are paths a command reads
INPUT_FLAGS = ("input", "ckpt", "tokenizer", "data", "base", "teacher", "index", "calib", "reward", "init_from",
               "src", "plays", "task", "eval", "embedder", "rag", "config", "model", "adapter", "template",
               "run_dir", "runs", "root", "fewshot", "retriever")
RECIPE_COMMANDS = ("pretrain", "finetune", "align", "distill", "plan", "prune")  # positional config = a recipe
TRAINING_COMMANDS = ("pretrain", "finetune", "align", "distill")  # --resume continues from the checkpoint


@dataclass
class StageIO:
    command: str = ""                  # the lmforge command ("data prepare"), "" for a shell stage
    inputs: list[str] = field(default_factory=list)    # normalized paths
    outputs: list[str] = field(default_factory=list)
    deps: list[str] = field(default_factory=list)      # stage names it waits for
    resumable: bool = False            # a training command: --resume continues it


def norm(path: str | Path) -> str:
    """A path as the pipeline compares them: absolute, normalized (symlinks kept)."""
    return os.path.normpath(os.path.abspath(os.path.expanduser(str(path))))


def is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def command_words(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The subcommand words at the front of argv (`data prepare`), following the parser's subparsers."""
    words, p = [], parser
    for word in argv:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        words.append(word)
        p = subs[0].choices[word]
    return words


def parse_stage(parser: argparse.ArgumentParser, pipeline: Pipeline, stage: Stage) -> argparse.Namespace:
    """The stage's argv through `lmforge`'s own parser; its usage error becomes one line naming the stage."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(stage.argv)
    except SystemExit:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        message = lines[-1] if lines else "not a valid lmforge command (it asks for --help?)"
        message = message.split(" error: ", 1)[-1]  # "lmforge tokenizer: error: ..." -> "..."
        raise pipeline.error(stage, f"{message} (in: {stage.command})", "cmd") from None


def _values(ns: argparse.Namespace, key: str) -> list[str]:
    value = getattr(ns, key, None)
    items = value if isinstance(value, list) else [value]
    return [str(v) for v in items if isinstance(v, (str, Path)) and str(v) not in ("", "-")]


def _recipe(ns: argparse.Namespace, command: str) -> Path | None:
    if command.split()[0] not in RECIPE_COMMANDS or not isinstance(getattr(ns, "config", None), str):
        return None
    from lmforge.config import find_preset
    from lmforge.errors import UserError

    with contextlib.suppress(UserError):
        path = find_preset(ns.config)
        return path if path.is_file() else None
    return None


def _strings_in(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings_in(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings_in(v)]
    return [obj] if isinstance(obj, str) else []


def derive_io(parser: argparse.ArgumentParser, pipeline: Pipeline, stage: Stage) -> tuple[StageIO, list[str]]:
    """(the stage's IO with declared outputs and flag inputs, candidate paths to match against outputs)."""
    if stage.argv is None:  # a shell stage names its own inputs and outputs
        return StageIO(inputs=[norm(p) for p in stage.inputs or []],
                       outputs=[norm(p) for p in (stage.outputs or [])]), []
    ns = parse_stage(parser, pipeline, stage)
    command = " ".join(command_words(parser, stage.argv))
    outs = _values(ns, "out")
    if command == "pretrain" and not outs:  # its default run dir
        outs = [str(Path("runs") / Path(ns.config).stem)]
    flag_inputs = [c for key in INPUT_FLAGS for v in _values(ns, key)
                   for c in ([v, v.split("=", 1)[1]] if "=" in v else [v])]
    recipe = _recipe(ns, command)
    candidates = [w.split("=", 1)[1] if "=" in w else w for w in stage.argv]
    if recipe is not None:
        flag_inputs.append(str(recipe))
        with contextlib.suppress(OSError, yaml.YAMLError):
            candidates += _strings_in(yaml.safe_load(recipe.read_text()))
    io_ = StageIO(command=command, outputs=[norm(p) for p in (stage.outputs if stage.outputs is not None else outs)],
                  resumable=command in TRAINING_COMMANDS and hasattr(ns, "resume") and stage.resume)
    if stage.stdout is not None:
        io_.outputs.append(norm(stage.stdout))
    if stage.inputs is not None:
        io_.inputs = [norm(p) for p in stage.inputs]
        return io_, []
    io_.inputs = list(dict.fromkeys(norm(p) for p in flag_inputs))
    return io_, [norm(c) for c in candidates if c and not c.startswith("-")]


def _owners(path: str, outputs: list[tuple[str, str]], me: str, parents_too: bool) -> list[str]:
    """Stages whose output `path` reads: the deepest output containing it, and (a directory read whole)
    every output inside it."""
    within = [(o, t) for o, t in outputs if t != me and is_within(path, o)]
    owners = [max(within, key=lambda ot: len(ot[0]))[1]] if within else []
    if parents_too:
        owners += [t for o, t in outputs if t != me and o != path and is_within(o, path)]
    return owners


def _check_outputs(pipeline: Pipeline, ios: dict[str, StageIO]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for stage in pipeline.stages:
        for out in ios[stage.name].outputs:
            if out in seen and seen[out] != stage.name:
                raise pipeline.error(stage, f"writes {os.path.relpath(out)}, which stage {seen[out]} writes too; "
                                     "give each stage its own output", "outputs" if stage.outputs else None)
            seen[out] = stage.name
    return [(o, t) for o, t in seen.items()]


def build_graph(pipeline: Pipeline, parser: argparse.ArgumentParser | None = None) -> dict[str, StageIO]:
    """Every stage's checked command, inputs, outputs and dependencies (raises PipelineError)."""
    if parser is None:
        from lmforge.cli import build_parser

        parser = build_parser()
    ios, candidates = {}, {}
    for stage in pipeline.stages:
        ios[stage.name], candidates[stage.name] = derive_io(parser, pipeline, stage)
    outputs = _check_outputs(pipeline, ios)
    names = {s.name for s in pipeline.stages}
    for stage in pipeline.stages:
        sio = ios[stage.name]
        deps = [t for p in sio.inputs for t in _owners(p, outputs, stage.name, parents_too=True)]
        if stage.inputs is None and stage.argv is not None:  # keep what exists or some stage writes
            sio.inputs = [p for p in sio.inputs if os.path.exists(p) or _owners(p, outputs, stage.name, True)]
        for c in candidates[stage.name]:
            owner = _owners(c, outputs, stage.name, parents_too=False)
            if owner and not any(is_within(c, o) for o in sio.outputs):
                deps += owner
                sio.inputs.append(c)
        for name in stage.after:
            if name not in names:
                raise pipeline.error(stage, f"after: no stage named {name!r}", "after")
        sio.inputs = list(dict.fromkeys(sio.inputs))
        sio.deps = list(dict.fromkeys([*deps, *stage.after]))
    order(pipeline, ios)  # a cycle is bad input too
    return ios


def order(pipeline: Pipeline, ios: dict[str, StageIO]) -> list[Stage]:
    """Stages in an order that runs every dependency first (file order among equals); a cycle is an error."""
    done: list[Stage] = []
    left = list(pipeline.stages)
    while left:
        ready = next((s for s in left if all(d in {x.name for x in done} for d in ios[s.name].deps)), None)
        if ready is None:
            raise _cycle_error(pipeline, ios, left)
        done.append(ready)
        left.remove(ready)
    return done


def _cycle_error(pipeline: Pipeline, ios: dict[str, StageIO], left: list[Stage]):
    names = {s.name for s in left}
    path = [left[0].name]
    while True:  # every stage left waits for another one left: walk until a name repeats
        nxt = next(d for d in ios[path[-1]].deps if d in names)
        if nxt in path:
            cycle = path[path.index(nxt):] + [nxt]
            break
        path.append(nxt)
    stage = pipeline.stage(cycle[0])
    return pipeline.error(stage, f"the stages form a cycle: {' -> '.join(cycle)} (each reads the next one's output); "
                          "break it by giving one stage another --out or inputs:")


def downstream(ios: dict[str, StageIO], name: str) -> set[str]:
    """`name` and every stage that (transitively) reads its output."""
    out, grew = {name}, True
    while grew:
        more = {s for s, sio in ios.items() if s not in out and out & set(sio.deps)}
        out |= more
        grew = bool(more)
    return out


def upstream(ios: dict[str, StageIO], name: str) -> set[str]:
    """`name` and every stage it (transitively) needs."""
    out, todo = set(), [name]
    while todo:
        s = todo.pop()
        if s not in out:
            out.add(s)
            todo += ios[s].deps
    return out
