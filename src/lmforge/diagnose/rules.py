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

They are checked in that order (`RULES`: one small function per rule, reading the `Facts` that
`lmforge.diagnose.facts` measures); the first that holds is the verdict.

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

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lmforge.diagnose.facts import THRESHOLDS, Facts, Thresholds, measure, steps_and_evals

__all__ = ["RULES", "THRESHOLDS", "VERDICTS", "Diagnosis", "Thresholds", "diagnose_records"]

VERDICTS = ("good_fit", "underfitting", "overfitting", "not_converging", "still_improving")


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


# ---- the rules, in order: the first that returns (verdict, reason) decides -----------------------

Rule = Callable[[Facts], "tuple[str, str] | None"]


def nonfinite_loss(f: Facts) -> tuple[str, str] | None:
    if f.nonfinite:
        return "not_converging", f"{f.nonfinite[1]} at step {f.nonfinite[0]} (diverged)"
    return None


def diverging(f: Facts) -> tuple[str, str] | None:
    if f.rise > f.th.diverge_rise:
        return "not_converging", f"diverging: {f.loss_words()}, {f.rise:.0%} above its best"
    return None


def too_short(f: Facts) -> tuple[str, str] | None:
    if len(f.rows) >= f.th.min_steps:
        return None
    f.limitations.append(f"only {len(f.rows)} steps logged: too few to judge the shape of the curve")
    if f.finished is False and f.max_steps and f.last_step < f.max_steps:
        return "not_converging", (f"training stopped at step {f.last_step} of {f.max_steps} without writing "
                                  f"summary.json, before the curve shows a trend: it failed at the start (a "
                                  f"non-finite loss stops training with an error) or was stopped")
    return "still_improving", f"only {len(f.rows)} steps: too short to judge; {f.loss_words()}"


def no_progress(f: Facts) -> tuple[str, str] | None:
    if f.progress < f.th.flat_progress * abs(f.start):
        return "not_converging", f"no progress from the start: {f.loss_words()} (< {f.th.flat_progress:.0%} fall)"
    return None


def oscillating(f: Facts) -> tuple[str, str] | None:
    if len(f.loss_spikes) >= f.th.oscillation_spikes:
        return "not_converging", (f"oscillating: {len(f.loss_spikes)} loss spikes (first at step "
                                  f"{f.loss_spikes[0]['step']}); {len(f.grad_spikes)} gradient-norm spikes")
    return None


def overfitting(f: Facts) -> tuple[str, str] | None:
    if not f.overfit:
        return None
    val = f.val
    return "overfitting", (f"val loss {val['val_trend']} (best {val['best']:.3f} at step {val['best_step']}, "
                           f"final {val['final']:.3f}) while train fell {val['train_fall_since']:.3f} after step "
                           f"{val['gap_growth_from_step']}: the val-train gap grew {val['gap_growth']:.3f} to "
                           f"{val['gap_final']:.3f} (it began to grow at step {val['gap_began_to_grow_step']})")


def still_improving(f: Facts) -> tuple[str, str] | None:
    # a trend must also stand out of the noise: a fall of 3 standard errors of the fitted slope
    # (checked with >= 5 points; the per-step train loss always has them, a few evals may not)
    def improving(rel: float | None, err: float, points: int) -> bool:
        return rel is not None and rel >= f.th.improving_rel and (points < 5 or rel >= f.th.trend_sigmas * err)

    if f.val_rel is not None:
        what, rel, found = "val", f.val_rel, improving(f.val_rel, f.val_err, f.val_points)
    else:
        train_points = int((f.steps >= f.train_from).sum()) if f.train_from is not None else 0
        what, rel, found = "train", f.train_rel, improving(f.train_rel, f.train_err, train_points)
    if found:
        return "still_improving", (f"{what} loss still fell {rel:.1%} over the last quarter of the run "
                                   f"(>= {f.th.improving_rel:.0%}): {f.loss_words()}")
    return None


