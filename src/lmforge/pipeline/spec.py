"""The pipeline file (`lmforge run PIPELINE.yaml`): named stages, variables, line numbers for errors.

```yaml
vars:                       # ${name} anywhere in a stage; `lmforge run --var run=/tmp/x` overrides
  run: runs/demo
stages:                     # in any order: the DAG comes from the directories they read and write
  tokenizer: tokenizer train --kind bpe --input ${run}/data --out ${run}/tokenizer
  pretrain:
    cmd: [pretrain, configs/demo.yaml, --out, "${run}/model"]    # a string or a list
  sample:
    cmd: generate --ckpt ${run}/model --prompt "ROMEO:"
    stdout: ${run}/sample.txt                                    # the printed output is the stage's output
  corpus:
    shell: mkdir -p ${run}/raw && cp notes/*.txt ${run}/raw      # any shell command...
    inputs: [notes]                                              # ... with its inputs and outputs named
    outputs: ["${run}/raw"]
```

Parsing keeps each stage's line (`yaml.compose`), so every error names `FILE:LINE` and the stage.
`${env:NAME}` reads the environment; `$${` is a literal `${`.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lmforge.errors import UserError

STAGE_KEYS = ("cmd", "shell", "inputs", "outputs", "after", "always", "stdout", "resume")
_VAR = re.compile(r"\$\$\{|\$\{([^}]*)\}")


class PipelineError(UserError):
    """Bad pipeline file: one line `FILE:LINE: stage NAME: what is wrong`."""


@dataclass
class Stage:
    name: str
    line: int                          # 1-based line of the stage's name in the file
    argv: list[str] | None = None      # an lmforge command, `lmforge` left out
    shell: str | None = None           # or a shell command
    inputs: list[str] | None = None    # explicit inputs (None: derived from the command's flags)
    outputs: list[str] | None = None   # explicit outputs (None: derived: --out / OUT)
    after: list[str] = field(default_factory=list)  # stages to run first even without a shared directory
    always: bool = False               # run every time (stages without an output always do)
    stdout: str | None = None          # capture what the stage prints into this file (its output)
    resume: bool = True                # an interrupted training stage continues from its checkpoint
    lines: dict[str, int] = field(default_factory=dict)  # line of each key

    @property
    def command(self) -> str:
        """What the stage runs, as it would be typed."""
        return self.shell if self.shell is not None else "lmforge " + shlex.join(self.argv or [])


@dataclass
class Pipeline:
    path: Path
    vars: dict[str, str]
    stages: list[Stage]
    overrides: dict[str, str] = field(default_factory=dict)  # the --var values it was loaded with

    def where(self, stage: Stage, key: str | None = None) -> str:
        return f"{self.path}:{stage.lines.get(key, stage.line) if key else stage.line}: stage {stage.name}"

    def error(self, stage: Stage, message: str, key: str | None = None) -> PipelineError:
        return PipelineError(f"{self.where(stage, key)}: {message}")

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise PipelineError(f"{self.path}: no stage named {name!r}; stages: {', '.join(s.name for s in self.stages)}")


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


class _Vars:
    """Variables resolved lazily (a variable may use earlier or later ones), with `--var` overrides."""

    def __init__(self, path: Path, raw: dict[str, tuple[str, int]]) -> None:
        self.path, self.raw, self.done = path, raw, {}

    def get(self, name: str, line: int, seen: tuple[str, ...] = ()) -> str:
        if name.startswith("env:"):
            if name[4:] not in os.environ:
                raise PipelineError(f"{self.path}:{line}: ${{{name}}}: the environment has no {name[4:]}")
            return os.environ[name[4:]]
        if name in seen:
            raise PipelineError(f"{self.path}:{line}: variable {name} refers to itself ({' -> '.join(seen)})")
        if name not in self.done:
            if name not in self.raw:
                raise PipelineError(f"{self.path}:{line}: undefined variable ${{{name}}}; define it under vars: "
                                    f"or pass --var {name}=VALUE")
            value, vline = self.raw[name]
            self.done[name] = self.sub(value, vline, (*seen, name))
        return self.done[name]

    def sub(self, text: str, line: int, seen: tuple[str, ...] = ()) -> str:
        return _VAR.sub(lambda m: "${" if m.group(1) is None else self.get(m.group(1).strip(), line, seen), text)


def _scalar(node: yaml.Node, path: Path, what: str) -> str:
    if not isinstance(node, yaml.ScalarNode):
        raise PipelineError(f"{path}:{_line(node)}: {what} must be a single value, not a list or mapping")
    return node.value


def _strings(node: yaml.Node, path: Path, what: str) -> list[str]:
    if isinstance(node, yaml.ScalarNode):
        return [node.value]
    if isinstance(node, yaml.SequenceNode):
        return [_scalar(item, path, f"each item of {what}") for item in node.value]
    raise PipelineError(f"{path}:{_line(node)}: {what} must be a string or a list of strings")


def _pairs(node: yaml.Node, path: Path, what: str) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
    """A mapping's (key, value) node pairs; a key given twice is an error naming its line."""
    if not isinstance(node, yaml.MappingNode):
        raise PipelineError(f"{path}:{_line(node)}: {what} must be a mapping (name: value)")
    seen: dict[str, int] = {}
    for key, _ in node.value:
        name = _scalar(key, path, f"a key of {what}")
        if name in seen:
            kind = "stage name" if what == "stages" else "key"
            raise PipelineError(f"{path}:{_line(key)}: {kind} {name!r} used twice (first at line {seen[name]}) "
                                f"in {what}; give each its own name")
        seen[name] = _line(key)
    return node.value


