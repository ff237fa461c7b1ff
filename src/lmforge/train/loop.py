"""The one training loop: `pretrain(cfg, out)`.

It owns what every objective needs once: batches, gradient accumulation, clipping, precision,
the learning-rate schedule, logging (`metrics.jsonl`), evaluation, early stopping, checkpoints,
Ctrl-C handling and exact resume. Parallelism (DDP/FSDP2) and compilation are applied to the
plain model from outside (`lmforge.train.distributed`).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lmforge.config import Config, dump_yaml, to_dict
from lmforge.diagnose import live_warning
from lmforge.errors import Interrupted, TrainingFailed, UserError
from lmforge.fsutil import atomic_write_text
from lmforge.models import build_model
from lmforge.models.config import ModelConfig
from lmforge.models.moe import utilization_summary
from lmforge.tokenizer import Tokenizer
from lmforge.train import checkpoint as ckpt
from lmforge.train import distributed as dist
from lmforge.train.batches import TokenBatches
from lmforge.train.device import autocast, peak_flops, resolve_device, resolve_precision
from lmforge.train.objectives import (
    OBJECTIVES,
    objective_for,
    padded_vocab,
    token_fallbacks,
    with_tokens,
)
from lmforge.train.optim import build_optimizer, lr_at
from lmforge.train.report import write_run_report


class _StopFlag:
    """Turns SIGINT/SIGTERM into a request to save and stop after the current step.

    A second Ctrl-C aborts at once (KeyboardInterrupt) for users who really mean it.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_tokenizer(cfg: Config, tokens_dir: Path) -> tuple[Tokenizer, bool]:
    """The tokens dir's tokenizer plus the special tokens the objective needs (appended ids).

    Returns it and whether tokens were added (the run then keeps its own tokenizer.json).
    """
    tokenizer = Tokenizer.load(tokens_dir / "tokenizer.json")
    added = with_tokens(tokenizer, OBJECTIVES[cfg.objective].extra_tokens, token_fallbacks())
    return tokenizer, added


def resolve_model_config(cfg: Config, tokenizer: Tokenizer) -> ModelConfig:
    """The model config with `vocab_size` filled from (and checked against) the tokenizer."""
    vocab = tokenizer.vocab_size
    model_cfg = ModelConfig.from_dict(to_dict(cfg.model))
    if model_cfg.vocab_size is None:
        model_cfg.vocab_size = padded_vocab(vocab)
    elif model_cfg.vocab_size < vocab:
        raise UserError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {vocab} tokens "
            f"({tokenizer.source}); remove model.vocab_size or set it >= {vocab}"
        )
    OBJECTIVES[cfg.objective].configure_model(cfg, model_cfg)
    if model_cfg.arch == "encdec":  # the decoder starts from the tokenizer's pad token, as T5's does
        for key in ("decoder_start_token_id", "pad_token_id"):
            if getattr(model_cfg, key) is None:
                setattr(model_cfg, key, tokenizer.pad_id)
    return model_cfg


def _check_same_model(saved: dict, current: ModelConfig, source: Path) -> None:
    now = current.to_dict()
    for key, value in now.items():
        if key in saved and saved[key] != value:
            raise UserError(
                f"--resume: model.{key} is {value!r} but the checkpoint {source} has {saved[key]!r}; "
                f"resume with the same model config or start a new --out"
            )


