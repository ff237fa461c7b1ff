"""Training setup as a pipeline of small steps: what exists before the first training step.

## Training loop seams

`setup_training(cfg, out, info, ...)` runs these steps in order, each a short public function
(here, or in `lmforge.train.init_from` and `lmforge.train.fit`), and returns a `TrainSetup`
(everything a loop needs):

1. **run dir** (`prepare_run_dir`): `--resume` finds the latest checkpoint; an existing run
   needs `--overwrite` (which clears it) or another `--out`.
2. **tokenizer** (`run_tokenizer`): the tokens dir's tokenizer plus the special tokens the
   objective needs; the run keeps its own `tokenizer.json` when tokens were added. Without a
   tokens dir (post-training: the objective reads a JSONL file, `data.file`), the tokenizer of
   the checkpoint the weights come from (`tokenizer_dir_of`).
3. **model config** (`resolve_model_config`): the recipe's model, `vocab_size` from the
   tokenizer (or from the `--init-from` checkpoint), then `lmforge.train.init_from`'s checks
   (`check_init_tokenizer`, `check_init_matches`: the recipe's model must be the checkpoint's;
   a difference is one error naming the keys, a tensor and both shapes; the objective's
   `new_heads` and the keys its `configure_model` changes are allowed to differ).
4. **fit check** (`lmforge.train.fit.check_fits`): `lmforge plan`'s memory model predicts the step's peak; a run
   that cannot fit in the memory available is refused before anything is allocated (`--force`
   overrides), and a step predicted to take over a minute is warned about.
5. **build** (`build`): the plain `nn.Module`, seeded identically on every rank.
6. **init_from** (`load_init_weights`): a checkpoint's weights (lmforge's own, or a
   `convert from-hf` output), fresh optimizer, step 0.
7. **model transforms** (`lmforge.train.transforms.apply_transforms`): module swaps from
   outside (LoRA, QLoRA, prefix tuning, quantization) that keep the tensor names.
8. **resume** (`restore_weights`): the run's own checkpoint (weights and transform state).
9. **parallelize** (`distributed.parallelize`): compile, DDP or FSDP2 around the plain model.
10. **optimizer** (`make_optimizer`): AdamW over the trainable parameters, the fp16 scaler.
11. **RNG and optimizer restore** (`restore_training_state`): exact resume.

An objective receives extra models (DPO's reference, a reward model) through `models=`: they
are passed to `objective_for` and kept on the setup; they are not trained or checkpointed.

A second loop (rollout-based RL such as PPO, issue 12) calls `setup_training` as `pretrain`
does and reuses the loop's parts from `lmforge.train.steps`: `StopFlag` (Ctrl-C: save and stop
after the step; a second signal stops at once), `set_lr` / `clip_gradients` / `check_finite` /
`apply_gradients` (one optimizer step with the grad scaler, clipping and the non-finite stop),
`MetricsLog` (`metrics.jsonl`), `Checkpointer` (step checkpoints, `best`, pruning; resumable
by step 8 above), `update_best` and `progress_bar`, and ends with
`lmforge.train.report.write_run_report`. What differs is only its step: rollouts from the
generation engine, rewards, the PPO loss, instead of `objective.batch_for` and `objective.loss`.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.config import Config, to_dict
from lmforge.errors import UserError
from lmforge.models import build_model
from lmforge.models.config import ModelConfig
from lmforge.tokenizer import Tokenizer
from lmforge.train import checkpoint as ckpt
from lmforge.train import distributed as dist
from lmforge.train.device import peak_flops, resolve_device, resolve_precision
from lmforge.train.fit import check_fits
from lmforge.train.init_from import (
    check_init_matches,
    check_init_tokenizer,
    init_checkpoint,
    load_init_weights,
    objective_changes,
)
from lmforge.train.objectives import (
    OBJECTIVES,
    Objective,
    objective_for,
    padded_vocab,
    token_fallbacks,
    with_tokens,
)
from lmforge.train.objectives.base import TOKENS_UNSET
from lmforge.train.optim import build_optimizer
from lmforge.train.transforms import Transform, apply_transforms


@dataclass
class TrainSetup:
    """Everything a training loop starts from (`setup_training`)."""

    cfg: Config
    out: Path
    info: dist.DistInfo
    tokens_dir: Path  # the run's data as reports name it: the tokens dir, or the post-training data.file
    tokenizer: Tokenizer
    tokenizer_file: Path  # the tokenizer.json the checkpoints carry
    model_cfg: ModelConfig
    objective: Objective
    device: torch.device
    precision: str
    train_batches: Any
    val_batches: Any
    raw_model: nn.Module  # the plain model (after transforms)
    model: nn.Module  # what to train with (compiled, DDP- or FSDP-wrapped)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    state: dict[str, Any]  # step, best_val_loss, best_step, bad_evals, tokens_seen
    base_keys: set[str]  # the plain model's tensor names, before transforms
    peak: float  # peak FLOP/s of all processes together (MFU's denominator)
    tokens_per_step: int  # positions per optimizer step, all processes (a loop may set its own)
    flops_per_token: float  # training FLOPs per position (the objective's count; MFU's numerator)
    resume_from: Path | None = None
    init_from: Path | None = None
    models: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"


def fresh_state() -> dict[str, Any]:
    return {"step": 0, "best_val_loss": math.inf, "best_step": None, "bad_evals": 0, "tokens_seen": 0}


# ---- 1. run dir ------------------------------------------------------------------------------


RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "summary.json", "report.md", "loss.png")


def prepare_run_dir(out: Path, info: dist.DistInfo, *, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (None: a new run); clears an existing run on `overwrite`."""
    if resume:
        latest = ckpt.latest_checkpoint(out)
        if latest is None:
            raise UserError(f"--resume: no checkpoint in {out}/checkpoints; start without --resume")
        return latest
    if ckpt.step_checkpoints(out) or (out / "metrics.jsonl").exists():
        if not overwrite:
            raise UserError(f"{out} already holds a run; use --resume to continue it, --overwrite to replace it, "
                            "or another --out")
        dist.barrier(info)
        if info.is_main:
            for name in RUN_OUTPUTS:
                p = out / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        dist.barrier(info)
    return None


