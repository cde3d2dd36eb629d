"""exploding: the global gradient norm far above its early median, updates that rewrite a layer,
or a sustained exponential rise (a slow divergence) before anything turns non-finite."""

from __future__ import annotations

import math

import numpy as np

from .. import remedies as R
from ..facts import RunLike, fmt, nanmedian, weight_layers
from ...findings import Finding
from .common import first_row

#: Explosion: the global gradient norm exceeds its own early median by this factor.
EXPLODE_FACTOR = 100.0
#: Steps whose median is the explosion baseline (the first ones with a finite norm).
BASELINE_STEPS = 10
#: Slow divergence (a learning rate that keeps growing, a feedback loop): the norm's medians over
#: RISE_BLOCKS consecutive blocks of RISE_WINDOW / RISE_BLOCKS steps each grow by RISE_BLOCK_FACTOR
#: (1.5x per 10 steps: ~4% per step, sustained for 30 steps), from a level of RISE_MIN_LEVEL x the
#: level over the RISE_HISTORY steps before, while the loss improves by less than
#: RISE_LOSS_IMPROVEMENT. benchmarks/early_warning.py: nine lr-growing runs flagged 85-178 steps
#: before their first NaN; seven healthy runs (warm-up, cosine restarts, noisy batches, LSTM,
#: transformer) never.
RISE_WINDOW = 30
RISE_BLOCKS = 3
RISE_BLOCK_FACTOR = 1.5
RISE_MIN_LEVEL = 2.0
RISE_HISTORY = 100
#: ... and a straight line fits the log of the norm over the window this well (R^2): a steady
#: exponential climb, not one jump or a spike at its end.
RISE_R2 = 0.6
RISE_LOSS_IMPROVEMENT = 0.1
#: Update ratio ‖Δw‖/‖w‖ above which a step rewrites a layer wholesale (rule of thumb is ~1e-3).
UPDATE_RATIO_EXPLODE = 1.0
#: ... counted only if the gradient norm also grew this much by then (or turns non-finite within
#: UPDATE_GATE_STEPS steps).
UPDATE_GATE_GROWTH = 10.0
UPDATE_GATE_STEPS = 10


def early_median(gnorm: np.ndarray) -> float:
    """The median of the first BASELINE_STEPS finite norms: the level an explosion is measured against."""
    finite = gnorm[np.isfinite(gnorm)]
    if finite.size == 0:
        return math.nan
    return float(np.median(finite[:BASELINE_STEPS]))


def norm_exploded_before(gnorm: np.ndarray, row: int) -> bool:
    """Whether some finite norm before ``row`` exceeded EXPLODE_FACTOR x the early median."""
    base = early_median(gnorm[:row])
    prior = gnorm[:row][np.isfinite(gnorm[:row])]
    return bool(prior.size and math.isfinite(base) and base > 0 and prior.max() > EXPLODE_FACTOR * base)


