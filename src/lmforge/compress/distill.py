"""`lmforge distill --teacher DIR CONFIG`: a smaller student trained on the pretraining loop
against a frozen teacher's soft targets (`objective: distill`, `lmforge.train.objectives.distill`).

CONFIG is a pretraining recipe for the student (any preset); the command sets `objective:
distill` and `distill.teacher`. Without `data.tokens`, the student trains on the token dir the
teacher was trained on (what its run recorded, `lmforge.compress.heldout.token_dir_of`). Before
anything is written the teacher is checked: a checkpoint (or run dir) with config.json and
tokenizer.json, a causal LM with at least the student's context, the same tokenizer as the
student's data (`check_same_tokenizer`), and the same width when hidden states are matched.

Each process loads its own replica of the teacher on its device, in the run's compute dtype
(bf16/fp16 weights when the run trains in bf16/fp16), frozen and in eval mode; the training loop
(`lmforge.train.loop.Trainer`: checkpoints, Ctrl-C, exact `--resume`, DDP/FSDP of the student)
is pretrain's. The run dir is a normal run (checkpoints/best loads everywhere) whose
summary.json has stage `distill`, the teacher among its inputs, and the last step's `kd_loss`
and `ce_loss` in its metrics.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import UserError
from lmforge.fsutil import atomic_write_text, tree_sha256, write_summary
from lmforge.train import checkpoint as ckpt

PARTS = ("kd_loss", "ce_loss", "hidden_loss")  # the objective's per-step numbers (metrics.jsonl)


def resolve_teacher(path: str | Path) -> Path:
    """The teacher's checkpoint dir (a run dir -> its best checkpoint), with config.json and tokenizer.json."""
    if not path:
        raise UserError("distillation needs a teacher: --teacher DIR (a checkpoint or run dir)")
    try:
        teacher = ckpt.resolve_checkpoint(path)
    except UserError as e:
        raise UserError(f"--teacher {path}: {e}") from None
    for name in ("config.json", "tokenizer.json"):
        if not (teacher / name).is_file():
            raise UserError(f"--teacher {path}: {teacher / name} is missing; a teacher is a checkpoint dir with "
                            "model.safetensors, config.json and tokenizer.json")
    return teacher


def student_tokens(cfg: Any, teacher: Path) -> Path:
    """The student's token dir: data.tokens, else the one the teacher's run recorded."""
    if cfg.data.tokens:
        return Path(cfg.data.tokens)
    from lmforge.compress.heldout import token_dir_of

    found = token_dir_of(teacher)
    if found is None:
        raise UserError(f"data.tokens is not set and the teacher {teacher} records no token dir it was trained on; "
                        "pass --set data.tokens=DIR (a dir from `lmforge tokenize` with the teacher's tokenizer)")
    return found


def check_same_tokenizer(teacher: Path, tokens: Path) -> None:
    """The teacher's tokenizer must be the student's data tokenizer: the same token for every id."""
    from lmforge.tokenizer import Tokenizer

    theirs = Tokenizer.load(teacher / "tokenizer.json").backend.get_vocab(with_added_tokens=True)
    ours = Tokenizer.load(tokens / "tokenizer.json").backend.get_vocab(with_added_tokens=True)
    if theirs == ours:
        return
    differ = sorted(set(theirs.items()) ^ set(ours.items()), key=lambda item: item[1])
    token, index = differ[0]
    raise UserError(f"--teacher {teacher}: its tokenizer ({len(theirs)} tokens) is not the student's data tokenizer "
                    f"({tokens}/tokenizer.json, {len(ours)} tokens; they differ at id {index}, {token!r}); "
                    "tokenize the student's data with the teacher's tokenizer")


def load_teacher(teacher: Path, device: torch.device, precision: str) -> nn.Module:
    """The teacher on `device`, frozen, in eval mode; in bf16/fp16 when the run computes in it."""
    model, _ = ckpt.load_pretrained(teacher, device)
    if precision in ("bf16", "fp16") and not (teacher / "quant_config.json").is_file():
        model = model.to(torch.bfloat16 if precision == "bf16" else torch.float16)
    return model.requires_grad_(False).eval()