# ---- 2. tokenizer ----------------------------------------------------------------------------


def tokens_dir_of(cfg: Config) -> Path:
    if not cfg.data.tokens:
        raise UserError(TOKENS_UNSET)
    return Path(cfg.data.tokens)


def tokenizer_dir_of(cfg: Config, weights_from: Path | None) -> tuple[Path | None, Path]:
    """(the tokens dir or None, the dir whose tokenizer.json the run uses): data.tokens', else
    the checkpoint's the weights come from (post-training reads a JSONL file, `data.file`, and
    tokenizes it with the base model's own tokenizer)."""
    if cfg.data.tokens:
        return Path(cfg.data.tokens), Path(cfg.data.tokens)
    if weights_from is None:
        raise UserError(TOKENS_UNSET + ", or start from a checkpoint (--init-from DIR), whose tokenizer it then uses")
    if not (weights_from / "tokenizer.json").is_file():
        raise UserError(f"{weights_from} has no tokenizer.json; set data.tokens, or use a checkpoint that carries "
                        "its tokenizer")
    return None, weights_from


def run_tokenizer(cfg: Config, tokens_dir: Path) -> tuple[Tokenizer, bool]:
    """The tokenizer of `tokens_dir` (a tokens dir, or a checkpoint dir) plus the special tokens
    the objective needs (appended ids).

    Returns it and whether tokens were added (the run then keeps its own tokenizer.json).
    """
    tokenizer = Tokenizer.load(tokens_dir / "tokenizer.json")
    added = with_tokens(tokenizer, OBJECTIVES[cfg.objective].extra_tokens, token_fallbacks())
    return tokenizer, added


def save_run_tokenizer(tokenizer: Tokenizer, added: bool, tokens_dir: Path, out: Path, info: dist.DistInfo,
                       *, own_copy: bool = False) -> Path:
    """The tokenizer.json checkpoints carry: the tokens dir's, or the run's own with the added tokens.

    own_copy: the run keeps its own copy even without added tokens (a tokenizer taken from a
    checkpoint, which a resumed run's pruning may delete), with its chat-template files."""
    if not added and not own_copy:
        return tokens_dir / "tokenizer.json"
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if added:
            tokenizer.save(out)
        elif (tokens_dir / "tokenizer.json").resolve() != (out / "tokenizer.json").resolve():
            shutil.copyfile(tokens_dir / "tokenizer.json", out / "tokenizer.json")
        for name in ckpt.TOKENIZER_SIDE_FILES:
            if (tokens_dir / name).is_file() and (tokens_dir / name).resolve() != (out / name).resolve():
                shutil.copyfile(tokens_dir / name, out / name)
    return out / "tokenizer.json"


