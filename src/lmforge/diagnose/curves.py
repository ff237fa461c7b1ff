"""Statistics of a training run's curves, for the verdict rules (`lmforge.diagnose.rules`): a
trailing median that ignores single spikes, spike episodes of the loss and of the gradient norm,
the recent trend as a least-squares slope with its standard error, and the columns of the
metrics records with their first non-finite value.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def trailing_median(values: np.ndarray, window: int) -> np.ndarray:
    """out[i] = median(values[max(0, i - window + 1) : i + 1]), ignoring NaNs."""
    out = np.empty(len(values))
    head = min(window - 1, len(values))
    for i in range(head):
        out[i] = np.nanmedian(values[: i + 1]) if np.isfinite(values[: i + 1]).any() else np.nan
    if len(values) >= window:
        windows = np.lib.stride_tricks.sliding_window_view(values, window)
        for start in range(0, len(windows), 8192):  # chunks keep memory small on long runs
            chunk = windows[start:start + 8192]
            with np.errstate(all="ignore"):
                out[window - 1 + start: window - 1 + start + len(chunk)] = np.nanmedian(chunk, axis=1) \
                    if np.isnan(chunk).any() else np.median(chunk, axis=1)
    return out


def value_at(steps: np.ndarray, values: np.ndarray, step: float) -> float:
    """The value at the last logged step <= `step` (the first value if none)."""
    i = max(int(np.searchsorted(steps, step, side="right")) - 1, 0)
    return float(values[i])


def _median_before(values: np.ndarray, window: int) -> np.ndarray:
    """out[i] = median of the (finite) `window` values before i; NaN at i = 0."""
    with np.errstate(all="ignore"):
        return np.concatenate([[np.nan], trailing_median(values, window)[:-1]])


def loss_spikes_after(steps: np.ndarray, values: np.ndarray, start: float, ratio: float, progress: float,
            window: int) -> list[dict[str, Any]]:
    """Spike episodes: runs of steps whose value exceeds the median of the `window` steps before
    by `ratio` of that median and by `progress` x (start - median)."""
    median = _median_before(values, window)
    with np.errstate(invalid="ignore"):
        excess = values - median
        spiked = (excess > ratio * np.abs(median)) & (excess > progress * np.maximum(start - median, 0.0))
    episodes: list[dict[str, Any]] = []
    for i in np.flatnonzero(spiked):
        if i > 0 and spiked[i - 1]:
            episodes[-1]["peak"] = max(episodes[-1].get("peak", episodes[-1]["loss"]), round(float(values[i]), 4))
        else:
            episodes.append({"step": int(steps[i]), "loss": round(float(values[i]), 4),
                             "median_before": round(float(median[i]), 4)})
    return episodes


def grad_norm_spikes(steps: np.ndarray, norms: np.ndarray, ratio: float,
                     window: int) -> tuple[float | None, list[dict]]:
    finite = norms[np.isfinite(norms)]
    if not len(finite):
        return None, []
    median = _median_before(norms, window)
    median[:5] = np.nan  # a running median needs a few steps first
    with np.errstate(invalid="ignore"):
        spiked = np.flatnonzero((median > 0) & (norms > ratio * median))
    return float(np.median(finite)), [{"step": int(steps[i]), "grad_norm": round(float(norms[i]), 3),
                                       "x_median": round(float(norms[i] / median[i]), 1)} for i in spiked]


def recent_improvement(steps: np.ndarray, values: np.ndarray, part: float, min_points: int
                        ) -> tuple[float | None, int | None, float]:
    """How much `values` fell over the last `part` of the run, relative to the final level.

    A least-squares line through the points of the last `part` of the steps (at least the last
    `min_points`; sparse evals reach further back), its fall projected over `part` of the run and
    divided by the line's final value. A fitted slope is steadier than a two-point difference on
    noisy curves. Returns (relative fall, first step used, standard error of the fall); the fall
    is None with < 2 points, the error 0 with < 3.
    """
    keep = np.isfinite(values)
    steps, values = steps[keep], values[keep]
    if len(steps) < 2 or steps[-1] <= steps[0]:
        return None, None, 0.0
    span = part * (steps[-1] - steps[0])
    first = max(min(int(np.searchsorted(steps, steps[-1] - span)), len(steps) - min_points), 0)
    x, y = steps[first:], values[first:]
    slope, intercept = np.polyfit(x, y, 1)
    end = slope * x[-1] + intercept
    if not end > 0:
        return None, None, 0.0
    stderr = 0.0
    if len(x) > 2:
        residual = y - (slope * x + intercept)
        stderr = float(np.sqrt(residual @ residual / (len(x) - 2) / ((x - x.mean()) @ (x - x.mean()))))
    return float(-slope * span / end), int(x[0]), stderr * span / end


def metric_column(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(values with NaN where missing or not a finite number, whether the key is present)."""
    values = [r.get(key) for r in rows]
    try:
        column = np.array(values, dtype=np.float64)  # None -> NaN
    except (TypeError, ValueError):
        column = np.array([v if is_finite_number(v) else np.nan for v in values], dtype=np.float64)
    return column, np.array([key in r for r in rows])


def first_nonfinite_step(rows: list[dict[str, Any]], columns: dict[str, tuple[np.ndarray, np.ndarray]]
                    ) -> tuple[int, str] | None:
    bad = np.zeros(len(rows), dtype=bool)
    for values, present in columns.values():
        bad |= present & ~np.isfinite(values)
    if not bad.any():
        return None
    r = rows[int(np.argmax(bad))]
    key = next(k for k, (values, present) in columns.items() if k in r and not is_finite_number(r[k]))
    return r["step"], f"{key} is {r[key]}"
