"""Generic typed-config machinery: build dataclass trees from YAML/dicts with did-you-mean errors.

`lmforge.config` (training) and `lmforge.data.config` (data preparation) both build their
config trees with `build`. This module imports nothing heavy (no torch), so data-pipeline
worker processes start fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import UserError


def coerce(value: Any, tp: Any, key: str) -> Any:
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
                return coerce(value, arg, key)
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


def all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def unknown_key(key: str, where: str, root: type) -> UserError:
    leaves = all_keys(root)
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


def build(cls: type, data: dict[str, Any], prefix: str, where: str, root: type | None = None) -> Any:
    """Build dataclass `cls` from `data`; `root` is the top of the tree (for did-you-mean hints)."""
    root = root or cls
    if not isinstance(data, dict):
        raise UserError(f"{where}config key {prefix.rstrip('.') or '(top)'} must be a mapping, got {data!r}")
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in types_:
            raise unknown_key(full, where, root)
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value or {}, full + ".", where, root)
        else:
            kwargs[key] = coerce(value, tp, full)
    try:
        return cls(**kwargs)
    except UserError as e:
        raise UserError(f"{where}{e}") from None


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
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


def load_tree(root: type, path: str | Path | None, overrides: list[str] | None,
              choices: dict[str, tuple[str, ...]], example: str) -> tuple[Any, str]:
    """Build the dataclass `root` from a YAML file plus `--set KEY=VALUE` overrides.

    Errors in the file name the file (and line); errors in an override name the override.
    `choices` maps dotted keys to their allowed values. Returns the config and the `where`
    prefix (the file) for the caller's own range checks.
    """
    tree: dict[str, Any] = {}
    where = ""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist; pass a YAML recipe such as {example}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(tree, dict):
            raise UserError(f"{path}: expected a mapping of sections at the top")
        where = f"{path}: "
    build(root, tree, "", where)  # errors in the file name the file
    valid = set(all_keys(root))
    for text in overrides or []:
        key, value = parse_override(text)
        if key not in valid:
            raise unknown_key(key, f"--set {text}: ", root)
        set_dotted(tree, key, value)
    cfg = build(root, tree, "", "")
    for key, allowed in choices.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if node not in allowed:
            raise UserError(f"{where}config key {key}: {node!r} is not one of {', '.join(allowed)}")
    return cfg, where