# ---- 3. model config --------------------------------------------------


def resolve_model_config(cfg: Config, tokenizer: Tokenizer, init: dict[str, Any] | None = None) -> ModelConfig:
    """The model config with `vocab_size` filled from (and checked against) the tokenizer.

    init: the config.json of the checkpoint the weights come from (`--init-from`, or the one
    resumed from): an unset vocab_size and hf_model_type are taken from it.
    """
    vocab = tokenizer.vocab_size
    model_cfg = ModelConfig.from_dict(to_dict(cfg.model))
    if model_cfg.vocab_size is None:
        model_cfg.vocab_size = (init or {}).get("vocab_size") or padded_vocab(vocab)
    elif model_cfg.vocab_size < vocab:
        raise UserError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {vocab} tokens "
            f"({tokenizer.source}); remove model.vocab_size or set it >= {vocab}"
        )
    if model_cfg.vocab_size < vocab:  # from the checkpoint
        raise UserError(f"the checkpoint's vocab_size {model_cfg.vocab_size} is smaller than the "
                        f"tokenizer's {vocab} tokens ({tokenizer.source}); tokenize with the checkpoint's tokenizer")
    if init and model_cfg.hf_model_type is None:
        model_cfg.hf_model_type = init.get("hf_model_type")
    OBJECTIVES[cfg.objective].configure_model(cfg, model_cfg)
    if model_cfg.arch == "encdec":  # the decoder starts from the tokenizer's pad token, as T5's does
        for key in ("decoder_start_token_id", "pad_token_id"):
            if getattr(model_cfg, key) is None:
                setattr(model_cfg, key, tokenizer.pad_id)
    return model_cfg


def tokenizer_and_model(cfg: Config, tokenizer_dir: Path, tokens_dir: Path | None, init: Path | None,
                        resume_from: Path | None) -> tuple[Tokenizer, bool, ModelConfig]:
    """Steps 2-3: the run's tokenizer (and whether tokens were added) and its model config,
    checked against the `--init-from` checkpoint."""
    tokenizer, added = run_tokenizer(cfg, tokenizer_dir)
    if init and tokens_dir is not None:
        check_init_tokenizer(init, tokenizer, tokens_dir)
    # an unset vocab_size / hf_model_type comes from the checkpoint the weights come from
    weights_from = resume_from or init
    model_cfg = resolve_model_config(cfg, tokenizer, ckpt.read_model_config(weights_from) if weights_from else None)
    if init:
        init_cfg = ckpt.read_model_config(init)
        check_init_matches(model_cfg, init, init_cfg, OBJECTIVES[cfg.objective].new_heads,
                           objective_changes(cfg, init_cfg))
    return tokenizer, added, model_cfg


def data_of(cfg: Config, tokens_dir: Path | None) -> Path:
    """The run's data as reports name it: the tokens dir, else the post-training data file."""
    if tokens_dir is not None:
        return tokens_dir
    return Path(cfg.data.file or cfg.data.pairs or ".")


# ---- 5., 8. build, resume ------------------------------------------------


def build(model_cfg: ModelConfig, device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # identical init on every rank
    return build_model(model_cfg).to(device)


def check_same_model(saved: dict, current: ModelConfig, source: Path) -> None:
    now = current.to_dict()
    for key, value in now.items():
        if key in saved and saved[key] != value:
            raise UserError(
                f"--resume: model.{key} is {value!r} but the checkpoint {source} has {saved[key]!r}; "
                f"resume with the same model config or start a new --out"
            )


def restore_weights(model: nn.Module, resume_from: Path, model_cfg: ModelConfig, state: dict[str, Any]) -> dict:
    """The run's own checkpoint (weights and transform state) into the model; returns its trainer state."""
    check_same_model(ckpt.read_model_config(resume_from), model_cfg, resume_from)
    ckpt.load_weights_into(model, ckpt.read_weights(resume_from, transform_state=True), resume_from)
    trainer_state = ckpt.read_trainer_state(resume_from)
    for key in state:
        state[key] = trainer_state.get(key, state[key])
    return trainer_state


# ---- 10.-11. optimizer, restore ----------------------------------------------------------------


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device,
                   precision: str) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler | None]:
    t = cfg.train
    optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), device.type)
    return optimizer, (torch.amp.GradScaler("cuda") if precision == "fp16" else None)


