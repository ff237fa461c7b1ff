"""Checkpoints: self-contained directories, written atomically.

    run_dir/checkpoints/step_000400/   model.safetensors  config.json  tokenizer.json  trainer_state.pt
    run_dir/checkpoints/best/          (the same files, for the step with the lowest val loss)

A model changed by model transforms (`lmforge.train.transforms`) keeps the plain model's tensor
names; the tensors a transform added (an adapter, a quantization statistic) are saved beside
them in `transform_state.safetensors`, so `model.safetensors` stays what `load_pretrained`,
`--init-from` and `convert to-hf` read, and `--resume` restores both.

`trainer_state.pt` holds plain tensors and numbers only (optimizer state keyed by parameter
name, step, RNG states, early-stopping counters) and is loaded with `weights_only=True`.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.errors import UserError
from lmforge.fsutil import atomic_dir, atomic_write_json

STEP_DIR = re.compile(r"^step_(\d+)$")
TRANSFORM_STATE = "transform_state.safetensors"
ADAPTER_CONFIG = "adapter_config.json"  # a fine-tuning run's adapter (lmforge.adapters)
QUANT_CONFIG = "quant_config.json"  # a quantized checkpoint (lmforge.compress, `lmforge quantize`)
# a converted model's chat template (`lmforge.tokenizer.chat.read_hf_chat_template`) travels with its tokenizer.json
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def tied_aliases(model: nn.Module) -> set[str]:
    """Parameter names that are a second name for a tensor already listed (e.g. a tied lm_head)."""
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return every - {name for name, _ in model.named_parameters()}


def save_checkpoint(path: Path, model_state: dict[str, torch.Tensor], model_config: dict[str, Any],
                    tokenizer_file: Path | None, trainer_state: dict[str, Any] | None,
                    drop: set[str] = frozenset(), base_keys: set[str] | None = None,
                    write_files: Callable[[Path], None] | None = None) -> Path:
    """Write a checkpoint directory atomically (a temp dir renamed into place).

    base_keys: the plain model's tensor names; others (added by model transforms) go to
    `transform_state.safetensors`. None: every tensor goes to `model.safetensors`.
    The tokenizer's chat-template files beside `tokenizer_file` (`TOKENIZER_SIDE_FILES`) are
    copied too. write_files(dir): writes more files into the checkpoint before it is renamed
    into place (an adapter run's `adapter_config.json`).
    """
    with atomic_dir(path) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items() if k not in drop}
        extra = {k: tensors.pop(k) for k in list(tensors) if base_keys is not None and k not in base_keys}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if extra:
            save_file(extra, str(tmp / TRANSFORM_STATE), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", model_config)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
            for name in TOKENIZER_SIDE_FILES:
                if (Path(tokenizer_file).parent / name).is_file():
                    shutil.copyfile(Path(tokenizer_file).parent / name, tmp / name)
        if write_files is not None:
            write_files(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer_state.pt")
    return path


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    ckpts = []
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            m = STEP_DIR.match(p.name)
            if m and (p / "model.safetensors").exists():
                ckpts.append((int(m.group(1)), p))
    return sorted(ckpts)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = step_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    for _, path in step_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir (-> its best checkpoint, else the latest step checkpoint)."""
    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; pass a run dir (runs/NAME) or a checkpoint dir")
    best = path / "checkpoints" / "best"
    if (best / "model.safetensors").exists():
        return best
    latest = latest_checkpoint(path)
    if latest is None:
        raise UserError(f"{path}: no model.safetensors and no checkpoints/ inside; is this a run or checkpoint dir?")
    return latest


def read_model_config(ckpt: Path) -> dict[str, Any]:
    file = ckpt / "config.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(f"{file} is missing; the checkpoint is incomplete") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: invalid JSON ({e.msg} at line {e.lineno}); the checkpoint is corrupt") from None


def read_weights(ckpt: Path, *, transform_state: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's model tensors; with `transform_state`, also those model transforms added."""
    state = _read_tensors(ckpt / "model.safetensors")
    if transform_state and (ckpt / TRANSFORM_STATE).exists():
        state.update(_read_tensors(ckpt / TRANSFORM_STATE))
    return state


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.exists():
        raise UserError(f"{file} is missing; the checkpoint is incomplete")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{file} is truncated or corrupt ({str(e).splitlines()[0]}); use another checkpoint") from None


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], source: Path,
                      allow_missing: Collection[str] = ()) -> None:
    """Load `state` into `model`, allowing only tied aliases (and `allow_missing`: heads the run
    adds, `Objective.new_heads`) to be absent; errors name the tensor."""
    expected = dict(model.state_dict())
    for key, value in state.items():
        if key not in expected:
            raise UserError(f"{source}: unexpected tensor {key!r}; the checkpoint is for another model config "
                            "(or was saved with model transforms this run does not apply)")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise UserError(
                f"{source}: tensor {key!r} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(expected[key].shape)}; the checkpoint's config.json does not match its weights"
            )
    missing = set(expected) - set(state) - tied_aliases(model) - set(allow_missing)
    if missing:
        raise UserError(f"{source}: missing tensor {sorted(missing)[0]!r}; the checkpoint is incomplete "
                        "(or this run applies model transforms it was saved without)")
    model.load_state_dict(state, strict=False)


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    file = ckpt / "trainer_state.pt"
    if not file.exists():
        raise UserError(f"{file} is missing; cannot resume from {ckpt} (it holds weights only)")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise UserError(f"{file} is truncated or corrupt ({type(e).__name__}); "
                        "resume from another checkpoint") from None


def load_pretrained(path: str | Path, device: str | torch.device = "cpu"):
    """Load a checkpoint (or a run dir's best checkpoint) for inference: `(model, tokenizer)`.

    A fine-tuning run's checkpoint (`adapter_config.json` beside the weights) comes back with its
    adapter re-applied (`lmforge.adapters.apply_saved_adapter`): LoRA, QLoRA, prefix or prompt.
    A quantized checkpoint (`quant_config.json`) comes back with its quantized Linears (or fp16/bf16
    parameters): `lmforge.compress.apply_saved_quant` swaps them in before its tensors are loaded."""
    from lmforge.models import build_model
    from lmforge.models.config import ModelConfig
    from lmforge.tokenizer import Tokenizer

    path = resolve_checkpoint(path)
    model_cfg = ModelConfig.from_dict(read_model_config(path))
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.exists():
        raise UserError(f"{tokenizer_file} is missing; the checkpoint is incomplete")
    tokenizer = Tokenizer.load(tokenizer_file)
    if model_cfg.vocab_size is None or tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(
            f"{tokenizer_file} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model_cfg.vocab_size} ({path}/config.json); use the tokenizer the model was trained with"
        )
    model = build_model(model_cfg)
    if (path / QUANT_CONFIG).is_file():
        from lmforge.compress.quantize import apply_saved_quant

        model = apply_saved_quant(model, path)
    load_weights_into(model, read_weights(path), path)
    if (path / ADAPTER_CONFIG).is_file():  # a fine-tuning run's checkpoint: its adapter on top of the base layout
        from lmforge.adapters import apply_saved_adapter

        model = apply_saved_adapter(model, path)
    return model.to(device).eval(), tokenizer