def exploding(run: RunLike) -> Finding | None:
    """The global gradient norm exceeds EXPLODE_FACTOR x its early median, updates rewrite layers, or
    the norm rises exponentially while the loss does not improve (sustained_rise)."""
    steps = run.steps
    gnorm = run.step_series("grad_norm").astype(np.float64)
    if len(steps) < 2:
        return None
    first_bad = first_row(~np.isfinite(gnorm))
    horizon = first_bad if first_bad is not None else len(gnorm)
    base = early_median(gnorm[:horizon])
    row = _first_crossing(gnorm[:horizon])
    # Weight matrices only: a zero-initialised bias has |w| = 0 and an infinite ratio on step 0.
    upd = run.layer_series("update_ratio")[:horizon][:, weight_layers(run)]
    with np.errstate(invalid="ignore"):
        big_update = np.isfinite(upd) & (np.nan_to_num(upd, nan=0.0) > UPDATE_RATIO_EXPLODE)
    # With Adam/RMSprop a too-large lr alone gives huge update ratios whatever the gradient: count
    # them as an explosion only at rows by which the gradients had grown (or where a non-finite
    # value follows): the step is then named where both had happened.
    upd_row = None
    for r in np.flatnonzero(big_update.any(axis=1)) if big_update.size else []:
        if _grew(gnorm[: r + 1], UPDATE_GATE_GROWTH) or (first_bad is not None and r >= first_bad - UPDATE_GATE_STEPS):
            upd_row = int(r)
            break
    loss = run.step_series("loss").astype(np.float64)
    rise = sustained_rise(gnorm[:horizon], loss[:horizon])
    if row is None and upd_row is None and rise is None:
        # A jump straight from normal to non-finite with growth on the way is an explosion too.
        if first_bad is not None and _grew_into_nonfinite(gnorm, first_bad):
            row = first_bad
        else:
            return None
    rows = [r for r in (row, upd_row, rise) if r is not None]
    at = min(rows)
    peak = (float(np.nanmax(np.where(np.isfinite(gnorm[: max(horizon, 1)]), gnorm[: max(horizon, 1)], np.nan)))
            if horizon else math.nan)
    layer_rms = run.layer_series("grad_rms")
    layer_growth = _layer_growth(layer_rms[: max(at + 1, 1)])
    worst = [run.layers[i].name for i in np.argsort(-np.nan_to_num(layer_growth, nan=-1.0))[:3] if np.isfinite(layer_growth[i])]
    severity = "error" if first_bad is not None else "warning"
    step = int(steps[at])
    summary = (
        f"exploding_gradients at step {step}: the global gradient norm reached "
        f"{fmt(peak)}, {fmt(peak / base) if base > 0 else '?'}x its early median {fmt(base)} (threshold {EXPLODE_FACTOR:g}x)"
        + (f"; it turned non-finite at step {int(steps[first_bad])}" if first_bad is not None else "")
        + "."
    )
    if upd_row is not None and (row is None or upd_row < row) and at == upd_row:
        summary = (f"exploding_gradients at step {step}: one update changed a layer by more than "
                   f"{UPDATE_RATIO_EXPLODE:g}x its own norm (|dw|/|w|; a healthy step is ~1e-3).")
    if rise is not None and at == rise and rise != row:
        lo = max(0, rise - RISE_WINDOW + 1)
        per_step = (gnorm[rise] / gnorm[lo]) ** (1 / max(1, rise - lo)) - 1 if gnorm[lo] > 0 else math.nan
        summary = (f"exploding_gradients at step {step}: the global gradient norm has been rising exponentially "
                   f"(about {per_step:+.1%} per step over the last {rise - lo + 1} steps, from {fmt(gnorm[lo])} to "
                   f"{fmt(gnorm[rise])}) while the loss did not improve: a slow divergence"
                   + (f"; it turned non-finite at step {int(steps[first_bad])}" if first_bad is not None else "")
                   + (f" and passed {EXPLODE_FACTOR:g}x its early median at step {int(steps[row])}" if row is not None else "")
                   + ".")
    return Finding(
        kind="exploding_gradients",
        severity=severity,
        first_step=step,
        last_step=int(steps[horizon - 1]) if horizon else step,
        layers=worst,
        summary=summary,
        evidence={
            "early_median_norm": base,
            "peak_norm": peak,
            "factor": peak / base if base > 0 else None,
            "threshold_factor": EXPLODE_FACTOR,
            "first_nonfinite_step": int(steps[first_bad]) if first_bad is not None else None,
            "max_update_ratio": float(np.nanmax(upd)) if np.isfinite(upd).any() else None,
            "sustained_rise_step": int(steps[rise]) if rise is not None else None,
            "threshold_crossing_step": int(steps[row]) if row is not None else None,
            "steps_seen": len(steps),
        },
        remedies=R.for_exploding(run),
    )


def _first_crossing(gnorm: np.ndarray) -> int | None:
    """The first step whose norm exceeds EXPLODE_FACTOR x the median of the finite norms before it
    (the first BASELINE_STEPS of them): a step is never judged against a baseline it is part of, so
    a norm that starts high and collapses (an output pinned at its first steps) is no explosion."""
    finite = np.isfinite(gnorm)
    seen: list[float] = []
    for t in range(gnorm.size):
        if len(seen) >= BASELINE_STEPS:
            base = float(np.median(seen))
            later = np.flatnonzero(finite[t:] & (gnorm[t:] > EXPLODE_FACTOR * base)) if base > 0 else np.zeros(0, int)
            return int(t + later[0]) if later.size else None
        if finite[t] and seen and np.median(seen) > 0 and gnorm[t] > EXPLODE_FACTOR * float(np.median(seen)):
            return t
        if finite[t]:
            seen.append(float(gnorm[t]))
    return None