def pretrain(cfg: Config, out: str | Path, *, resume: bool = False, overwrite: bool = False,
             on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train `cfg.model` on `cfg.data.tokens`, writing checkpoints, metrics and a report to `out`."""
    info = dist.init_distributed(cfg.train.parallel, cfg.train.device)
    try:
        return _Trainer(cfg, Path(out), info, resume=resume, overwrite=overwrite).run(on_step)
    finally:
        dist.shutdown()


class _Trainer:
    def __init__(self, cfg: Config, out: Path, info: dist.DistInfo, *, resume: bool, overwrite: bool):
        self.cfg, self.out, self.info = cfg, out, info
        t = cfg.train
        if not cfg.data.tokens:
            raise UserError("data.tokens is not set; point it at a dir from `lmforge tokenize` (--set data.tokens=DIR)")
        self.tokens_dir = Path(cfg.data.tokens)
        self.tokenizer_file = self.tokens_dir / "tokenizer.json"
        tokenizer, added_tokens = run_tokenizer(cfg, self.tokens_dir)
        self.model_cfg = resolve_model_config(cfg, tokenizer)
        self.objective = objective_for(cfg, tokenizer, self.model_cfg)
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = resolve_device(t.device, info.local_rank)
        self.precision = resolve_precision(t.precision, self.device, self.model_cfg.n_embd)

        self.resume_from = None
        if resume:
            self.resume_from = ckpt.latest_checkpoint(out)
            if self.resume_from is None:
                raise UserError(f"--resume: no checkpoint in {out}/checkpoints; start without --resume")
        elif ckpt.step_checkpoints(out) or (out / "metrics.jsonl").exists():
            if not overwrite:
                raise UserError(f"{out} already holds a run; use --resume to continue it, --overwrite to replace it, or another --out")
            dist.barrier(info)
            if info.is_main:
                for name in ("checkpoints", "metrics.jsonl", "summary.json", "report.md", "loss.png"):
                    p = out / name
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            dist.barrier(info)

        self.train_batches = self.objective.source(self.tokens_dir, "train")
        self.val_batches = self.objective.source(self.tokens_dir, "val")
        if added_tokens:  # the checkpoints carry the tokenizer with the objective's tokens
            self.tokenizer_file = out / "tokenizer.json"
            if info.is_main:
                out.mkdir(parents=True, exist_ok=True)
                tokenizer.save(out)

        torch.manual_seed(t.seed)  # identical init on every rank
        self.raw_model = build_model(self.model_cfg).to(self.device)
        self.state: dict[str, Any] = {"step": 0, "best_val_loss": math.inf, "best_step": None,
                                      "bad_evals": 0, "tokens_seen": 0}
        trainer_state = None
        if self.resume_from is not None:
            _check_same_model(ckpt.read_model_config(self.resume_from), self.model_cfg, self.resume_from)
            ckpt.load_weights_into(self.raw_model, ckpt.read_weights(self.resume_from), self.resume_from)
            trainer_state = ckpt.read_trainer_state(self.resume_from)
            for key in self.state:
                self.state[key] = trainer_state.get(key, self.state[key])
        self.model = dist.parallelize(self.raw_model, info, self.device, compile=t.compile, precision=self.precision,
                                      all_parameters_used=self.objective.uses_all_parameters)
        self.optimizer = build_optimizer(self.model, t.lr, t.weight_decay, (t.beta1, t.beta2), self.device.type)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        torch.manual_seed(t.seed + info.rank)  # dropout masks differ per rank
        if trainer_state is not None:
            dist.load_full_optimizer_state(self.model, self.optimizer, trainer_state["optimizer"])
            rng = trainer_state.get("rng", {})
            if len(rng.get("torch", [])) == info.world_size:  # same world size: continue each rank's stream
                torch.set_rng_state(rng["torch"][info.rank])
                if self.device.type == "cuda" and rng.get("cuda"):
                    torch.cuda.set_rng_state(rng["cuda"][info.rank], self.device)
            if self.scaler is not None and "scaler" in trainer_state:
                self.scaler.load_state_dict(trainer_state["scaler"])

        self.tokens_per_step = t.batch_size * t.grad_accum * info.world_size * self.model_cfg.block_size
        self.flops_per_token = self.objective.flops_per_token(self.raw_model)
        peak = peak_flops(self.device, self.precision) if info.is_main else 0.0
        self.peak = dist.broadcast_object(peak, info) * info.world_size
        self.metrics_path = out / "metrics.jsonl"

    # ---- logging ---------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        if self.info.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _trim_metrics(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint we resume from (they will be redone)."""
        if not self.info.is_main or not self.metrics_path.exists():
            return
        keep = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in keep))

    def _moe_record(self) -> dict[str, Any]:
        """moe_util (per expert, the fraction of top-k assignments), moe_dropped, moe_aux_loss,
        moe_z_loss of the last training forward; {} for models without experts."""
        stats = self.raw_model.moe_stats() if hasattr(self.raw_model, "moe_stats") else None
        if stats is None:
            return {}
        return {"moe_util": [round(u, 4) for u in stats["util"]], "moe_dropped": round(stats["dropped"], 5),
                "moe_aux_loss": round(stats["aux_loss"], 5), "moe_z_loss": round(stats["z_loss"], 5)}

    # ---- one step, eval ------------------------------------------------------------------

    def _sync_context(self, last_micro: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
        if not self.info.enabled or last_micro:
            return contextlib.nullcontext()
        if self.info.parallel == "ddp":
            return self.model.no_sync()
        self.model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()

    def _train_step(self, step: int, stop_requested: bool) -> tuple[float, float, float, bool]:
        t = self.cfg.train
        lr = lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
                   decay_steps=t.lr_decay_steps or t.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = self.objective.batch_for(self.train_batches, t.seed, step, t.batch_size, t.grad_accum,
                                         self.info.rank, self.info.world_size)
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            if self.info.parallel == "fsdp" and self.info.enabled and last:
                self.model.set_requires_gradient_sync(True)
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self._sync_context(last), autocast(self.device, self.precision):
                loss = self.objective.loss(self.model, batch)  # only the loss: the logits leave backward's peak
            scaled = loss / len(micro)
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        # one small all-reduce carries the loss and the stop request, so all ranks agree on both
        stats = torch.stack([loss_sum / len(micro), torch.tensor(float(stop_requested), device=self.device)])
        stats = dist.all_reduce_sum(stats.float(), self.info)
        loss_value = stats[0].item() / self.info.world_size
        grad_norm_value = float(grad_norm)
        if not math.isfinite(loss_value) or (self.scaler is None and not math.isfinite(grad_norm_value)):
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            last = ckpt.latest_checkpoint(self.out)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
            # the failing step is logged too (NaN/Infinity in JSON), so `lmforge diagnose` sees it
            self._log({"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm_value})
            # every rank sees the same values (all-reduced loss, global norm) and stops here; wait
            # for the main one's line, so that none leaves first and torchrun kills it mid-write
            dist.barrier(self.info)
            raise TrainingFailed(
                f"step {step + 1}: {what} is {loss_value if what == 'loss' else grad_norm_value}; training stopped "
                f"({kept}). Try a lower train.lr, more train.warmup_steps or train.grad_clip=1.0"
            )
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm_value, lr, bool(stats[1].item() > 0)

    @torch.no_grad()
    def _estimate_loss(self, batches: TokenBatches) -> float:
        t = self.cfg.train
        self.model.eval()
        total = torch.zeros((), device=self.device)
        count = 0
        for i, batch in enumerate(self.objective.eval_batches(batches, t.seed, t.eval_steps, t.batch_size,
                                                              self.info.rank, self.info.world_size)):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with autocast(self.device, self.precision):
                loss = self.objective.eval_loss(self.model, batch, i)
            total += loss.float()
            count += 1
        self.model.train()
        total = dist.all_reduce_sum(total, self.info)
        return total.item() / (count * self.info.world_size)

    # ---- checkpoints -----------------------------------------------------------------------

    def _save(self, step: int, best: bool = False) -> Path:
        """Save a step checkpoint (collective: every rank takes part in gathering the state)."""
        model_state = dist.full_model_state(self.model)
        optim_state = dist.full_optimizer_state(self.model, self.optimizer)
        rng = {"torch": dist.gather_object(torch.get_rng_state(), self.info)}
        if self.device.type == "cuda":
            rng["cuda"] = dist.gather_object(torch.cuda.get_rng_state(self.device), self.info)
        path = self.out / "checkpoints" / f"step_{step:06d}"
        if self.info.is_main:
            state = {**self.state, "step": step, "optimizer": optim_state, "rng": rng,
                     "world_size": self.info.world_size, "config": to_dict(self.cfg)}
            if self.scaler:
                state["scaler"] = self.scaler.state_dict()
            ckpt.save_checkpoint(path, model_state, self.model_cfg.to_dict(), self.tokenizer_file, state,
                                 drop=ckpt.tied_aliases(self.raw_model))
            if best:
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(self.out / "checkpoints" / ".best.tmp")
                shutil.copytree(path, self.out / "checkpoints" / ".best.tmp")
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(self.out / "checkpoints" / "best")
                (self.out / "checkpoints" / ".best.tmp").rename(self.out / "checkpoints" / "best")
            ckpt.prune_checkpoints(self.out, self.cfg.train.keep_last)
        dist.barrier(self.info)
        return path

    # ---- the loop --------------------------------------------------------------------------

    def run(self, on_step: Callable[[int], None] | None) -> dict[str, Any]:
        t, info = self.cfg.train, self.info
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", dump_yaml(self.cfg))
        start = self.state["step"]
        self._trim_metrics(start)
        if info.is_main:
            n = self.raw_model.num_params()
            print(f"model: {n / 1e6:.2f}M parameters, {self.precision} on {self.device}"
                  f"{f' x{info.world_size} ({info.parallel})' if info.enabled else ''}; "
                  f"train {self.train_batches.num_tokens:,} tokens, val {self.val_batches.num_tokens:,}"
                  f"{f'; resuming from step {start}' if start else ''}", flush=True)
        self.model.train()
        wall0 = time.perf_counter()
        stop_reason = "max_steps"
        val_loss = None
        bar = tqdm(total=t.max_steps, initial=start, disable=not info.is_main, desc="pretrain",
                   unit="step", dynamic_ncols=True, mininterval=0.2 if sys.stderr.isatty() else 10.0)
        step = start
        with _StopFlag() as stop_flag:
            while step < t.max_steps:
                t0 = time.perf_counter()
                loss, grad_norm, lr, stop = self._train_step(step, stop_flag.requested)
                dt = time.perf_counter() - t0
                step += 1
                self.state["step"] = step
                self.state["tokens_seen"] += self.tokens_per_step
                tokens_per_s = self.tokens_per_step / dt
                record = {"step": step, "loss": round(loss, 6), "lr": lr,
                          "grad_norm": round(grad_norm, 5), "tokens_per_s": round(tokens_per_s, 1),
                          "ms_per_step": round(dt * 1000, 2),
                          "mfu": round(self.flops_per_token * tokens_per_s / self.peak, 4) if self.peak else None}
                moe = self._moe_record()  # expert utilization of the step's last micro-batch (MoE models)
                record.update(moe)
                is_eval = (t.eval_every and step % t.eval_every == 0) or step == t.max_steps
                saved = False
                if is_eval:
                    val_loss = self._estimate_loss(self.val_batches)
                    record["val_loss"] = round(val_loss, 6)
                    record["train_eval_loss"] = round(self._estimate_loss(self.train_batches), 6)
                    improved = val_loss < self.state["best_val_loss"]
                    if improved:
                        self.state.update(best_val_loss=val_loss, best_step=step, bad_evals=0)
                    else:
                        self.state["bad_evals"] += 1
                    self._log(record)
                    if info.is_main and (warning := live_warning(self.metrics_path)):
                        tqdm.write(warning)  # overfitting / not converging so far (lmforge.diagnose)
                    self._save(step, best=improved)
                    saved = True
                    if t.patience and self.state["bad_evals"] >= t.patience:
                        stop_reason = "early_stopping"
                else:
                    self._log(record)
                    if t.checkpoint_every and step % t.checkpoint_every == 0:
                        self._save(step)
                        saved = True
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", **({"val": f"{val_loss:.4f}"} if val_loss is not None else {}),
                                tok_s=f"{tokens_per_s:,.0f}", refresh=False,
                                **({"experts": utilization_summary(moe["moe_util"], moe["moe_dropped"])} if moe else {}))
                if on_step is not None:
                    on_step(step)
                # one process: honour a Ctrl-C that arrived during this step now; several
                # processes agree through the flag carried by the next step's all-reduce
                stop = stop or (not info.enabled and stop_flag.requested)
                if stop:
                    if not saved:
                        self._save(step)
                    stop_reason = "interrupted"
                    break
                if stop_reason == "early_stopping":
                    break
        bar.close()
        wall = time.perf_counter() - wall0
        summary = None
        if info.is_main:
            summary = write_run_report(self, stop_reason=stop_reason, wall_time_s=wall)
        # every process waits here for the report: one that left first with Interrupted's exit
        # code would make torchrun stop the main process while it is still writing it
        summary = dist.broadcast_object(summary, info)
        if stop_reason == "interrupted":
            raise Interrupted(f"interrupted at step {step}; checkpoint saved in {self.out}/checkpoints; "
                              f"continue with the same command plus --resume")
        return summary
