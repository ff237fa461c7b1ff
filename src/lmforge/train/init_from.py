"""`--init-from DIR` (`train.init_from`): start a run from a checkpoint's weights, with a fresh
optimizer at step 0 (step 6 of `lmforge.train.setup`'s pipeline).

DIR is any checkpoint dir (a run's `checkpoints/best` or `step_N`, a `convert from-hf` output)
or a run dir (its best, else its latest checkpoint). The rule: the recipe's model must be the
checkpoint's. An unset `model.vocab_size` (and `hf_model_type`) is taken from the checkpoint
(`setup.resolve_model_config`); `INIT_FREE_KEYS` may differ; any other difference is one
UserError naming the keys, the first tensor whose shape differs (both shapes) and the `--set`
overrides that fix it. The tokens dir must have been made with the checkpoint's tokenizer (the
same token for every id both have). Only the model's own tensors (`model.safetensors`) are read:
the tensors a checkpoint's model transforms added (`transform_state.safetensors`) are not, and
this run's transforms start from their own initial values. An objective that adds a head
(`Objective.new_heads`, e.g. a reward model's `score.weight`) may start from a checkpoint
without it (the head is freshly initialized), and the model config keys its `configure_model`
changes (`num_labels`) may differ from the checkpoint's.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import UserError
from lmforge.models import build_model
from lmforge.models.config import ModelConfig
from lmforge.tokenizer import Tokenizer
from lmforge.train import checkpoint as ckpt

# model config keys a run may change from its --init-from checkpoint: training-time only
# (dropout; init_std, which loaded weights make moot) or bookkeeping (hf_model_type: taken from the
# checkpoint when the recipe leaves it unset)
INIT_FREE_KEYS = ("dropout", "init_std", "hf_model_type")


def init_checkpoint(init_from: str | Path | None) -> Path | None:
    """The checkpoint dir `--init-from` names: a checkpoint dir, or a run dir (its best, else latest)."""
    if not init_from:
        return None
    from lmforge.compress.quantize import check_not_quantized

    path = ckpt.resolve_checkpoint(init_from)
    check_not_quantized(path, "--init-from (training)")
    return path


def check_init_tokenizer(init: Path, tokenizer: Tokenizer, tokens_dir: Path) -> None:
    """The init checkpoint's tokenizer must give the tokens the same ids as the run's."""
    file = init / "tokenizer.json"
    if not file.is_file():
        warnings.warn(f"--init-from {init} has no tokenizer.json: cannot check that {tokens_dir} was tokenized "
                      "with the model's tokenizer", stacklevel=2)
        return
    theirs = Tokenizer.load(file).backend.get_vocab()
    ours = tokenizer.backend.get_vocab()
    by_id = {i: t for t, i in theirs.items()}
    for token, i in sorted(ours.items(), key=lambda kv: kv[1]):
        if i in by_id and by_id[i] != token:
            raise UserError(
                f"--init-from {init}: its tokenizer.json is not the one {tokens_dir} was made with (id {i} is "
                f"{by_id[i]!r} there, {token!r} here); re-tokenize with it: "
                f"lmforge tokenize --tokenizer {init} --input CORPUS --out DIR")


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _tensor_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = build_model(model_cfg)
    aliases = ckpt.tied_aliases(model)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in aliases}


def _file_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{file} is truncated or corrupt ({str(e).splitlines()[0]}); use another checkpoint") from None


def objective_changes(cfg: Any, init_cfg: dict[str, Any]) -> set[str]:
    """Model config keys the run's objective changes in the checkpoint's config (its
    `configure_model`, e.g. a reward model's `num_labels`): these may differ from the checkpoint."""
    from lmforge.train.objectives import OBJECTIVES

    before = ModelConfig.from_dict(init_cfg)
    after = ModelConfig.from_dict(init_cfg)
    OBJECTIVES[cfg.objective].configure_model(cfg, after)
    a, b = _flat(before.to_dict()), _flat(after.to_dict())
    return {k for k in b if a.get(k) != b[k]}


def check_init_matches(model_cfg: ModelConfig, init: Path, init_cfg: dict[str, Any],
                       new_heads: tuple[str, ...] = (), changed: set[str] = frozenset()) -> None:
    """The run's model must be the init checkpoint's: one error naming the differing keys, the
    first tensor whose shape differs (both shapes) and the --set overrides that fix it.

    new_heads: tensors the run's objective adds (`Objective.new_heads`), allowed to be absent
    from the checkpoint; changed: model config keys its objective changes (`objective_changes`)."""
    ours, theirs = _flat(model_cfg.to_dict()), _flat(init_cfg)
    free = {k for k in ours if k.split(".")[0] in INIT_FREE_KEYS} | set(changed)
    diffs = [k for k in ours if k in theirs and k not in free and ours[k] != theirs[k]]
    mine, saved = _tensor_shapes(model_cfg), _file_shapes(init / "model.safetensors")
    order = [*mine, *sorted(set(saved) - set(mine))]  # the model's own order: the embeddings first
    tensor = next((k for k in order if mine.get(k) != saved.get(k) and not (k in new_heads and k not in saved)),
                  None)
    if not diffs and tensor is None:
        return
    parts = []
    if diffs:
        parts.append("the recipe's model differs from the checkpoint's config.json: "
                     + ", ".join(f"model.{k} is {ours[k]!r} here, {theirs[k]!r} there" for k in diffs))
    if tensor is not None:
        parts.append(f"tensor {tensor!r} has shape {mine.get(tensor, 'absent')} here and "
                     f"{saved.get(tensor, 'absent')} in the checkpoint")
    fix = (" ".join(f"--set model.{k}={'null' if theirs[k] is None else theirs[k]}" for k in diffs)
           if diffs else "use a checkpoint whose config.json matches its weights")
    raise UserError(f"--init-from {init}: " + "; ".join(parts) + f"; use the checkpoint's model ({fix})")


def load_init_weights(model: nn.Module, init: Path, new_heads: tuple[str, ...] = ()) -> None:
    """The init checkpoint's weights into the plain model (its shapes were checked by
    `check_init_matches`); the objective's `new_heads` it lacks keep their fresh initialization."""
    ckpt.load_weights_into(model, ckpt.read_weights(init), init, allow_missing=new_heads)