def distill(cfg: Any, out: str | Path, *, teacher: str | Path | None = None, resume: bool = False,
            overwrite: bool = False, force: bool = False,
            on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train the student `cfg` (objective distill) against `teacher` (default cfg.distill.teacher)
    into the run dir `out`; returns its summary.json."""
    from lmforge.train import distributed as dist
    from lmforge.train.device import resolve_device, resolve_precision
    from lmforge.train.loop import Trainer
    from lmforge.train.objectives.distill import check_teacher
    from lmforge.train.setup import setup_training

    cfg = copy.deepcopy(cfg)
    cfg.objective = "distill"
    teacher_dir = resolve_teacher(teacher or cfg.distill.teacher)
    cfg.distill.teacher = str(teacher or cfg.distill.teacher)
    cfg.data.tokens = str(student_tokens(cfg, teacher_dir))
    check_same_tokenizer(teacher_dir, Path(cfg.data.tokens))
    check_teacher(ckpt.read_model_config(teacher_dir), cfg.model, cfg.distill, f"--teacher {teacher_dir}")
    info = dist.init_distributed(cfg.train.parallel, cfg.train.device)
    try:
        device = resolve_device(cfg.train.device, info.local_rank)
        model = load_teacher(teacher_dir, device, resolve_precision(cfg.train.precision, device, cfg.model.n_embd))
        setup = setup_training(cfg, Path(out), info, resume=resume, overwrite=overwrite,
                               init_from=cfg.train.init_from or None, force=force, models={"teacher": model})
        if info.is_main:
            print(f"teacher: {teacher_dir} ({model.num_params() / 1e6:.2f}M parameters), temperature "
                  f"{cfg.distill.temperature}, alpha {cfg.distill.alpha}, hidden_weight {cfg.distill.hidden_weight}",
                  flush=True)
        trainer = Trainer(setup, desc="distill", on_report=lambda summary: finish(summary, setup, teacher_dir, model))
        try:
            return trainer.run(on_step)
        finally:
            trainer.close()
    finally:
        dist.shutdown()


def finish(summary: dict[str, Any], setup: Any, teacher: Path, model: nn.Module) -> dict[str, Any]:
    """summary.json with stage `distill` (the teacher among the inputs, the last step's loss parts
    in the metrics) and report.md's distillation section."""
    from lmforge.train.report import read_metrics

    records = read_metrics(setup.metrics_path)
    last = next((r for r in reversed(records) if "kd_loss" in r), {})
    opts = setup.cfg.distill
    metrics = {**summary["metrics"], **{f"final_{k}": last[k] for k in PARTS if k in last},
               "teacher_params": model.num_params(), "temperature": opts.temperature, "alpha": opts.alpha,
               "hidden_weight": opts.hidden_weight}
    inputs = {**summary.get("inputs", {}), "teacher": {"path": str(teacher), "sha256": tree_sha256(teacher)}}
    extra = {k: summary[k] for k in ("model_config", "sample") if k in summary}
    new = write_summary(setup.out, "distill", config=summary.get("config"), metrics=metrics,
                        wall_time_s=summary.get("wall_time_s"), extra={"inputs": inputs, **extra})
    report = setup.out / "report.md"
    text = report.read_text() if report.exists() else ""
    text = text.replace("# Pretraining report:", "# Distillation report:", 1)
    parts = ", ".join(f"{k} {last[k]:.4f}" for k in PARTS if k in last)
    lines = ["", "## Distillation", "",
             f"- teacher: `{teacher}` ({metrics['teacher_params']:,} parameters); student "
             f"{summary['metrics'].get('params', 0):,} parameters",
             f"- loss: alpha {opts.alpha} * T^2 * KL(teacher_T || student_T) + {1 - opts.alpha:g} * CE, "
             f"T = {opts.temperature}" + (f", + {opts.hidden_weight} * hidden MSE" if opts.hidden_weight else ""),
             f"- last step: {parts or 'n/a'}; the val loss is the student's plain cross-entropy"]
    atomic_write_text(report, text.rstrip("\n") + "\n" + "\n".join(lines) + "\n")
    return new


def describe(summary: dict[str, Any], out: str | Path) -> str:
    """The command's closing line."""
    m = summary.get("metrics", {})

    def fmt(x: Any) -> str:
        return f"{x:.4f}" if isinstance(x, (int, float)) else str(x)

    return (f"done: distilled {m.get('steps')} steps, final val loss {fmt(m.get('final_val_loss'))}, best "
            f"{fmt(m.get('best_val_loss'))} (step {m.get('best_step')}), last kd_loss {fmt(m.get('final_kd_loss'))}, "
            f"ce_loss {fmt(m.get('final_ce_loss'))}; model: {Path(out) / 'checkpoints' / 'best'}")
