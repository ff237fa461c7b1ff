"""The short recovery fine-tune after pruning (`lmforge prune --recover-steps N`).

It is `lmforge pretrain` itself (`lmforge.train.loop.pretrain`): `--init-from` the pruned checkpoint,
on the train split of the token dir the original was trained on, with the recipe its run recorded
(`config.yaml` beside the checkpoint; the defaults otherwise) except: the pruned model, objective clm,
N steps, a constant-then-cosine learning rate from `lr` (default the recipe's min_lr, where its
cosine ended; `--recover-lr`) down to lr / 10 after min(N // 10, 50) warm-up steps, one evaluation
and checkpoint at the end, no trackers. Masked weights (magnitude, 2:4) stay zero through the model
transform `keep_zeros` (`lmforge.compress.masks`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lmforge.errors import UserError


def recorded_recipe(ckpt: Path) -> Path | None:
    """The `config.yaml` of the run that wrote checkpoint `ckpt` (in it, its run dir, or its parent)."""
    for folder in dict.fromkeys((ckpt, ckpt.parent.parent, ckpt.parent)):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def recovery_config(src: Path, model_config: dict[str, Any], tokens: Path, steps: int, lr: float | None):
    """The recipe of the recovery run (see the module docstring)."""
    from lmforge.adapters.options import AdapterOptions
    from lmforge.config import load_config
    from lmforge.models.config import ModelConfig

    recipe = recorded_recipe(src)
    try:
        cfg = load_config(recipe)
    except UserError:  # a recipe of another lmforge version: start from the defaults
        cfg = load_config(None)
    t = cfg.train
    lr = t.min_lr if lr is None else lr
    if lr <= 0:
        raise UserError(f"--recover-lr {lr}: give a positive learning rate, e.g. {t.min_lr or 1e-4}")
    train = dataclasses.replace(t, max_steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=min(steps // 10, 50),
                                lr_decay_steps=None, eval_every=steps, checkpoint_every=0, keep_last=1, patience=0,
                                init_from="", loggers=[], parallel="none")
    data = dataclasses.replace(cfg.data, tokens=str(tokens), pairs="", file="", val_file="")
    return dataclasses.replace(cfg, model=ModelConfig.from_dict(model_config), train=train, data=data,
                               objective="clm", adapter=AdapterOptions())


def recover(pruned: Path, run_dir: Path, src: Path, tokens: Path, steps: int, *, lr: float | None = None,
            masked: bool = False) -> tuple[Path, dict[str, Any]]:
    """Fine-tune the pruned checkpoint `pruned` for `steps` steps into the run dir `run_dir`; returns its
    final checkpoint and the run's summary. masked: keep the zero weights zero (`keep_zeros`)."""
    from lmforge.compress.masks import keep_zeros
    from lmforge.train import checkpoint as C
    from lmforge.train.loop import pretrain

    cfg = recovery_config(src, C.read_model_config(pruned), tokens, steps, lr)
    summary = pretrain(cfg, run_dir, init_from=pruned, transforms=[keep_zeros] if masked else [], overwrite=True)
    return C.resolve_checkpoint(run_dir), summary