def underfitting(f: Facts) -> tuple[str, str] | None:
    if f.high:
        return "underfitting", (f"the loss flattened from step {int(f.steps[f.plateau_i])}: {f.which} "
                                f"{f.model_loss:.3f} is {f.ref_words}")
    return None


def good_fit(f: Facts) -> tuple[str, str]:
    """The last rule: always decides, saying what it could not judge."""
    if f.high is None:
        f.limitations.append("no reference loss (token dir not found, no --target-loss): whether the plateau is "
                             "high for this model class was not judged")
    if not f.evals:
        f.limitations.append("no val loss: the fit is judged on the train loss alone")
        return "good_fit", f"{f.loss_words()}; flat over the last quarter"
    val = f.val
    close = max(f.th.close_gap_nats, f.th.close_gap_rel * float(val["final"]))
    if abs(val["gap_final"]) > close:
        f.limitations.append(f"val stays {val['gap_final']:.3f} above train but the gap did not grow: the val data "
                             f"may differ from the training data rather than the model overfitting")
    return "good_fit", (f"train and val fell and flattened (val {val['final']:.3f}, gap {val['gap_final']:+.3f}); "
                        f"{f.loss_words()}")


RULES: list[Rule] = [nonfinite_loss, diverging, too_short, no_progress, oscillating, overfitting,
                     still_improving, underfitting, good_fit]


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
    rows = steps_and_evals(records)
    if not rows:
        raise ValueError("no metrics records")
    f = measure(rows, config=config, finished=finished, stop_reason=stop_reason, reference=reference,
                train_tokens=train_tokens, world_size=world_size, th=th)
    if not np.isfinite(f.smooth).any():
        f.evidence["instability"] = {"nonfinite_step": rows[0]["step"], "nonfinite": "no finite loss"}
        verdict, reason = "not_converging", f"no finite train loss in {len(rows)} steps"
    else:
        for rule in RULES:  # good_fit, the last, always decides
            if (found := rule(f)) is not None:
                verdict, reason = found
                break
    return Diagnosis(verdict, reason, f.evidence, _remedies(verdict, f.evidence, config, reference), f.limitations,
                     asdict(th))


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
        out.append(f"a smaller model for this much data (model.n_layer{now('n_layer', m)}, "
                   f"model.n_embd{now('n_embd', m)})")
    elif verdict == "underfitting":
        out.append(f"a larger model: more layers or width (model.n_layer{now('n_layer', m)}, "
                   f"model.n_embd{now('n_embd', m)})")
        ref = evidence.get("reference", {})
        unigram = ref.get("unigram_val_loss")
        if unigram and ref.get("model_loss") and ref["model_loss"] >= 0.95 * unigram:
            out.append(f"the loss sits at the unigram level ({unigram:.3f}): the model uses no context; "
                       f"a learning rate too high to settle often leaves a model there: try train.lr{now('lr')} x0.3")
        else:
            out.append(f"tune the learning rate: train.lr{now('lr')} (try x0.3 and x3)")
        if (t.get("weight_decay") or 0) > 0.1 or (m.get("dropout") or 0) > 0:
            out.append(f"less regularization: train.weight_decay{now('weight_decay')}, "
                       f"model.dropout{now('dropout', m)}")
        out.append("cleaner data: noise (markup, boilerplate, broken encodings) raises the loss any model can reach "
                   "(see `lmforge data prepare`)")
    elif verdict == "still_improving":
        out.append(f"train longer: raise train.max_steps{now('max_steps')}, e.g. x2 (a new run re-plans the "
                   f"learning-rate schedule; --resume keeps the old one)")
        if epochs and epochs > 1:
            out.append(f"more training data if you train much longer: this run already made {epochs:g} passes "
                       f"over its split")
    else:
        out.append(f"nothing to fix: use checkpoints/best (step {best})" if best else "nothing to fix")
        out.append("for a lower loss, scale the model and the data together (a larger model on more tokens)")
    return out
