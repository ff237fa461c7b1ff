"""The typed config tree: dataclasses loaded from YAML recipes, with dotted overrides.

    cfg = load_config("configs/nano.yaml", ["train.lr=1e-3", "model.n_layer=6"])

Every key is validated at load: an unknown key is an error that names the closest valid key,
a value of the wrong type names the key and the expected type. `to_dict(cfg)` is the resolved
config that every stage writes into its output directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import UserError
from lmforge.models.config import ModelConfig


@dataclass
class TrainConfig:
    batch_size: int = 12  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step (per process)
    max_steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine decay ends here
    warmup_steps: int = 100
    lr_decay_steps: int | None = None  # None: decay over max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 250
    eval_steps: int = 20  # batches per val-loss estimate
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at evals, on interrupt and at the end
    keep_last: int = 2  # step checkpoints kept besides `best`
    patience: int = 0  # early stopping: evals without val improvement; 0 disables
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False
    seed: int = 1337
    parallel: str = "none"  # none | ddp | fsdp (under torchrun)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads for torch; 0: all cores (per process)


@dataclass
class DataConfig:
    tokens: str = ""  # a directory written by `lmforge tokenize`


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: str = "clm"


_CHOICES = {
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.parallel": ("none", "ddp", "fsdp"),
    "objective": ("clm",),
}


def to_dict(obj: Any) -> dict[str, Any]:
    """The resolved config as plain data (what goes into YAML/JSON outputs)."""
    return dataclasses.asdict(obj)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML or command-line value to the dataclass field's type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null", "~") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError as e:
                errors.append(e)
        raise errors[0]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise UserError(f"config key {key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"config key {key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise UserError(f"config key {key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"config key {key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config key {key}: expected a string, got {value!r}")
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _unknown_key(key: str, where: str) -> UserError:
    leaves = _all_keys(Config)
    # compare like with like: a misspelt section (`modle`) against sections, a leaf against leaves
    depth = key.count(".")
    candidates = sorted({".".join(k.split(".")[: depth + 1]) for k in leaves if k.count(".") >= depth})
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not close:  # try matching only the last component, e.g. `n_layers` -> `model.n_layer`
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {c.rsplit(".", 1)[-1]: c for c in leaves}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
    hint = f"; did you mean {close[0]}?" if close else ""
    return UserError(f"{where}unknown config key {key}{hint}")


def _build(cls: type, data: dict[str, Any], prefix: str, where: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{where}config key {prefix.rstrip('.') or '(top)'} must be a mapping, got {data!r}")
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in types_:
            raise _unknown_key(full, where)
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, full + ".", where)
        else:
            kwargs[key] = _coerce(value, tp, full)
    try:
        return cls(**kwargs)
    except UserError as e:
        raise UserError(f"{where}{e}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-3` -> ("train.lr", 0.001). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=1e-3")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe (or the defaults when `path` is None) and apply `--set` overrides."""
    tree: dict[str, Any] = {}
    where = ""
    if path is not None:
        path = Path(path)
        if not path.exists() and not path.suffix and (Path("configs") / f"{path}.yaml").exists():
            path = Path("configs") / f"{path}.yaml"  # `lmforge pretrain nano` finds configs/nano.yaml
        if not path.is_file():
            raise UserError(f"config file {path} does not exist; pass a YAML recipe such as configs/nano.yaml")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(tree, dict):
            raise UserError(f"{path}: expected a mapping of sections (model:, train:, data:) at the top")
        where = f"{path}: "
    _build(Config, tree, "", where)  # errors in the file name the file
    valid = set(_all_keys(Config))
    for text in overrides or []:
        key, value = parse_override(text)
        if key not in valid:
            raise _unknown_key(key, f"--set {text}: ")
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "", "")
    for key, allowed in _CHOICES.items():
        section, _, leaf = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, leaf)
        if value not in allowed:
            raise UserError(f"{where}config key {key}: {value!r} is not one of {', '.join(allowed)}")
    _check_ranges(cfg, where)
    return cfg


def _check_ranges(cfg: Config, where: str) -> None:
    t = cfg.train
    positive = ("batch_size", "grad_accum", "max_steps", "eval_steps", "log_every", "keep_last")
    for key in positive:
        if getattr(t, key) <= 0:
            raise UserError(f"{where}config key train.{key}: must be > 0, got {getattr(t, key)}")
    for key in ("warmup_steps", "eval_every", "checkpoint_every", "patience", "threads"):
        if getattr(t, key) < 0:
            raise UserError(f"{where}config key train.{key}: must be >= 0, got {getattr(t, key)}")
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        raise UserError(f"{where}config key train.min_lr: need 0 <= min_lr <= lr, got lr={t.lr} min_lr={t.min_lr}")


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from its resolved dict (e.g. a checkpoint's saved config)."""
    return _build(Config, data, "", "")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
