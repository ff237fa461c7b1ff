"""What the diagnosis rules read: a run's curves reduced to numbers (`measure`).

Every number a rule reads is also written to the diagnosis' evidence (`Facts.evidence`), so the
report shows what the verdict rests on. The thresholds are `Thresholds`; why they are what they
are is in `lmforge.diagnose.rules`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmforge.diagnose.curves import (
    first_nonfinite_step,
    grad_norm_spikes,
    is_finite_number,
    loss_spikes_after,
    metric_column,
    recent_improvement,
    trailing_median,
    value_at,
)


@dataclass(frozen=True)
class Thresholds:
    min_steps: int = 10  # fewer logged steps: too short to judge the curve's shape
    smooth_fraction: float = 0.05  # trailing-median window = this fraction of the steps ...
    smooth_min: int = 5  # ... at least this many steps
    smooth_max: int = 50  # ... at most this many
    diverge_rise: float = 0.10  # smoothed train loss ends > 10% above its best
    flat_progress: float = 0.05  # best smoothed loss < 5% below the step-1 loss
    spike_ratio: float = 0.25  # a loss spike exceeds the median before it by 25% ...
    spike_progress: float = 0.10  # ... and by 10% of the progress made so far
    oscillation_spikes: int = 3  # this many spike episodes: oscillating
    grad_spike_ratio: float = 10.0  # grad norm > 10x its running median
    gap_growth_nats: float = 0.05  # overfitting: gap grew >= max(0.05 nats, ...)
    gap_growth_rel: float = 0.02  # ... 2% of the best val loss)
    val_rise_nats: float = 0.01  # val ended >= max(0.01 nats, 0.5% of best) above its best
    val_rise_rel: float = 0.005
    val_stall_rel: float = 0.005  # or val improved < 0.5% over the last quarter
    improving_rel: float = 0.02  # still improving: >= 2% over the last quarter ...
    trend_sigmas: float = 3.0  # ... and >= 3 standard errors of the fitted slope (with >= 5 points)
    last_part: float = 0.25  # "the last part of the run"
    underfit_vs_bigram: float = 0.90  # loss >= 90% of the bigram baseline's val loss: high
    underfit_vs_target: float = 1.05  # loss >= 105% of a stated target: high
    close_gap_nats: float = 0.10  # good fit: val within max(0.1 nats, 5%) of train
    close_gap_rel: float = 0.05
    plateau_rel: float = 0.02  # plateau step: the smoothed loss stays within 2% of its final value from there
    baseline_train_tokens: int = 20_000_000
    baseline_val_tokens: int = 2_000_000



THRESHOLDS = Thresholds()


def rounded(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


@dataclass
class Facts:
    """A run's curves as the rules read them; `measure` fills it (None: not measured)."""

    rows: list[dict[str, Any]]
    th: Thresholds
    finished: bool | None = None
    max_steps: int | None = None
    last_step: int = 0
    steps: Any = None  # float64 array of the logged steps
    evidence: dict[str, Any] = field(default_factory=dict)
    limitations: list[str] = field(default_factory=list)
    # the train loss, smoothed by a trailing median of `window` steps
    window: int = 0
    smooth: Any = None
    start: float = math.nan
    best: float = math.nan
    best_i: int = 0
    end: float = math.nan
    end_i: int = 0
    progress: float = 0.0
    rise: float = 0.0
    plateau_i: int = 0
    train_rel: float | None = None
    train_from: int | None = None
    train_err: float = 0.0
    nonfinite: tuple[int, str] | None = None
    loss_spikes: list[dict] = field(default_factory=list)
    grad_spikes: list[dict] = field(default_factory=list)
    # the evals
    evals: list[dict[str, Any]] = field(default_factory=list)
    val: dict[str, Any] = field(default_factory=dict)
    val_rel: float | None = None
    val_err: float = 0.0
    val_points: int = 0
    overfit: bool = False
    # the reference for "high"
    model_loss: float = math.nan
    which: str = ""
    high: bool | None = None
    ref_words: str = ""

    def loss_words(self) -> str:
        steps = self.steps
        return (f"train loss {self.start:.3f} at step {int(steps[0])} -> best {self.best:.3f} "
                f"(step {int(steps[self.best_i])}) -> {self.end:.3f} at step {int(steps[self.end_i])}")


