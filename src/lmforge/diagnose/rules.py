"""The verdict of `lmforge diagnose`: which of five cases a run's curves are in (`diagnose_records`).

From the records of `metrics.jsonl` (one record per step: `loss`, `grad_norm`, ...; eval steps add
`val_loss` and `train_eval_loss`, the train loss measured like the val loss) it says which of five
cases the run is in, with the numbers that show it and the remedies that fit:

- `not_converging`: a non-finite loss, a train loss that rose well above its best (diverging),
  no progress from the start, or repeated loss spikes (oscillating).
- `overfitting`: val stopped improving (rose, or stalled) while train kept falling, so the
  val-train gap grew. Reports where the gap began to grow and the best checkpoint's step.
- `still_improving`: train (and val) were still falling over the last quarter: train longer.
- `underfitting`: the loss has flattened but is high for the model class (see "reference").
- `good_fit`: train and val fell, flattened and are close.

They are checked in that order; the first that holds is the verdict.

Why these rules, and their thresholds (all in `Thresholds`, reported in `--json` output):

- Train loss per step is noisy (one small batch), so it is smoothed with a trailing median of
  `n/20` steps (5..50): a median ignores single spikes that would drag a mean or an EMA. The
  eval losses are already averages over `eval_steps` fixed batches and are used as they are.
- Diverging: the smoothed train loss ends more than 10% above its best. Healthy runs end at
  (or within noise of) their best; a 10% rise is far beyond median noise.
- Flat from the start: the smoothed loss never got 5% below the loss at step 1 (the
  initialised model, ~ln(vocab)); any model that learns token frequencies gets far below that.
- Oscillating: 3 or more loss spikes, each a step whose loss exceeds the median of the steps
  before it by 25% *and* by 10% of the progress made so far (so that noise on a loss near zero,
  where relative noise is large, is not a spike). Gradient-norm spikes (> 10x the running
  median) are reported for every verdict: alone they are a warning, not a verdict.
- Overfitting needs >= 2 evals and all of: val no longer improves: it ended >= max(0.01 nats,
  0.5%) above its best, or fell < 0.5% over the last quarter of the run; and from the eval where
  val stopped improving (the first within that tolerance of its best), the val-train gap grew by
  >= max(0.05 nats, 2% of the best val loss) (0.05 nats = a 5% perplexity ratio) while the
  train loss fell by at least half that. Measuring the growth only from there ignores early
  evals, where train and val can differ for other reasons (e.g. an easier val split). The gap
  "began to grow" at the last eval within 10% of the total growth above the smallest gap of
  the run; the best checkpoint is the eval with the lowest val loss (what the trainer saves as
  `checkpoints/best`).
- Still improving: the loss fell >= 2% over the last quarter of the run (on a power-law
  curve, ~4% more from doubling the run; smaller gains are the slow tail every LM curve has,
  which "train longer" would overstate), measured by the slope
  of a least-squares line through the val losses of the last quarter (at least the last 3
  evals) when there are >= 2 evals, else through the per-step train losses; with >= 5 points
  the fall must also be >= 3 standard errors of the slope, so that noise is not read as
  progress.
- Underfitting needs a reference for "high". A Transformer can represent a bigram model
  exactly (token embedding -> output), so it should beat one; the default reference is the
  val loss of a count-based bigram model of the training split (interpolated absolute
  discounting, D = 0.75, with an add-one unigram; up to 20M train / 2M val tokens). A plateau
  at >= 90% of that loss means the model barely uses context: underfitting. This catches
  grossly underfit runs (too small, too regularized, a learning rate that leaves it stuck at
  the unigram level); for a finer judgement pass the loss your model class is known to reach
  (`--target-loss`, e.g. a larger model's val loss on the same data): then >= 5% above it is
  high. Without the token dir or a target, "high" cannot be judged and the run is not called
  underfitting (the output says so).

A run that stopped on a non-finite loss (`TrainingFailed`) logs no record for the failing step
and writes no `summary.json`; its curves up to that point are diagnosed and the output says the
run ended early without a summary. Zero or one eval: overfitting cannot be judged, the verdict
rests on the train loss, and `limitations` says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
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

VERDICTS = ("good_fit", "underfitting", "overfitting", "not_converging", "still_improving")


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


@dataclass
class Diagnosis:
    verdict: str
    reason: str  # one line: why this verdict
    evidence: dict[str, Any]
    remedies: list[str]
    limitations: list[str] = field(default_factory=list)
    thresholds: dict[str, Any] = field(default_factory=lambda: asdict(THRESHOLDS))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _steps_and_evals(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_step: dict[int, dict[str, Any]] = {}
    for r in records:  # a resumed run re-logs steps after its checkpoint: the last one counts
        by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def diagnose_records(records: list[dict[str, Any]], *, config: dict[str, Any] | None = None,
                     finished: bool | None = None, stop_reason: str | None = None,
                     reference: dict[str, Any] | None = None, train_tokens: int | None = None,
                     world_size: int = 1, th: Thresholds = THRESHOLDS) -> Diagnosis:
    """Classify a run from its metrics records (see the module docstring for the rules).

    `config`: the run's resolved config (config.yaml) for max_steps and config-aware remedies;
    `finished`: whether the run wrote summary.json; `reference`: {"kind": "target", "loss": x} or
    `bigram_reference(...)`, needed to call a run underfitting; `train_tokens`: size of the train
    split, for the epochs count.
    """
    rows = _steps_and_evals(records)
    if not rows:
        raise ValueError("no metrics records")
    cfg_train = (config or {}).get("train", {}) or {}
    steps = np.array([r["step"] for r in rows], dtype=np.float64)
    columns = {key: metric_column(rows, key) for key in ("loss", "grad_norm", "val_loss")}
    loss, grad = (np.where(np.isfinite(columns[key][0]), columns[key][0], np.nan) for key in ("loss", "grad_norm"))
    last_step = int(steps[-1])
    max_steps = cfg_train.get("max_steps")
    limitations: list[str] = []
    evidence: dict[str, Any] = {"run": {"steps_logged": len(rows), "last_step": last_step, "max_steps": max_steps,
                                        "finished": finished, "stop_reason": stop_reason}}
    if finished is False and max_steps and last_step < max_steps:
        limitations.append(f"the run ended at step {last_step} of {max_steps} without writing summary.json: it stopped "
                           f"on an error (e.g. a non-finite loss), was killed, or is still running; the diagnosis "
                           f"covers the logged steps")
    tokens_per_step = None
    if cfg_train.get("batch_size") and (config or {}).get("model", {}).get("block_size"):
        tokens_per_step = (cfg_train["batch_size"] * cfg_train.get("grad_accum", 1) * world_size
                           * config["model"]["block_size"])
    if tokens_per_step and train_tokens:
        evidence["run"]["epochs"] = round(last_step * tokens_per_step / train_tokens, 2)

    # ---- train loss -------------------------------------------------------------------------
    window = int(min(max(round(th.smooth_fraction * len(rows)), th.smooth_min), th.smooth_max))
    smooth = trailing_median(loss, window)
    finite = np.isfinite(smooth)
    nonfinite = first_nonfinite_step(rows, columns)
    if not finite.any():
        evidence["instability"] = {"nonfinite_step": rows[0]["step"], "nonfinite": "no finite loss"}
        return _finish("not_converging", f"no finite train loss in {len(rows)} steps", evidence, limitations,
                       config, reference, th)
    start = float(loss[np.isfinite(loss)][0])
    best_i = int(np.nanargmin(smooth))
    best = float(smooth[best_i])
    end_i = int(np.flatnonzero(finite)[-1])
    end = float(smooth[end_i])
    progress = start - best
    rise = (end - best) / abs(best) if best else 0.0
    train_rel, train_from, train_err = recent_improvement(steps, loss, th.last_part, 3)
    away = np.flatnonzero(finite & (np.abs(smooth - end) > th.plateau_rel * abs(end)))
    plateau_i = min(int(away[-1]) + 1, end_i) if len(away) else 0
    evidence["train_loss"] = {
        "smoothing": f"trailing median of {window} steps", "start": _r(start), "best": _r(best),
        "best_step": int(steps[best_i]), "final": _r(end), "rise_above_best": _r(rise),
        "relative_improvement_last_quarter": _r(train_rel), "standard_error": _r(train_err),
        "last_quarter_from_step": train_from,
        "plateau_step": int(steps[plateau_i]),
    }
    loss_spikes = loss_spikes_after(steps, loss, start, th.spike_ratio, th.spike_progress, window)
    grad_median, grad_spikes = grad_norm_spikes(steps, grad, th.grad_spike_ratio, max(window, 20))
    evidence["instability"] = {"nonfinite_step": nonfinite[0] if nonfinite else None,
                               "nonfinite": nonfinite[1] if nonfinite else None,
                               "loss_spikes": loss_spikes[:20], "loss_spike_count": len(loss_spikes),
                               "grad_norm_median": _r(grad_median), "grad_norm_spikes": grad_spikes[:20],
                               "grad_norm_spike_count": len(grad_spikes)}

    # ---- evals ------------------------------------------------------------------------------
    evals = [r for r in rows if "val_loss" in r and is_finite_number(r["val_loss"])]
    val: dict[str, Any] = dict(evals=len(evals))
    val_rel, val_err, val_points = None, 0.0, 0
    evidence["val_loss"] = val
    overfit = False
    if evals:
        e_steps = np.array([r["step"] for r in evals], dtype=np.float64)
        v = np.array([r["val_loss"] for r in evals], dtype=np.float64)
        tr = np.array([r["train_eval_loss"] if is_finite_number(r.get("train_eval_loss"))
                       else value_at(steps, smooth, r["step"]) for r in evals])
        gap = v - tr
        vb = int(np.argmin(v))
        val.update(best=_r(v[vb]), best_step=int(e_steps[vb]), final=_r(v[-1]), final_step=int(e_steps[-1]),
                   train_at_evals="train_eval_loss" if all("train_eval_loss" in r for r in evals) else "smoothed train loss",
                   gap_final=_r(gap[-1]))
        evidence["best_checkpoint_step"] = int(e_steps[vb])
    if len(evals) < 2:
        limitations.append(f"{'no' if not evals else 'only one'} val evaluation in metrics.jsonl: overfitting cannot "
                           f"be judged (set train.eval_every to evaluate during training)")
    else:
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
        val_rel, val_from, val_err = recent_improvement(e_steps, v, th.last_part, 3)
        val_points = int((e_steps >= val_from).sum()) if val_from is not None else 0
        val_rose = val_rise >= tol
        val_stalled = val_rel is not None and val_rel < th.val_stall_rel
        overfit = (plateau < len(v) - 1 and growth >= need and train_fall >= 0.5 * need
                   and (val_rose or val_stalled))
        val["val_trend"] = "rose" if val_rose else "stalled" if val_stalled else "improving"
        val.update(val_stopped_improving_step=int(e_steps[plateau]), gap_growth=_r(growth),
                   gap_growth_from_step=int(e_steps[low]), gap_growth_needed=_r(need),
                   train_fall_since=_r(train_fall), gap_min=_r(gap[g_min_i]), gap_min_step=int(e_steps[g_min_i]),
                   gap_began_to_grow_step=int(e_steps[onset_i]) if onset_i is not None else None,
                   rise_above_best=_r(val_rise), relative_improvement_last_quarter=_r(val_rel),
                   standard_error=_r(val_err), last_quarter_from_step=val_from)
        if len(evals) == 2:
            limitations.append("only two val evaluations: the val trend rests on one comparison")

    # ---- the reference for "high" ------------------------------------------------------------
    model_loss, which = (float(val["final"]), "final val loss") if evals else (end, "final train loss")
    high, bar, ref_words = None, None, ""
    if reference and reference.get("kind") == "target":
        bar = th.underfit_vs_target * reference["loss"]
        high = model_loss >= bar
        ref_words = (f"{model_loss / reference['loss']:.2f}x the target {reference['loss']:.3f} "
                     f"(high from {th.underfit_vs_target:.2f}x)")
    elif reference and reference.get("bigram_val_loss") is not None:
        bar = th.underfit_vs_bigram * reference["bigram_val_loss"]
        high = model_loss >= bar
        ref_words = (f"{model_loss / reference['bigram_val_loss']:.2f}x a bigram model's val loss "
                     f"{reference['bigram_val_loss']:.3f} (high from {th.underfit_vs_bigram:.2f}x)")
    if reference:
        evidence["reference"] = {**reference, "compared": which, "model_loss": _r(model_loss),
                                 "ratio": _r(model_loss / (reference.get("loss") or reference.get("bigram_val_loss"))),
                                 "high_from": _r(bar)}

    # ---- decide -----------------------------------------------------------------------------
    def loss_words() -> str:
        return f"train loss {start:.3f} at step {int(steps[0])} -> best {best:.3f} (step {int(steps[best_i])}) -> {end:.3f} at step {int(steps[end_i])}"

    if nonfinite:
        return _finish("not_converging", f"{nonfinite[1]} at step {nonfinite[0]} (diverged)", evidence, limitations,
                       config, reference, th)
    if rise > th.diverge_rise:
        return _finish("not_converging", f"diverging: {loss_words()}, {rise:.0%} above its best", evidence,
                       limitations, config, reference, th)
    if len(rows) < th.min_steps:
        limitations.append(f"only {len(rows)} steps logged: too few to judge the shape of the curve")
        if finished is False and max_steps and last_step < max_steps:
            return _finish("not_converging", f"training stopped at step {last_step} of {max_steps} without writing "
                           f"summary.json, before the curve shows a trend: it failed at the start (a non-finite loss "
                           f"stops training with an error) or was stopped", evidence, limitations, config, reference, th)
        return _finish("still_improving", f"only {len(rows)} steps: too short to judge; {loss_words()}", evidence,
                       limitations, config, reference, th)
    if progress < th.flat_progress * abs(start):
        return _finish("not_converging", f"no progress from the start: {loss_words()} (< {th.flat_progress:.0%} fall)",
                       evidence, limitations, config, reference, th)
    if len(loss_spikes) >= th.oscillation_spikes:
        return _finish("not_converging", f"oscillating: {len(loss_spikes)} loss spikes (first at step "
                       f"{loss_spikes[0]['step']}); {len(grad_spikes)} gradient-norm spikes", evidence, limitations,
                       config, reference, th)
    if overfit:
        return _finish("overfitting", f"val loss {val['val_trend']} (best {val['best']:.3f} at step {val['best_step']}, "
                       f"final {val['final']:.3f}) while train fell {val['train_fall_since']:.3f} after step "
                       f"{val['gap_growth_from_step']}: the val-train gap grew {val['gap_growth']:.3f} to "
                       f"{val['gap_final']:.3f} (it began to grow at step {val['gap_began_to_grow_step']})",
                       evidence, limitations, config, reference, th)
    # a trend must also stand out of the noise: a fall of 3 standard errors of the fitted slope
    # (checked with >= 5 points; the per-step train loss always has them, a few evals may not)
    def improving(rel: float | None, err: float, points: int) -> bool:
        return rel is not None and rel >= th.improving_rel and (points < 5 or rel >= th.trend_sigmas * err)

    train_points = int((steps >= train_from).sum()) if train_from is not None else 0
    judged_rel = val_rel if val_rel is not None else train_rel
    if improving(val_rel, val_err, val_points) if val_rel is not None else improving(train_rel, train_err, train_points):
        what = "val" if val_rel is not None else "train"
        return _finish("still_improving", f"{what} loss still fell {judged_rel:.1%} over the last quarter of the run "
                       f"(>= {th.improving_rel:.0%}): {loss_words()}", evidence, limitations, config, reference, th)
    if high:
        return _finish("underfitting", f"the loss flattened from step {int(steps[plateau_i])}: {which} "
                       f"{model_loss:.3f} is {ref_words}", evidence, limitations, config, reference, th)
    if high is None:
        limitations.append("no reference loss (token dir not found, no --target-loss): whether the plateau is high "
                           "for this model class was not judged")
    if not evals:
        limitations.append("no val loss: the fit is judged on the train loss alone")
        return _finish("good_fit", f"{loss_words()}; flat over the last quarter", evidence, limitations, config,
                       reference, th)
    close = max(th.close_gap_nats, th.close_gap_rel * float(val["final"]))
    if abs(val["gap_final"]) > close:
        limitations.append(f"val stays {val['gap_final']:.3f} above train but the gap did not grow: the val data may "
                           f"differ from the training data rather than the model overfitting")
    return _finish("good_fit", f"train and val fell and flattened (val {val['final']:.3f}, gap {val['gap_final']:+.3f}"
                   f"); {loss_words()}", evidence, limitations, config, reference, th)


def _remedies(verdict: str, evidence: dict[str, Any], config: dict[str, Any] | None,
              reference: dict[str, Any] | None) -> list[str]:
    """The remedies that fit the verdict, with the run's current settings where they matter."""
    t = (config or {}).get("train", {}) or {}
    m = (config or {}).get("model", {}) or {}
    now = lambda key, where=t: f" (now {where[key]})" if key in where else ""  # noqa: E731
    best = evidence.get("best_checkpoint_step")
    epochs = evidence["run"].get("epochs")
    out: list[str] = []
    if verdict == "not_converging":
        lr = t.get("lr")
        out.append(f"lower the learning rate: train.lr{now('lr')}" + (f" -> {lr / 3:.2g} or lower" if lr else ""))
        if not t or t.get("grad_clip", 0) <= 0:
            out.append(f"clip gradients: train.grad_clip=1.0{now('grad_clip')}")
        elif evidence["instability"].get("grad_norm_spike_count"):
            out.append(f"clip harder: train.grad_clip{now('grad_clip')} -> {t['grad_clip'] / 2:g}")
        warm, total = t.get("warmup_steps"), t.get("max_steps")
        if warm is None or total is None or warm < max(0.02 * total, 100):
            out.append(f"warm up longer: train.warmup_steps{now('warmup_steps')} -> "
                       f"{int(max(0.02 * (total or 0), 100))} or ~2-5% of the steps")
        if t.get("precision") == "fp16":
            out.append("train in bf16 or fp32: fp16 overflows on large activations")
        if evidence["instability"].get("loss_spike_count"):
            out.append("check the training data near the spike steps for broken, binary or repeated documents")
        if evidence["instability"].get("nonfinite_step") or evidence["run"].get("finished") is False:
            out.append("restart, or --resume from the last good checkpoint, with these settings")
    elif verdict == "overfitting":
        out.append(f"stop early: use checkpoints/best (step {best}) and set train.patience=2{now('patience')} so "
                   f"training stops when val stops improving")
        out.append("more (or more varied, deduplicated) training data"
                   + (f": the run made {epochs:g} passes over its training split" if epochs else ""))
        wd = t.get("weight_decay")
        out.append(f"stronger weight decay: train.weight_decay{now('weight_decay')}"
                   + (f" -> {max(0.1, 2 * wd):g}" if wd is not None else ""))
        d = m.get("dropout")
        out.append(f"dropout: model.dropout{now('dropout', m)} -> {0.1 if not d else min(d + 0.1, 0.5):g}")
        out.append(f"a smaller model for this much data (model.n_layer{now('n_layer', m)}, model.n_embd{now('n_embd', m)})")
    elif verdict == "underfitting":
        out.append(f"a larger model: more layers or width (model.n_layer{now('n_layer', m)}, model.n_embd{now('n_embd', m)})")
        ref = evidence.get("reference", {})
        if ref.get("unigram_val_loss") and ref.get("model_loss") and ref["model_loss"] >= 0.95 * ref["unigram_val_loss"]:
            out.append(f"the loss sits at the unigram level ({ref['unigram_val_loss']:.3f}): the model uses no context; "
                       f"a learning rate too high to settle often leaves a model there: try train.lr{now('lr')} x0.3")
        else:
            out.append(f"tune the learning rate: train.lr{now('lr')} (try x0.3 and x3)")
        if (t.get("weight_decay") or 0) > 0.1 or (m.get("dropout") or 0) > 0:
            out.append(f"less regularization: train.weight_decay{now('weight_decay')}, model.dropout{now('dropout', m)}")
        out.append("cleaner data: noise (markup, boilerplate, broken encodings) raises the loss any model can reach "
                   "(see `lmforge data prepare`)")
    elif verdict == "still_improving":
        out.append(f"train longer: raise train.max_steps{now('max_steps')}, e.g. x2 (a new run re-plans the "
                   f"learning-rate schedule; --resume keeps the old one)")
        if epochs and epochs > 1:
            out.append(f"more training data if you train much longer: this run already made {epochs:g} passes over its split")
    else:
        out.append(f"nothing to fix: use checkpoints/best (step {best})" if best else "nothing to fix")
        out.append("for a lower loss, scale the model and the data together (a larger model on more tokens)")
    return out


def _finish(verdict: str, reason: str, evidence: dict[str, Any], limitations: list[str],
            config: dict[str, Any] | None, reference: dict[str, Any] | None, th: Thresholds) -> Diagnosis:
    return Diagnosis(verdict, reason, evidence, _remedies(verdict, evidence, config, reference), limitations,
                     asdict(th))
