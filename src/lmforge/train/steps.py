"""The reusable parts of a training loop: what `pretrain`'s loop and a second loop (rollout RL,
issue 12) both need, as public units rather than one trainer's private methods.

- `StopFlag`: SIGINT/SIGTERM become a request to save and stop after the current step; a
  second signal stops the process even while a long operation runs.
- `set_lr`, `clip_gradients`, `check_finite`, `apply_gradients`: one optimizer step (learning
  rate, grad-scaler unscale, clipping, the non-finite check that logs and stops, the update).
- `MetricsLog`: `metrics.jsonl` (one JSON object per step; trimmed back on resume).
- `Checkpointer`: step checkpoints (collective under DDP/FSDP), `best`, pruning to `keep_last`.
- `update_best`: the best-val-loss / early-stopping bookkeeping.
- `progress_bar`: the tqdm bar every loop shows on the main process.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lmforge.diagnose import live_warning
from lmforge.errors import TrainingFailed
from lmforge.fsutil import atomic_write_text
from lmforge.models import unwrap
from lmforge.train import checkpoint as ckpt
from lmforge.train import distributed as dist

# ---- Ctrl-C / SIGTERM ------------------------------------------------------------------------


class StopFlag:
    """Turns SIGINT/SIGTERM into a request to save and stop after the current step (`requested`).

    A second signal stops at once: KeyboardInterrupt when Python gets to run its handler, and
    otherwise (one long operation, e.g. a huge matmul, during which Python runs no handler) a
    watcher thread woken through `signal.set_wakeup_fd` ends the process with exit code 130
    after `grace_s` seconds.
    """

    def __init__(self, grace_s: float = 2.0, announce: bool = True) -> None:
        self.requested = False
        self.grace_s, self.announce = grace_s, announce
        self._previous: dict[int, Any] = {}
        self._done = threading.Event()
        self._pipe: tuple[int, int] | None = None
        self._previous_fd = -1

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def _watch(self, read_fd: int) -> None:
        """Runs until the write end closes (`__exit__`), then closes the read end."""
        seen = 0
        try:
            while data := os.read(read_fd, 64):
                before, seen = seen, seen + sum(1 for b in data if b in (signal.SIGINT, signal.SIGTERM))
                if before < 1 <= seen and self.announce:
                    print("stop requested: saving after this step (signal again to stop at once)",
                          file=sys.stderr, flush=True)
                if before < 2 <= seen and not self._done.wait(self.grace_s):
                    # the main thread is stuck in one long operation, where Python runs no handler
                    print("stopped at once (second signal); the last saved checkpoint is kept",
                          file=sys.stderr, flush=True)
                    os._exit(130)
        except OSError:
            pass
        finally:
            os.close(read_fd)

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._previous[sig] = signal.signal(sig, self._handle)
        if self._previous:
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)
            self._previous_fd = signal.set_wakeup_fd(write_fd)
            self._pipe = (read_fd, write_fd)
            threading.Thread(target=self._watch, args=(read_fd,), daemon=True, name="lmforge-stop").start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_fd)
            os.close(self._pipe[1])  # the watcher reads EOF, closes its end and ends
            self._pipe = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---- one optimizer step -----------------------------------------------------------------------


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   grad_clip: float) -> torch.Tensor:
    """Unscale (fp16) and clip the gradients to `grad_clip` (0: no clipping); returns the global norm
    (a tensor on the device: reading it waits for the device, so read it with the loss)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = grad_clip if grad_clip > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return norm


def check_finite(record: dict[str, Any], *, scaler: torch.amp.GradScaler | None, metrics: MetricsLog,
                 checkpointer: Checkpointer, info: dist.DistInfo) -> None:
    """Stop with TrainingFailed when the step's loss (or, without a grad scaler, its gradient
    norm) is not finite. `record` holds step, loss, lr and grad_norm, the same on every rank."""
    loss, grad_norm = record["loss"], record["grad_norm"]
    if math.isfinite(loss) and (scaler is not None or math.isfinite(grad_norm)):
        return
    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
    last = checkpointer.latest()
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
    metrics.log(record)  # the failing step is logged too (NaN/Infinity in JSON), so `lmforge diagnose` sees it
    # every rank sees the same values (all-reduced loss, global norm) and stops here; wait for the
    # main one's line, so that none leaves first and torchrun kills it mid-write
    dist.barrier(info)
    raise TrainingFailed(f"step {record['step']}: {what} is {value}; training stopped ({kept}). "
                         "Try a lower train.lr, more train.warmup_steps or train.grad_clip=1.0")