def restore_training_state(s: TrainSetup, trainer_state: dict[str, Any] | None) -> None:
    """Per-rank RNG streams; on resume, the optimizer, RNG and grad-scaler states."""
    torch.manual_seed(s.cfg.train.seed + s.info.rank)  # dropout masks differ per rank
    if trainer_state is None:
        return
    dist.load_full_optimizer_state(s.model, s.optimizer, trainer_state["optimizer"])
    rng = trainer_state.get("rng", {})
    if len(rng.get("torch", [])) == s.info.world_size:  # same world size: continue each rank's stream
        torch.set_rng_state(rng["torch"][s.info.rank])
        if s.device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state(rng["cuda"][s.info.rank], s.device)
    if s.scaler is not None and "scaler" in trainer_state:
        s.scaler.load_state_dict(trainer_state["scaler"])


# ---- the pipeline ------------------------------------------------------------------------------


def setup_training(cfg: Config, out: str | Path, info: dist.DistInfo, *, resume: bool = False,
                   overwrite: bool = False, init_from: str | Path | None = None,
                   transforms: tuple[str | Transform, ...] | list[str | Transform] = (), force: bool = False,
                   models: dict[str, nn.Module] | None = None) -> TrainSetup:
    """Run the setup steps (see the module docstring) and return what the loop starts from.

    init_from: a checkpoint to start from (ignored on resume: the run's own checkpoint wins).
    """
    out, t = Path(out), cfg.train
    if not (cfg.data.tokens or init_from or resume):
        raise UserError(TOKENS_UNSET)  # said before anything else
    resume_from = prepare_run_dir(out, info, resume=resume, overwrite=overwrite)
    init = None if resume_from else init_checkpoint(init_from)
    tokens_dir, tokenizer_dir = tokenizer_dir_of(cfg, resume_from or init)
    tokenizer, added, model_cfg = tokenizer_and_model(cfg, tokenizer_dir, tokens_dir, init, resume_from)
    objective = objective_for(cfg, tokenizer, model_cfg, models)
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device, info.local_rank)
    precision = resolve_precision(t.precision, device, model_cfg.n_embd)
    device_peak = dist.broadcast_object(peak_flops(device, precision) if info.is_main else 0.0, info)
    check_fits(cfg, model_cfg, device, precision, info, device_peak, force=force)
    train_batches, val_batches = objective.source(tokens_dir, "train"), objective.source(tokens_dir, "val")
    tokenizer_file = save_run_tokenizer(tokenizer, added, tokenizer_dir, out, info, own_copy=tokens_dir is None)

    raw_model = build(model_cfg, device, t.seed)
    if init:
        load_init_weights(raw_model, init, objective.new_heads)
    base_keys = set(raw_model.state_dict())
    raw_model = apply_transforms(raw_model, transforms)
    state = fresh_state()
    trainer_state = restore_weights(raw_model, resume_from, model_cfg, state) if resume_from else None
    model = dist.parallelize(raw_model, info, device, compile=t.compile, precision=precision,
                             all_parameters_used=objective.uses_all_parameters)
    optimizer, scaler = make_optimizer(model, cfg, device, precision)
    s = TrainSetup(cfg=cfg, out=out, info=info, tokens_dir=data_of(cfg, tokens_dir), tokenizer=tokenizer,
                   tokenizer_file=tokenizer_file, model_cfg=model_cfg, objective=objective, device=device,
                   precision=precision, train_batches=train_batches, val_batches=val_batches,
                   raw_model=raw_model, model=model, optimizer=optimizer, scaler=scaler, state=state,
                   base_keys=base_keys, peak=device_peak * info.world_size,
                   tokens_per_step=t.batch_size * t.grad_accum * info.world_size * model_cfg.block_size,
                   flops_per_token=objective.flops_per_token(raw_model), resume_from=resume_from,
                   init_from=init, models=dict(models or {}))
    restore_training_state(s, trainer_state)
    return s