def steps_and_evals(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step, in step order."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in records:  # a resumed run re-logs steps after its checkpoint: the last one counts
        by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def measure(rows: list[dict[str, Any]], *, config: dict[str, Any] | None, finished: bool | None,
            stop_reason: str | None, reference: dict[str, Any] | None, train_tokens: int | None,
            world_size: int, th: Thresholds) -> Facts:
    """The facts of a run (`rows`: `steps_and_evals`); `smooth` is all NaN when no train loss is finite."""
    f = Facts(rows=rows, th=th, finished=finished)
    f.steps = np.array([r["step"] for r in rows], dtype=np.float64)
    measure_run(f, config, stop_reason, train_tokens, world_size)
    columns = {key: metric_column(rows, key) for key in ("loss", "grad_norm", "val_loss")}
    loss, grad = (np.where(np.isfinite(columns[key][0]), columns[key][0], np.nan) for key in ("loss", "grad_norm"))
    f.window = int(min(max(round(th.smooth_fraction * len(rows)), th.smooth_min), th.smooth_max))
    f.smooth = trailing_median(loss, f.window)
    f.nonfinite = first_nonfinite_step(rows, columns)
    if not np.isfinite(f.smooth).any():
        return f
    measure_train(f, loss, grad)
    measure_evals(f)
    measure_reference(f, reference)
    return f


def measure_run(f: Facts, config: dict[str, Any] | None, stop_reason: str | None, train_tokens: int | None,
                world_size: int) -> None:
    cfg_train = (config or {}).get("train", {}) or {}
    f.last_step, f.max_steps = int(f.steps[-1]), cfg_train.get("max_steps")
    f.evidence["run"] = {"steps_logged": len(f.rows), "last_step": f.last_step, "max_steps": f.max_steps,
                         "finished": f.finished, "stop_reason": stop_reason}
    if f.finished is False and f.max_steps and f.last_step < f.max_steps:
        f.limitations.append(f"the run ended at step {f.last_step} of {f.max_steps} without writing summary.json: it "
                             f"stopped on an error (e.g. a non-finite loss), was killed, or is still running; the "
                             f"diagnosis covers the logged steps")
    tokens_per_step = None
    if cfg_train.get("batch_size") and (config or {}).get("model", {}).get("block_size"):
        tokens_per_step = (cfg_train["batch_size"] * cfg_train.get("grad_accum", 1) * world_size
                           * config["model"]["block_size"])
    if tokens_per_step and train_tokens:
        f.evidence["run"]["epochs"] = round(f.last_step * tokens_per_step / train_tokens, 2)


def measure_train(f: Facts, loss: np.ndarray, grad: np.ndarray) -> None:
    th, steps, smooth = f.th, f.steps, f.smooth
    finite = np.isfinite(smooth)
    f.start = float(loss[np.isfinite(loss)][0])
    f.best_i = int(np.nanargmin(smooth))
    f.best = float(smooth[f.best_i])
    f.end_i = int(np.flatnonzero(finite)[-1])
    f.end = float(smooth[f.end_i])
    f.progress = f.start - f.best
    f.rise = (f.end - f.best) / abs(f.best) if f.best else 0.0
    f.train_rel, f.train_from, f.train_err = recent_improvement(steps, loss, th.last_part, 3)
    away = np.flatnonzero(finite & (np.abs(smooth - f.end) > th.plateau_rel * abs(f.end)))
    f.plateau_i = min(int(away[-1]) + 1, f.end_i) if len(away) else 0
    f.evidence["train_loss"] = {
        "smoothing": f"trailing median of {f.window} steps", "start": rounded(f.start), "best": rounded(f.best),
        "best_step": int(steps[f.best_i]), "final": rounded(f.end), "rise_above_best": rounded(f.rise),
        "relative_improvement_last_quarter": rounded(f.train_rel), "standard_error": rounded(f.train_err),
        "last_quarter_from_step": f.train_from,
        "plateau_step": int(steps[f.plateau_i]),
    }
    f.loss_spikes = loss_spikes_after(steps, loss, f.start, th.spike_ratio, th.spike_progress, f.window)
    grad_median, f.grad_spikes = grad_norm_spikes(steps, grad, th.grad_spike_ratio, max(f.window, 20))
    nonfinite = f.nonfinite
    f.evidence["instability"] = {"nonfinite_step": nonfinite[0] if nonfinite else None,
                                 "nonfinite": nonfinite[1] if nonfinite else None,
                                 "loss_spikes": f.loss_spikes[:20], "loss_spike_count": len(f.loss_spikes),
                                 "grad_norm_median": rounded(grad_median), "grad_norm_spikes": f.grad_spikes[:20],
                                 "grad_norm_spike_count": len(f.grad_spikes)}


def measure_evals(f: Facts) -> None:
    f.evals = evals = [r for r in f.rows if "val_loss" in r and is_finite_number(r["val_loss"])]
    f.val = val = {"evals": len(evals)}
    f.evidence["val_loss"] = val
    if evals:
        e_steps = np.array([r["step"] for r in evals], dtype=np.float64)
        v = np.array([r["val_loss"] for r in evals], dtype=np.float64)
        tr = np.array([r["train_eval_loss"] if is_finite_number(r.get("train_eval_loss"))
                       else value_at(f.steps, f.smooth, r["step"]) for r in evals])
        vb = int(np.argmin(v))
        val.update(best=rounded(v[vb]), best_step=int(e_steps[vb]), final=rounded(v[-1]), final_step=int(e_steps[-1]),
                   train_at_evals="train_eval_loss" if all("train_eval_loss" in r for r in evals)
                   else "smoothed train loss",
                   gap_final=rounded((v - tr)[-1]))
        f.evidence["best_checkpoint_step"] = int(e_steps[vb])
    if len(evals) < 2:
        f.limitations.append(f"{'no' if not evals else 'only one'} val evaluation in metrics.jsonl: overfitting "
                             f"cannot be judged (set train.eval_every to evaluate during training)")
        return
    measure_gap(f, e_steps, v, tr)
    if len(evals) == 2:
        f.limitations.append("only two val evaluations: the val trend rests on one comparison")


def measure_gap(f: Facts, e_steps: np.ndarray, v: np.ndarray, tr: np.ndarray) -> None:
    """How the val-train gap and the val loss moved over >= 2 evals, and whether that is overfitting."""
    th, gap, vb = f.th, v - tr, int(np.argmin(v))
    need = max(th.gap_growth_nats, th.gap_growth_rel * float(v[vb]))
    tol = max(th.val_rise_nats, th.val_rise_rel * float(v[vb]))
    # val stopped improving at the first eval within `tol` of its best; overfitting is judged
    # on how the gap grew from there (earlier, at a high loss, train and val can differ for
    # other reasons, e.g. an easier val split, and the gap there says little)
    plateau = int(np.flatnonzero(v <= v[vb] + tol)[0])
    low = plateau + int(np.argmin(gap[plateau:]))
    growth = float(gap[-1] - gap[low])
    train_fall = float(tr[low] - tr[-1])
    # where the gap began to grow, over the whole run: the last eval within 10% of the total
    # growth above the smallest gap
    g_min_i = int(np.argmin(gap))
    total = float(gap[-1] - gap[g_min_i])
    onset_i = int(np.flatnonzero(gap[:-1] <= gap[g_min_i] + 0.1 * total)[-1]) if total > 0 else None
    val_rise = float(v[-1] - v[vb])
    f.val_rel, val_from, f.val_err = recent_improvement(e_steps, v, th.last_part, 3)
    f.val_points = int((e_steps >= val_from).sum()) if val_from is not None else 0
    val_rose = val_rise >= tol
    val_stalled = f.val_rel is not None and f.val_rel < th.val_stall_rel
    f.overfit = (plateau < len(v) - 1 and growth >= need and train_fall >= 0.5 * need
                 and (val_rose or val_stalled))
    f.val["val_trend"] = "rose" if val_rose else "stalled" if val_stalled else "improving"
    f.val.update(val_stopped_improving_step=int(e_steps[plateau]), gap_growth=rounded(growth),
                 gap_growth_from_step=int(e_steps[low]), gap_growth_needed=rounded(need),
                 train_fall_since=rounded(train_fall), gap_min=rounded(gap[g_min_i]),
                 gap_min_step=int(e_steps[g_min_i]),
                 gap_began_to_grow_step=int(e_steps[onset_i]) if onset_i is not None else None,
                 rise_above_best=rounded(val_rise), relative_improvement_last_quarter=rounded(f.val_rel),
                 standard_error=rounded(f.val_err), last_quarter_from_step=val_from)


def measure_reference(f: Facts, reference: dict[str, Any] | None) -> None:
    """The loss compared with the reference (a target, or a bigram model's) and whether it is high."""
    th = f.th
    f.model_loss, f.which = (float(f.val["final"]), "final val loss") if f.evals else (f.end, "final train loss")
    bar = None
    if reference and reference.get("kind") == "target":
        bar = th.underfit_vs_target * reference["loss"]
        f.high = f.model_loss >= bar
        f.ref_words = (f"{f.model_loss / reference['loss']:.2f}x the target {reference['loss']:.3f} "
                       f"(high from {th.underfit_vs_target:.2f}x)")
    elif reference and reference.get("bigram_val_loss") is not None:
        bar = th.underfit_vs_bigram * reference["bigram_val_loss"]
        f.high = f.model_loss >= bar
        f.ref_words = (f"{f.model_loss / reference['bigram_val_loss']:.2f}x a bigram model's val loss "
                       f"{reference['bigram_val_loss']:.3f} (high from {th.underfit_vs_bigram:.2f}x)")
    if reference:
        ratio = f.model_loss / (reference.get("loss") or reference.get("bigram_val_loss"))
        f.evidence["reference"] = {**reference, "compared": f.which, "model_loss": rounded(f.model_loss),
                                   "ratio": rounded(ratio), "high_from": rounded(bar)}
