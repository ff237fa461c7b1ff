"""The one training loop: `pretrain(cfg, out)`.

It owns what every objective needs once: batches, gradient accumulation, clipping, precision,
the learning-rate schedule, logging (`metrics.jsonl`), evaluation, early stopping, checkpoints,
Ctrl-C handling and exact resume. What exists before the first step (run dir, tokenizer, model,
`--init-from`, model transforms, resume, parallelism, optimizer) is `lmforge.train.setup`'s
pipeline; the parts a second loop reuses are in `lmforge.train.steps`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lmforge.config import Config, dump_yaml, to_dict
from lmforge.errors import Interrupted, UserError
from lmforge.fsutil import atomic_write_text
from lmforge.models import has_capability
from lmforge.models.moe import utilization_summary
from lmforge.track.loggers import Trackers
from lmforge.train import distributed as dist
from lmforge.train.batches import TokenBatches
from lmforge.train.device import autocast
from lmforge.train.optim import lr_at
from lmforge.train.report import write_run_report
from lmforge.train.setup import TrainSetup, resolve_model_config, run_tokenizer, setup_training
from lmforge.train.steps import (
    Checkpointer,
    MetricsLog,
    StopFlag,
    apply_gradients,
    check_finite,
    clip_gradients,
    progress_bar,
    set_lr,
    update_best,
)
from lmforge.train.transforms import Transform

__all__ = ["Trainer", "pretrain", "resolve_model_config", "run_tokenizer"]


def pretrain(cfg: Config, out: str | Path, *, resume: bool = False, overwrite: bool = False,
             on_step: Callable[[int], None] | None = None, init_from: str | Path | None = None,
             transforms: Sequence[str | Transform] = (), force: bool = False) -> dict[str, Any]:
    """Train `cfg.model` on `cfg.data.tokens`, writing checkpoints, metrics and a report to `out`.

    init_from (default `cfg.train.init_from`): start from that checkpoint's weights, with a fresh
    optimizer at step 0; passing it together with `resume` is an error (a resumed run continues
    from its own checkpoint, and the recipe's `train.init_from` is then ignored).
    transforms: model transforms applied after init_from (`lmforge.train.transforms`).
    force: start even when the run is predicted not to fit in memory.
    """
    if init_from and resume:
        raise UserError("--init-from and --resume together: a resumed run continues from its own checkpoint; "
                        "drop --init-from")
    info = dist.init_distributed(cfg.train.parallel, cfg.train.device)
    try:
        trainer = Trainer(setup_training(cfg, Path(out), info, resume=resume, overwrite=overwrite,
                                          init_from=init_from or cfg.train.init_from or None,
                                          transforms=tuple(transforms), force=force), init_flag=bool(init_from))
        try:
            return trainer.run(on_step)
        finally:
            trainer.close()
    finally:
        dist.shutdown()


class Trainer:
    """The training loop over a `TrainSetup` (whose fields it names as its own): `pretrain`'s, and
    post-training's (`lmforge.posttrain.run.posttrain`), which passes its progress label (`desc`),
    the files its checkpoints carry besides the weights (`write_files(dir)`, e.g. an adapter
    run's `adapter_config.json`) and `on_report(summary) -> summary`, run on the main process
    after the run report is written (also when the run was interrupted).
    """

    def __init__(self, setup: TrainSetup, init_flag: bool = False, *, desc: str = "pretrain",
                 write_files: Callable[[Path], None] | None = None,
                 on_report: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
        s = self.setup = setup
        self.desc, self.on_report = desc, on_report
        self.cfg, self.out, self.info = s.cfg, s.out, s.info
        self.tokens_dir, self.tokenizer_file, self.model_cfg = s.tokens_dir, s.tokenizer_file, s.model_cfg
        self.objective, self.device, self.precision = s.objective, s.device, s.precision
        self.train_batches, self.val_batches = s.train_batches, s.val_batches
        self.raw_model, self.model, self.optimizer, self.scaler = s.raw_model, s.model, s.optimizer, s.scaler
        self.state, self.peak, self.init_from = s.state, s.peak, s.init_from
        self.tokens_per_step, self.flops_per_token = s.tokens_per_step, s.flops_per_token
        self.init_flag = init_flag
        t = self.cfg.train
        self.metrics = MetricsLog(s.metrics_path, self.info)
        self.checkpointer = Checkpointer(self.out, self.info, keep_last=t.keep_last,
                                         model_config=self.model_cfg.to_dict(), tokenizer_file=self.tokenizer_file,
                                         config=to_dict(self.cfg), base_keys=s.base_keys, write_files=write_files)

    def close(self) -> None:
        """Drop the model, optimizer and setup while the process group still exists: freed after
        `dist.shutdown`, DDP's reducer would take the gloo group down with it, whose destructor
        joins a worker thread while holding the GIL that thread needs (a hang at exit)."""
        self.metrics.close()
        self.setup = self.model = self.raw_model = self.optimizer = self.scaler = self.checkpointer = None

    # ---- one training step -------------------------------------------------------------------

    def _sync_context(self, last_micro: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
        if not self.info.enabled or last_micro:
            return contextlib.nullcontext()
        if self.info.parallel == "ddp":
            return self.model.no_sync()
        self.model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()

    def _forward_backward(self, step: int) -> torch.Tensor:
        """The step's micro-batches forward and backward; returns their mean loss (this rank)."""
        t = self.cfg.train
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
        return loss_sum / len(micro)

    def train_step(self, step: int, stop_requested: bool) -> tuple[dict[str, Any], bool]:
        """One optimizer step; returns its metrics record and whether any rank asked to stop."""
        t = self.cfg.train
        lr = lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
                   decay_steps=t.lr_decay_steps or t.max_steps)
        set_lr(self.optimizer, lr)
        t0 = time.perf_counter()
        loss = self._forward_backward(step)
        grad_norm = clip_gradients(self.model, self.optimizer, self.scaler, t.grad_clip)
        # one small all-reduce carries the loss and the stop request, so all ranks agree on both
        stats = torch.stack([loss, torch.tensor(float(stop_requested), device=self.device)])
        stats = dist.all_reduce_sum(stats.float(), self.info)
        record = {"step": step + 1, "loss": stats[0].item() / self.info.world_size, "lr": lr,
                  "grad_norm": float(grad_norm)}
        check_finite(record, scaler=self.scaler, metrics=self.metrics, checkpointer=self.checkpointer, info=self.info)
        apply_gradients(self.optimizer, self.scaler)
        dt = time.perf_counter() - t0
        tokens_per_s = self.tokens_per_step / dt
        record.update(loss=round(record["loss"], 6), grad_norm=round(record["grad_norm"], 5),
                      tokens_per_s=round(tokens_per_s, 1), ms_per_step=round(dt * 1000, 2),
                      mfu=round(self.flops_per_token * tokens_per_s / self.peak, 4) if self.peak else None)
        record.update(self._moe_record())  # expert utilization of the step's last micro-batch (MoE models)
        record.update(self.objective.step_metrics())  # the objective's own numbers (e.g. DPO's reward margin)
        return record, bool(stats[1].item() > 0)

    def _moe_record(self) -> dict[str, Any]:
        """moe_util (per expert, the fraction of top-k assignments), moe_dropped, moe_aux_loss,
        moe_z_loss of the last training forward; {} for models without experts."""
        stats = self.raw_model.moe_stats() if has_capability(self.raw_model, "moe_stats") else None
        if stats is None:
            return {}
        return {"moe_util": [round(u, 4) for u in stats["util"]], "moe_dropped": round(stats["dropped"], 5),
                "moe_aux_loss": round(stats["aux_loss"], 5), "moe_z_loss": round(stats["z_loss"], 5)}

    # ---- evaluation, checkpoints -------------------------------------------------------------

    @torch.no_grad()
    def estimate_loss(self, batches: TokenBatches) -> float:
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

    def _save(self, step: int, best: bool = False) -> None:
        self.checkpointer.save(step, self.model, self.optimizer, self.state, scaler=self.scaler, device=self.device,
                               best=best)

    def evaluate_and_save(self, step: int, record: dict[str, Any]) -> tuple[bool, bool]:
        """Evaluation at eval steps (val and train loss, best, early stopping), the metrics line and
        the step's checkpoint. Returns (saved a checkpoint, patience exhausted)."""
        t = self.cfg.train
        if not ((t.eval_every and step % t.eval_every == 0) or step == t.max_steps):
            self.metrics.log(record)
            if t.checkpoint_every and step % t.checkpoint_every == 0:
                self._save(step)
                return True, False
            return False, False
        record["val_loss"] = round(self.estimate_loss(self.val_batches), 6)
        record["train_eval_loss"] = round(self.estimate_loss(self.train_batches), 6)
        improved = update_best(self.state, step, record["val_loss"])
        self.metrics.log(record)
        if warning := self.metrics.live_warning():
            tqdm.write(warning)  # overfitting / not converging so far (lmforge.diagnose)
        self._save(step, best=improved)
        return True, bool(t.patience and self.state["bad_evals"] >= t.patience)

    # ---- the loop ----------------------------------------------------------------------------

    def _start(self) -> int:
        """config.yaml, metrics trimmed to the resumed step, the one-line banner; returns the first step."""
        info, start = self.info, self.state["step"]
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", dump_yaml(self.cfg))
        self.metrics.trim(start)
        if info.is_main and self.cfg.train.loggers:  # experiment tracking (lmforge.track), main process only
            t = self.cfg.train
            self.metrics.trackers = Trackers(self.out, t.loggers, to_dict(self.cfg), start_step=start,
                                             uri=t.tracking_uri, experiment=t.experiment)
        if info.is_main:
            origin = (f"; resuming from step {start}" if start else
                      f"; weights from {self.init_from}" if self.init_from else "")
            print(f"model: {self.raw_model.num_params() / 1e6:.2f}M parameters, {self.precision} on {self.device}"
                  f"{f' x{info.world_size} ({info.parallel})' if info.enabled else ''}; "
                  f"train {self.train_batches.num_tokens:,} tokens, val {self.val_batches.num_tokens:,}{origin}",
                  flush=True)
        self.model.train()
        return start

    def _show(self, bar: tqdm, record: dict[str, Any]) -> None:
        moe = ({"experts": utilization_summary(record["moe_util"], record["moe_dropped"])}
               if "moe_util" in record else {})
        self._last_val = record.get("val_loss", getattr(self, "_last_val", None))
        val = {"val": f"{self._last_val:.4f}"} if self._last_val is not None else {}
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", **val, tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False,
                        **moe)

    def run(self, on_step: Callable[[int], None] | None) -> dict[str, Any]:
        t, info = self.cfg.train, self.info
        step = self._start()
        wall0 = time.perf_counter()
        stop_reason = "max_steps"
        bar = progress_bar(t.max_steps, step, info, self.desc)
        with StopFlag(announce=info.is_main) as stop_flag:
            while step < t.max_steps:
                record, stop = self.train_step(step, stop_flag.requested)
                step = self.state["step"] = step + 1
                self.state["tokens_seen"] += self.tokens_per_step
                saved, patience_out = self.evaluate_and_save(step, record)
                self._show(bar, record)
                if on_step is not None:
                    on_step(step)
                # one process: honour a Ctrl-C that arrived during this step now; several
                # processes agree through the flag carried by the next step's all-reduce
                if stop or (not info.enabled and stop_flag.requested):
                    if not saved:
                        self._save(step)
                    stop_reason = "interrupted"
                    break
                if patience_out:
                    stop_reason = "early_stopping"
                    break
        bar.close()
        return self._finish(step, stop_reason, time.perf_counter() - wall0)

    def _finish(self, step: int, stop_reason: str, wall: float) -> dict[str, Any]:
        """The run report (main process); every process waits for it, then an interrupted run raises."""
        summary = None
        if self.info.is_main:
            summary = write_run_report(self.setup, stop_reason=stop_reason, wall_time_s=wall)
            if self.on_report is not None:
                summary = self.on_report(summary)
            if self.metrics.trackers is not None:
                self.metrics.trackers.finish(summary)
        # one that left first with Interrupted's exit code would make torchrun stop the main
        # process while it is still writing the report
        summary = dist.broadcast_object(summary, self.info)
        if stop_reason == "interrupted":
            how = "the same command without --init-from, plus --resume" if self.init_flag else \
                "the same command plus --resume"
            raise Interrupted(f"interrupted at step {step}; checkpoint saved in {self.out}/checkpoints; "
                              f"continue with {how}")
        return summary


_Trainer = Trainer  # the name tests knew it by