def sustained_rise(gnorm: np.ndarray, loss: np.ndarray) -> int | None:
    """The first step at which the gradient norm has been rising exponentially for RISE_WINDOW
    steps: each of its RISE_BLOCKS consecutive blocks has a median at least RISE_BLOCK_FACTOR
    times the one before, the last block stands at RISE_MIN_LEVEL x the norm's median over the
    RISE_HISTORY steps before the window (a return to the usual level after a dip is no rise), and
    the loss did not improve over the window. Medians of blocks make single noisy batches harmless;
    requiring every block to rise, and a straight line to fit the log-norm, rules out one jump (a
    schedule restart, a transient spike) and a slow drift (warm-up). Decided causally: only steps up to
    the one flagged are read."""
    n = gnorm.size
    if n < RISE_WINDOW:
        return None
    size = RISE_WINDOW // RISE_BLOCKS
    g = np.where(np.isfinite(gnorm) & (gnorm > 0), gnorm, np.nan)
    med = np.asarray(nanmedian(np.lib.stride_tricks.sliding_window_view(g, size), axis=1), dtype=np.float64)
    starts = np.arange(0, n - RISE_WINDOW + 1)  # window [s, s + RISE_WINDOW)
    rising = np.ones(starts.size, bool)
    for b in range(1, RISE_BLOCKS):
        with np.errstate(invalid="ignore"):
            rising &= med[starts + b * size] >= RISE_BLOCK_FACTOR * med[starts + (b - 1) * size]
    last = med[starts + (RISE_BLOCKS - 1) * size]
    for k in np.flatnonzero(rising):
        st = int(starts[k])
        before = g[max(0, st - RISE_HISTORY) : st]
        before = before[np.isfinite(before)]
        level = float(np.median(before)) if before.size >= size else float(med[st])
        if not last[k] >= RISE_MIN_LEVEL * level:
            continue
        y = np.log(g[st : st + RISE_WINDOW])
        ok = np.isfinite(y)
        if ok.sum() < RISE_WINDOW // 2:
            continue
        x = np.arange(RISE_WINDOW)[ok]
        fit = np.polyfit(x, y[ok], 1)
        resid = y[ok] - np.polyval(fit, x)
        total = float(np.sum((y[ok] - y[ok].mean()) ** 2))
        if total <= 0 or 1 - float(np.sum(resid**2)) / total < RISE_R2:
            continue  # a jump or a spike at the end, not a steady exponential climb
        first_loss = loss[st : st + size]
        last_loss = loss[st + RISE_WINDOW - size : st + RISE_WINDOW]
        first_loss, last_loss = first_loss[np.isfinite(first_loss)], last_loss[np.isfinite(last_loss)]
        if first_loss.size and last_loss.size and np.median(last_loss) < (1 - RISE_LOSS_IMPROVEMENT) * np.median(first_loss):
            continue  # the loss is falling with it: learning, not diverging
        return st + RISE_WINDOW - 1
    return None


def _grew(gnorm: np.ndarray, factor: float) -> bool:
    finite = gnorm[np.isfinite(gnorm)]
    base = early_median(gnorm)
    return finite.size >= 2 and base > 0 and float(finite.max()) > factor * base


def _grew_into_nonfinite(gnorm: np.ndarray, first_bad: int) -> bool:
    prior = gnorm[:first_bad]
    prior = prior[np.isfinite(prior)]
    return prior.size >= 2 and prior[-1] > 10 * prior[0]


def _layer_growth(rms: np.ndarray) -> np.ndarray:
    if rms.shape[0] == 0:
        return np.full(rms.shape[1], np.nan)
    start = nanmedian(rms[: max(1, min(BASELINE_STEPS, rms.shape[0]))], axis=0)
    with np.errstate(all="ignore"):
        return np.nanmax(np.where(np.isfinite(rms), rms, np.nan), axis=0) / start