def apply_gradients(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """The optimizer update (through the grad scaler under fp16), then the gradients are freed."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ---- metrics, best, progress -------------------------------------------------------------------


class MetricsLog:
    """`metrics.jsonl`: one JSON object per step, written by the main process only; the same records
    go to the run's experiment trackers (`trackers`: `lmforge.track.Trackers`, set by the loop)."""

    def __init__(self, path: Path, info: dist.DistInfo) -> None:
        self.path, self.info = Path(path), info
        self.trackers: Any = None
        if info.is_main:  # the run dir, once (not a mkdir per logged step)
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        if self.info.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.trackers is not None:
                self.trackers.log(record)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None

    def trim(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint resumed from (they will be redone)."""
        if not self.info.is_main or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def live_warning(self) -> str | None:
        """Overfitting / not converging so far (`lmforge.diagnose`), on the main process."""
        return live_warning(self.path) if self.info.is_main else None


def update_best(state: dict[str, Any], step: int, val_loss: float) -> bool:
    """Record an evaluation in `state` (best_val_loss, best_step, bad_evals); True if it improved."""
    if val_loss < state["best_val_loss"]:
        state.update(best_val_loss=val_loss, best_step=step, bad_evals=0)
        return True
    state["bad_evals"] += 1
    return False


def progress_bar(total: int, initial: int, info: dist.DistInfo, desc: str) -> tqdm:
    return tqdm(total=total, initial=initial, disable=not info.is_main, desc=desc, unit="step",
                dynamic_ncols=True, mininterval=0.2 if sys.stderr.isatty() else 10.0)


# ---- checkpoints -------------------------------------------------------------------------------


class Checkpointer:
    """Step checkpoints of one run dir: `save` (a collective: every rank takes part in gathering
    the state), the `best` copy, pruning to `keep_last`.

    `base_keys`: the plain model's tensor names (before model transforms); tensors a transform
    added go to the checkpoint's `transform_state.safetensors` (see `checkpoint.save_checkpoint`).
    `write_files(dir)` adds files to each checkpoint (an adapter run's `adapter_config.json`,
    `lmforge.posttrain.run.checkpoint_files`), so `load_pretrained` can rebuild the model.
    """

    def __init__(self, out: Path, info: dist.DistInfo, *, keep_last: int, model_config: dict[str, Any],
                 tokenizer_file: Path, config: dict[str, Any], base_keys: set[str] | None = None,
                 write_files: Callable[[Path], None] | None = None) -> None:
        self.out, self.info, self.keep_last = Path(out), info, keep_last
        self.model_config, self.tokenizer_file, self.config = model_config, tokenizer_file, config
        self.base_keys, self.write_files = base_keys, write_files

    @property
    def root(self) -> Path:
        return self.out / "checkpoints"

    def latest(self) -> Path | None:
        return ckpt.latest_checkpoint(self.out)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], *,
             scaler: torch.amp.GradScaler | None = None, device: torch.device | None = None,
             best: bool = False) -> Path:
        model_state = dist.full_model_state(model)
        optim_state = dist.full_optimizer_state(model, optimizer)
        rng = {"torch": dist.gather_object(torch.get_rng_state(), self.info)}
        if device is not None and device.type == "cuda":
            rng["cuda"] = dist.gather_object(torch.cuda.get_rng_state(device), self.info)
        path = self.root / f"step_{step:06d}"
        if self.info.is_main:
            trainer_state = {**state, "step": step, "optimizer": optim_state, "rng": rng,
                             "world_size": self.info.world_size, "config": self.config}
            if scaler is not None:
                trainer_state["scaler"] = scaler.state_dict()
            ckpt.save_checkpoint(path, model_state, self.model_config, self.tokenizer_file, trainer_state,
                                 drop=ckpt.tied_aliases(unwrap(model)), base_keys=self.base_keys,
                                 write_files=self.write_files)
            if best:
                self._copy_best(path)
            ckpt.prune_checkpoints(self.out, self.keep_last)
        dist.barrier(self.info)
        return path

    def _copy_best(self, path: Path) -> None:
        tmp, best = self.root / ".best.tmp", self.root / "best"
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
        shutil.copytree(path, tmp)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(best)
        tmp.rename(best)
