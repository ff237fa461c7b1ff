"""The typed config tree: dataclasses loaded from YAML recipes, with dotted overrides.

    cfg = load_config("configs/nano.yaml", ["train.lr=1e-3", "model.n_layer=6"])

Every key is validated at load: an unknown key is an error that names the closest valid key,
a value of the wrong type names the key and the expected type. `to_dict(cfg)` is the resolved
config that every stage writes into its output directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

import yaml

from lmforge.adapters.options import METHODS, AdapterOptions
from lmforge.configtree import build, load_tree
from lmforge.errors import UserError
from lmforge.models.config import ModelConfig
from lmforge.track.loggers import check_loggers
from lmforge.train.objectives import OBJECTIVES


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
    checkpoint_every: int = 0  # 0: only at evals, on interrupt and at the end
    keep_last: int = 2  # step checkpoints kept besides `best`
    patience: int = 0  # early stopping: evals without val improvement; 0 disables
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False
    seed: int = 1337
    parallel: str = "none"  # none | ddp | fsdp (under torchrun)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads for torch; 0: all cores (per process)
    init_from: str = ""  # a checkpoint dir (lmforge's or converted): start from its weights, fresh optimizer, step 0
    loggers: list[str] = field(default_factory=list)  # experiment tracking: tensorboard, mlflow, wandb (lmforge.track)
    tracking_uri: str = ""  # MLflow store; empty: $MLFLOW_TRACKING_URI, else sqlite:///<run dir's parent>/mlflow.db
    experiment: str = "lmforge"  # MLflow experiment / W&B project


@dataclass
class DataConfig:
    tokens: str = ""  # a directory written by `lmforge tokenize` (and its tokenizer)
    pairs: str = ""  # objective seq2seq: a JSONL file of {"source": ..., "target": ...} lines
    file: str = ""  # post-training (sft, reward, dpo, ...): a JSONL file of examples or pairs (--data FILE)
    val_file: str = ""  # post-training: held-out JSONL; empty: 5% of data.file's examples by content hash


def _objective_sections() -> list[tuple[str, type, Any]]:
    """One config section per objective that has settings (`mlm`, `span`, `contrastive`, ...):
    each objective owns its section's dataclass (`Objective.Options`) and its checks."""
    return [(name, cls.Options, field(default_factory=cls.Options))
            for name, cls in OBJECTIVES.items() if cls.Options is not None]


# The whole recipe: model, train, data, which objective, and each objective's own section.
Config = make_dataclass("Config", [
    ("model", ModelConfig, field(default_factory=ModelConfig)),
    ("train", TrainConfig, field(default_factory=TrainConfig)),
    ("data", DataConfig, field(default_factory=DataConfig)),
    ("objective", str, "clm"),  # a key of lmforge.train.objectives.OBJECTIVES
    ("adapter", AdapterOptions, field(default_factory=AdapterOptions)),  # fine-tuning method (lmforge.adapters)
    *_objective_sections(),
], namespace={"__module__": __name__})

_CHOICES = {
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.parallel": ("none", "ddp", "fsdp"),
    "objective": tuple(OBJECTIVES),
    "adapter.method": METHODS,
}


def to_dict(obj: Any) -> dict[str, Any]:
    """The resolved config as plain data (what goes into YAML/JSON outputs)."""
    return dataclasses.asdict(obj)


# the presets of a source checkout (an editable install); `configs/` of the working dir comes first
PRESET_DIRS = (Path("configs"), Path(__file__).resolve().parents[2] / "configs")


def find_preset(name: str | Path) -> Path:
    """`nano` -> configs/nano.yaml (in the working dir, else in lmforge's source checkout);
    a file that exists, or any path with a suffix, is returned as it is."""
    path = Path(name)
    if path.is_file() or path.suffix:  # a directory called `nano` (say, a run's --out) is not a recipe
        return path
    for folder in PRESET_DIRS:
        if (folder / f"{path}.yaml").is_file():
            return folder / f"{path}.yaml"
    names = sorted({p.stem for folder in PRESET_DIRS if folder.is_dir() for p in folder.glob("*.yaml")})
    if names:
        raise UserError(f"config {name} is neither a file nor a preset; presets: {', '.join(names)}")
    return path


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe (or the defaults when `path` is None) and apply `--set` overrides."""
    if path is not None:
        path = find_preset(path)  # `lmforge pretrain nano` finds configs/nano.yaml
    cfg, where = load_tree(Config, path, overrides, _CHOICES, "configs/nano.yaml")
    _check_ranges(cfg, where)
    return cfg


def _check_ranges(cfg: Config, where: str) -> None:
    t = cfg.train
    positive = ("batch_size", "grad_accum", "max_steps", "eval_steps", "keep_last")
    for key in positive:
        if getattr(t, key) <= 0:
            raise UserError(f"{where}config key train.{key}: must be > 0, got {getattr(t, key)}")
    for key in ("warmup_steps", "eval_every", "checkpoint_every", "patience", "threads"):
        if getattr(t, key) < 0:
            raise UserError(f"{where}config key train.{key}: must be >= 0, got {getattr(t, key)}")
    for name, cls in OBJECTIVES.items():
        if cls.Options is not None:
            getattr(cfg, name).check(where)
    cfg.adapter.check(where)
    check_loggers(t.loggers, where)
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        raise UserError(f"{where}config key train.min_lr: need 0 <= min_lr <= lr, got lr={t.lr} min_lr={t.min_lr}")


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from its resolved dict (e.g. a checkpoint's saved config)."""
    return build(Config, data, "", "")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