def _bool(node: yaml.Node, path: Path, what: str) -> bool:
    value = _scalar(node, path, what).lower()
    if value not in ("true", "false", "yes", "no"):
        raise PipelineError(f"{path}:{_line(node)}: {what} must be true or false, not {value!r}")
    return value in ("true", "yes")


def _command(node: yaml.Node, v: _Vars, path: Path, name: str) -> list[str]:
    """An lmforge command: a string (split like a shell would) or a list; `lmforge` in front is optional."""
    if isinstance(node, yaml.ScalarNode):
        try:
            words = shlex.split(node.value)
        except ValueError as e:
            raise PipelineError(f"{path}:{_line(node)}: stage {name}: cmd: {e}; check the quotes") from None
    else:
        words = _strings(node, path, f"stage {name}'s cmd")
    argv = [v.sub(w, _line(node)) for w in words]
    if argv and argv[0] == "lmforge":
        argv = argv[1:]
    if not argv:
        raise PipelineError(f"{path}:{_line(node)}: stage {name}: cmd is empty; give an lmforge command")
    return argv


def _stage(name: str, key: yaml.Node, node: yaml.Node, v: _Vars, path: Path) -> Stage:
    stage = Stage(name=name, line=_line(key), lines={})
    if isinstance(node, yaml.ScalarNode):  # `name: data fetch shakespeare --out DIR`
        stage.argv = _command(node, v, path, name)
        return stage
    for knode, vnode in _pairs(node, path, f"stage {name}"):
        k, line = knode.value, _line(knode)
        stage.lines[k] = line
        where = f"stage {name}'s {k}"
        if k == "cmd":
            stage.argv = _command(vnode, v, path, name)
        elif k == "shell":
            stage.shell = v.sub(_scalar(vnode, path, where), line)
        elif k in ("inputs", "outputs", "after"):
            setattr(stage, k, [v.sub(s, line) for s in _strings(vnode, path, where)])
        elif k in ("always", "resume"):
            setattr(stage, k, _bool(vnode, path, where))
        elif k == "stdout":
            stage.stdout = v.sub(_scalar(vnode, path, where), line)
        else:
            raise PipelineError(f"{path}:{line}: stage {name}: unknown key {k!r}; a stage has "
                                f"{', '.join(STAGE_KEYS)}")
    if (stage.argv is None) == (stage.shell is None):
        raise PipelineError(f"{path}:{stage.line}: stage {name}: give exactly one of cmd: (an lmforge command) "
                            "or shell: (a shell command)")
    return stage


def parse_vars(items: list[str]) -> dict[str, str]:
    """`--var key=value` (repeatable) -> {key: value}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--var {item}: give NAME=VALUE, e.g. --var run=/tmp/demo")
        out[key.strip()] = value
    return out


def load_pipeline(path: str | Path, overrides: dict[str, str] | None = None) -> Pipeline:
    """Read and check a pipeline file; `overrides` replace (or add) variables."""
    path = Path(path)
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{path}: cannot read the pipeline file ({e.strerror}); check the path") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise PipelineError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if root is None:
        raise PipelineError(f"{path}: the file is empty; give stages: (see docs/PIPELINES.md)")
    raw_vars: dict[str, tuple[str, int]] = {}
    stages_node = None
    for knode, vnode in _pairs(root, path, "the pipeline file"):
        if knode.value == "vars":
            raw_vars = {k.value: (_scalar(val, path, f"variable {k.value}"), _line(k))
                        for k, val in _pairs(vnode, path, "vars")}
        elif knode.value == "stages":
            stages_node = vnode
        else:
            raise PipelineError(f"{path}:{_line(knode)}: unknown key {knode.value!r}; a pipeline has vars: "
                                "and stages:")
    if stages_node is None:
        raise PipelineError(f"{path}: no stages: in the pipeline file (see docs/PIPELINES.md)")
    for name, value in (overrides or {}).items():
        raw_vars[name] = (value, raw_vars.get(name, ("", 0))[1])
    v = _Vars(path, raw_vars)
    stages = [_stage(k.value, k, val, v, path) for k, val in _pairs(stages_node, path, "stages")]
    if not stages:
        raise PipelineError(f"{path}:{_line(stages_node)}: stages: is empty")
    return Pipeline(path=path, vars={name: v.get(name, line) for name, (_, line) in raw_vars.items()},
                    stages=stages, overrides=dict(overrides or {}))
