"""One rule per pathology: a small pure function from a recorded run to a Finding (or None).

Every rule reads scale-free signals — gradient RMS relative to the last layer, growth over the
run's own early median, fractions, robust z-scores — because absolute thresholds are wrong by orders
of magnitude from one model to the next. Rules never import torch: they read a stored run.

Each threshold is a named constant with the reason it has that value.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from . import remedies as R
from .facts import (
    EXCLUDED_FROM_FLOW, SATURATING, Head, RunLike, autograd_node, early, first_stream, fmt, head, head_layers, last_part,
    nanmedian, output_mismatch, progress, sibling, streams, weight_layers,
)
from ..findings import Finding, Remedy

# ---------------------------------------------------------------------------------- thresholds

#: Gradient-flow profile: a layer receiving less than this fraction of the last weight layer's
#: gradient RMS is starved (the issue's example threshold; healthy ReLU/He and BN nets sit at 0.1–10).
VANISH_REL = 1e-2
#: With saturating activations (sigmoid, tanh) in the path the bar is lower: seed 000 calls its
#: 3-hidden-layer sigmoid net vanishing at ~5% of the output layer's gradient.
VANISH_REL_SATURATING = 0.1
#: ... and the input-side layer itself must get less than this share of the output layer's: a
#: profile whose input gets its full share (the real-code case: 1.21x, with 0.085x in one middle
#: layer) has a dip, not a gradient that vanishes toward the input. Seed 000's sigmoid net, which
#: the seed calls vanishing, has its input at 0.24x and its second layer at 0.085x.
VANISH_INPUT_MAX = 0.5
#: ... and below this it is an error: three orders of magnitude, nothing reaches the input side.
VANISH_REL_ERROR = 1e-3
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
#: Dead units: share of a layer's units whose gradient is exactly zero on every sampled step.
DEAD_FRACTION = 0.5
#: ... on at least this many sampled steps in a row, up to the end of the run.
DEAD_MIN_SAMPLES = 3
#: ... allowing single sampled steps down to this share of the threshold (a noisy batch).
DEAD_DIP = 0.8
_RELU_LIKE = (None, "ReLU", "ReLU6", "Hardtanh", "Threshold")  # None: a functional call we cannot see
#: Saturation: the median share of pre-activations beyond the activation's 0.99 point, early on.
SAT_FRACTION = 0.5
SAT_ERROR = 0.9
#: Loss spike: robust z-score (median / 1.4826·MAD over a trailing window) above this.
SPIKE_Z = 8.0
#: ... and it must undo at least this share of the progress made since the first steps, and at least
#: double the loss: a small jump on a loss that has flattened out is noise however many MADs
#: it spans.
SPIKE_UNDO = 0.25
SPIKE_WINDOW = 50
SPIKE_WARMUP = 20
#: A spike the loss recovers from within this many steps (median back within 3 robust SDs of its
#: level) is an outlier batch (a hard or mislabelled example late in training); when every spike is
#: one, the finding is info, not a warning: training itself is stable.
SPIKE_RECOVER = 10
#: Stalled: over at least this many steps, the loss improved by less than this fraction and
#: the updates are tiny (median update ratio below STALL_UPDATE; a healthy step is ~1e-3 of |w|).
#: Twenty steps hold a verdict: real runs are often that short (full batch, few epochs), and a
#: loss flat to 1% while the weights move by 1e-5 per step is flat however long one waits.
STALL_MIN_STEPS = 20
STALL_IMPROVEMENT = 0.01
STALL_UPDATE = 1e-5
#: No gradient: the share of the steps, from some step to the end of the run, whose gradients are
#: all exactly zero (one noisy step does not end it), over at least NO_GRADIENT_MIN_STEPS steps.
NO_GRADIENT_SHARE = 0.9
NO_GRADIENT_MIN_STEPS = 5
#: Layers that never get a gradient are an error when they hold this share of the weights, a
#: warning from UNGRADED_WARN_SHARE; a smaller unused part (a pooler a fine-tune does not use) is info.
UNGRADED_ERROR_SHARE = 0.5
UNGRADED_WARN_SHARE = 0.1
#: Dead units are an error when this share of a layer's units never fires.
DEAD_ERROR = 0.9
#: A saturating layer whose kernel gradient is exactly zero for this share of its entries is
#: saturated to float precision (tanh(x) == 1.0 in float32 for x > 9.01).
SAT_ZERO_GRAD = 0.9
#: The output layer is constant when this share of its units gives every sample one value.
OUTPUT_CONSTANT = 0.9
#: An output problem is an error when the loss improved by less than this over the run.
OUTPUT_STUCK_IMPROVEMENT = 0.1

_MAD_TO_SIGMA = 1.4826  # for normal data, sigma = 1.4826 * MAD

def _first(mask: np.ndarray) -> int | None:
    idx = np.flatnonzero(mask)
    return int(idx[0]) if idx.size else None


# ---------------------------------------------------------------------------------- nonfinite


def nonfinite(run: RunLike) -> Finding | None:
    """Where the first non-finite value came from: the loss (forward), the gradients while the
    loss was finite (backward), or weights that had already blown up (weights)."""
    steps = run.steps
    if len(steps) == 0:
        return None
    loss = run.step_series("loss")
    flags = np.nan_to_num(run.layer_series("grad_nonfinite"), nan=0.0) > 0
    bad_grad = flags.any(axis=1)
    logged = run.step_series("loss_logged")
    # Older runs lack the flag (NaN): there, a NaN before the first finite loss means "not logged".
    was_logged = np.where(np.isnan(logged), _after_first_logged(loss), logged > 0)
    bad_loss = ~np.isfinite(loss) & was_logged
    sampled = run.step_series("sampled") > 0
    bad_w = sampled & (~np.isfinite(run.layer_series("weight_norm"))).any(axis=1)
    t_grad, t_loss, t_w = _first(bad_grad), _first(bad_loss), _first(bad_w)
    candidates = [t for t in (t_grad, t_loss, t_w) if t is not None]
    if not candidates:
        return None
    row = min(candidates)
    gnorm = run.step_series("grad_norm")
    exploded_before = _exploded_before(gnorm, row)
    if t_w is not None and t_w <= row:
        origin = "weights"
    elif t_loss is not None and t_loss <= row:
        origin = "weights" if exploded_before else "forward"
    else:
        origin = "weights" if exploded_before else "backward"
    layer_ids = np.flatnonzero(flags[row]) if bad_grad[row] else np.array([], int)
    first_layer = run.layers[int(layer_ids[0])].name if layer_ids.size else None
    count = int((bad_grad | bad_loss).sum())
    step = int(steps[row])
    where = {
        "forward": ("the loss turned non-finite while the gradients before it were normal — look at the input data and the loss "
                    "(log of 0, division by 0)"),
        "backward": f"gradients turned non-finite while the loss was finite{f', first in {first_layer}' if first_layer else ''}",
        "weights": "the weights had already grown out of range (the gradient norm exploded before it)",
    }[origin]
    return Finding(
        kind="nonfinite",
        severity="error",
        first_step=step,
        last_step=int(steps[np.flatnonzero(bad_grad | bad_loss)[-1]]) if count else step,
        layers=[run.layers[int(i)].name for i in layer_ids[:20]],
        summary=f"nonfinite at step {step}: {where}.",
        evidence={
            "origin": origin,
            "first_step": step,
            "first_layer": first_layer,
            "nonfinite_steps": count,
            "loss_at_first": float(loss[row]),
            "grad_norm_before": float(gnorm[row - 1]) if row > 0 else None,
            "steps_seen": len(steps),
        },
        remedies=R.for_nonfinite(origin),
    )


def _after_first_logged(loss: np.ndarray) -> np.ndarray:
    """Steps from the first logged (finite) loss on: before it, NaN means "not logged"."""
    out = np.zeros(loss.shape, bool)
    first = _first(np.isfinite(loss))
    if first is not None:
        out[first:] = True
    return out


def _baseline(gnorm: np.ndarray) -> float:
    finite = gnorm[np.isfinite(gnorm)]
    if finite.size == 0:
        return math.nan
    return float(np.median(finite[:BASELINE_STEPS]))


def _exploded_before(gnorm: np.ndarray, row: int) -> bool:
    base = _baseline(gnorm[:row])
    prior = gnorm[:row][np.isfinite(gnorm[:row])]
    return bool(prior.size and math.isfinite(base) and base > 0 and prior.max() > EXPLODE_FACTOR * base)


# ---------------------------------------------------------------------------------- exploding


def exploding(run: RunLike) -> Finding | None:
    """The global gradient norm exceeds EXPLODE_FACTOR x its early median, or updates rewrite layers."""
    steps = run.steps
    gnorm = run.step_series("grad_norm").astype(np.float64)
    if len(steps) < 2:
        return None
    first_bad = _first(~np.isfinite(gnorm))
    horizon = first_bad if first_bad is not None else len(gnorm)
    base = _baseline(gnorm[:horizon])
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
    base = _baseline(gnorm)
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


# ---------------------------------------------------------------------------------- vanishing


def flow_profile(run: RunLike, rows: slice) -> tuple[list[int], np.ndarray]:
    """Weight layers of the first stream in the order they ran (input side first), and their median
    grad RMS over ``rows`` relative to the last of them (the output layer)."""
    ids = first_stream(run)
    if not ids:
        return [], np.zeros(0)
    rms = run.layer_series("grad_rms")[rows][:, ids]
    med = np.asarray(nanmedian(np.where(np.isfinite(rms), rms, np.nan), axis=0), dtype=np.float64)
    with np.errstate(all="ignore"):
        rel = med / med[-1]
    return ids, rel


def _no_gradient_rows(run: RunLike) -> np.ndarray:
    """Steps whose gradients are all exactly zero (finite global norm of 0)."""
    g = run.step_series("grad_norm").astype(np.float64)
    return np.isfinite(g) & (g == 0)


def _gradient_gone_from(run: RunLike) -> int | None:
    """The first row from which every gradient is exactly zero on at least NO_GRADIENT_SHARE of the
    steps to the end of the run (and on that row), over at least NO_GRADIENT_MIN_STEPS steps."""
    zero = _no_gradient_rows(run)
    n = zero.size
    if n == 0:
        return None
    # share of zero-gradient steps from each row to the end
    tail = np.cumsum(zero[::-1])[::-1] / np.arange(n, 0, -1)
    ok = zero & (tail >= NO_GRADIENT_SHARE) & (np.arange(n) <= n - min(NO_GRADIENT_MIN_STEPS, n))
    return _first(ok)


def no_gradient(run: RunLike) -> Finding | None:
    """Every gradient of every layer exactly zero, from the first step (or from some step to the
    end of the run): nothing can learn. The cause is named from the output layer and the loss (a
    softmax over one unit, an output pinned where the activation or the loss's clipping is flat),
    since a zero everywhere starts there."""
    n = len(run.steps)
    row = _gradient_gone_from(run)
    if row is None:
        return None
    zero = _no_gradient_rows(run)
    h = head(run)
    cause, sentence, first_fix = _zero_gradient_cause(run, h)
    steps_zero = int(zero[row:].sum())
    prog = progress(run)
    evidence: dict = {
        "cause": cause,
        "from_step": int(run.steps[row]),
        "zero_gradient_steps": steps_zero,
        "steps_seen": n,
        "loss_first": prog.first if prog else None,
        "loss_last": prog.last if prog else None,
    }
    if h is not None:
        evidence.update(output_layer=h.name, output_activation=h.activation or "linear", output_units=h.units,
                        loss=h.loss, output_saturated_fraction=h.saturated, output_dead_fraction=h.dead,
                        output_constant_fraction=h.constant)
    if cause in MISMATCH_CAUSES:  # the output/loss pair is the cause: its fix is the remedy
        remedies = [first_fix] if first_fix is not None else []
    else:
        remedies = ([first_fix] if first_fix is not None else []) + [
            r for r in R.for_no_gradient(h) if first_fix is None or r.action != first_fix.action]
    step = int(run.steps[row])
    span = (f"({steps_zero} of {n} steps)" if row == 0
            else f"from step {step} to the end ({steps_zero} of the last {n - row} steps)")
    return Finding(
        kind="vanishing_gradients",
        severity="error",
        first_step=step,
        last_step=int(run.steps[np.flatnonzero(zero)[-1]]),
        layers=[h.name] if h is not None else [],
        summary=f"vanishing_gradients from step {step}: every gradient of every layer is exactly zero {span}: {sentence}.",
        evidence=evidence,
        remedies=remedies,
    )


def ungraded_layers(run: RunLike) -> Finding | None:
    """Weight layers the optimizer holds that never receive a gradient (``.grad`` stays None on
    every step) while others do: the loss does not reach them — a detached output, a branch the
    forward never uses, parameters of another model handed to this optimizer."""
    n = len(run.steps)
    if n < NO_GRADIENT_MIN_STEPS:
        return None
    # grad_nonfinite is 0 or 1 wherever the layer had a gradient, NaN where .grad was None.
    present = np.isfinite(run.layer_series("grad_nonfinite"))
    ids = [i for ids in streams(run) for i in ids]
    never = [i for i in ids if not present[:, i].any()]
    if not never or not present.any():
        return None  # nothing recorded for any parameter: no gradient statistics to judge
    trained = [i for i, layer in enumerate(run.layers) if layer.trainable]
    share = sum(run.layers[i].numel for i in never) / max(1, sum(run.layers[i].numel for i in trained))
    names = [run.layers[i].name for i in never]
    upd = run.layer_series("update_ratio")[:, never]
    moved = bool(np.isfinite(upd).any() and np.nanmax(upd) > 0)
    return Finding(
        kind="vanishing_gradients",
        severity="error" if share >= UNGRADED_ERROR_SHARE else "warning" if share >= UNGRADED_WARN_SHARE else "info",
        first_step=int(run.steps[0]),
        last_step=int(run.steps[-1]),
        layers=names[:20],
        summary=(f"vanishing_gradients from step {int(run.steps[0])}: {len(never)} of {len(ids)} weight layers "
                 f"({share:.0%} of the trained parameters), first {names[0]}, never receive a gradient in {n} steps (their .grad "
                 "stays empty): the loss does not depend on them — a detached output (.detach(), .data, .numpy()), "
                 "a branch the forward does not use, or another model's parameters in this optimizer."),
        evidence={"cause": "no_gradient_path", "layers_without_gradient": names, "weight_share": share,
                  "steps_seen": n, "weights_moved": moved},
        remedies=[Remedy("check_graph", {"layers": names[:5]},
                         "find where the forward leaves autograd before these layers' output reaches the loss "
                         "(.detach(), .data, .item(), numpy round trips, torch.no_grad()).")],
    )


#: Causes that are an output layer and loss that cannot learn together (facts.output_mismatch).
MISMATCH_CAUSES = ("softmax_single_unit", "bounded_regression_output", "sigmoid_categorical",
                   "probability_loss_on_linear_output")


def _zero_gradient_cause(run: RunLike, h: Head | None) -> tuple[str, str, Remedy | None]:
    """(cause, sentence, remedy that fixes it) for a run without any gradient."""
    if h is None:
        return "unknown", "the loss does not depend on the trained weights", None
    mismatch = output_mismatch(h)
    if mismatch is not None:
        return mismatch.cause, mismatch.sentence, Remedy(*mismatch.remedy)
    act = h.activation or "linear"
    if math.isfinite(h.saturated) and h.saturated >= SAT_FRACTION:
        return ("output_saturated",
                f"the output layer {h.describe()} sits where {act} is flat for {h.saturated:.0%} of its outputs",
                Remedy("scale_inputs", {"method": "standardize"},
                       f"inputs (or weights) that large push the output's {act} into its flat tails; standardise them."))
    if act in ("ReLU", "ReLU6") and math.isfinite(h.dead) and h.dead >= DEAD_FRACTION:
        return ("output_never_positive",
                f"the output layer {h.describe()} is never positive, so its ReLU passes nothing back",
                Remedy("change_output", {"activation": "linear"},
                       "a ReLU output that is never positive has no gradient; use a linear output."))
    if math.isfinite(h.constant) and h.constant >= OUTPUT_CONSTANT:
        return ("output_constant",
                f"the output layer {h.describe()} gives every sample the same value",
                None)
    if h.family in ("binary", "categorical") and not h.logits:
        torch_loss = autograd_node(h.loss)
        fix = (Remedy("change_loss", {"to": "BCEWithLogitsLoss" if h.family == "binary" else "CrossEntropyLoss"},
                      "a prediction of exactly 0 or 1 has no gradient through the loss; drop the final sigmoid/softmax "
                      "and use the loss that takes logits.") if torch_loss else
               Remedy("change_loss", {"from_logits": True},
                      "a clipped prediction has no gradient; compute the loss from logits."))
        return ("loss_clipping",
                f"the loss ({h.loss}) gets predictions of exactly 0 or 1 from {h.describe()} and passes nothing back there",
                fix)
    loss = f" ({h.loss})" if h.loss else ""
    return ("loss_detached", f"the loss{loss} does not depend on the trained weights (detached output, or a constant loss)", None)


def vanishing(run: RunLike) -> Finding | None:
    """The gradient-flow profile, in execution order: the input-side layer gets < VANISH_REL of the
    output layer's gradient RMS early in training (the first EARLY_STEPS steps, or all of a shorter
    run), with gradients that are small but not exactly zero. A dip in the middle of a profile whose
    input side gets its full share is said as info: the gradient still reaches the input."""
    n = len(run.steps)
    if n < 2:
        return None
    if _no_gradient_rows(run)[0]:
        return None  # no gradient at all: no_gradient() says why
    window = early(run)
    ids, rel = flow_profile(run, window)
    if len(ids) < 2 or not np.isfinite(rel[:-1]).any():
        return None
    out = ids[-1]
    # Saturating activations in the hidden path lower the bar; the output's own sigmoid or softmax
    # is how it makes probabilities, not a layer the gradient must cross.
    saturating = [run.layers[i].activation for i in ids[:-1] if run.layers[i].activation in SATURATING]
    threshold = VANISH_REL_SATURATING if saturating else VANISH_REL
    # Gradients that are exactly zero are dead or fully saturated units, not vanishing ones.
    zero = np.atleast_1d(np.asarray(nanmedian(run.layer_series("grad_zero_frac")[window][:, ids], axis=0), dtype=np.float64))
    exact_zero = {i for i, z in zip(ids, zero) if math.isfinite(z) and z > 0.9}
    starved = [(i, float(r)) for i, r in zip(ids[:-1], rel[:-1]) if math.isfinite(r) and r < threshold and i not in exact_zero]
    if not starved:
        return None
    first, first_rel = next(((i, float(r)) for i, r in zip(ids[:-1], rel[:-1])
                             if i not in exact_zero and math.isfinite(r)), (None, math.nan))
    if first is None:
        return None
    worst_i, worst = min(starved, key=lambda t: t[1])
    ref = run.layers[out].name
    name = lambda i: run.layers[i].name  # noqa: E731
    profile = {name(i): float(r) for i, r in zip(ids, rel)}
    steps_seen = window.stop
    evidence = {
        "profile": profile,
        "reference_layer": ref,
        "input_layer": name(first),
        "input_relative_rms": first_rel,
        "worst_layer": name(worst_i),
        "worst_relative_rms": worst,
        "threshold": threshold,
        "window_steps": [int(run.steps[0]), int(run.steps[window][-1])],
        "steps_seen": steps_seen,
        "saturating_activations": len(saturating),
        "depth": len(ids),
        "order": "execution" if _has_execution_order(run) else "layer table",
    }
    if first_rel >= VANISH_INPUT_MAX:
        # The input side gets its share: a dip in the middle is not vanishing toward the input.
        return Finding(
            kind="vanishing_gradients",
            severity="info",
            first_step=int(run.steps[0]),
            last_step=int(run.steps[window][-1]),
            layers=[name(i) for i, _ in starved],
            summary=(f"a dip in the gradient-flow profile, not vanishing: {name(worst_i)} gets {fmt(worst)}x the gradient RMS "
                     f"of {ref} (threshold {threshold:g}), but the input-side layer {name(first)} gets {fmt(first_rel)}x, "
                     f"so the gradient reaches the input (first {steps_seen} steps)."),
            evidence={**evidence, "harmless": f"the input-side layer gets {fmt(first_rel)}x the output layer's gradient RMS "
                                              f"(at least {VANISH_INPUT_MAX:g}x)"},
            remedies=[],
        )
    detail = f"; {len(saturating)} hidden layers use {'/'.join(sorted(set(saturating)))}" if saturating else ""
    sat = run.layer_series("act_sat_frac")[window][:, ids[:-1]]
    sat_med = np.asarray(nanmedian(sat, axis=0), dtype=np.float64)
    mean_sat = float(np.nanmean(sat_med)) if np.isfinite(sat_med).any() else math.nan
    if math.isfinite(mean_sat) and mean_sat >= 0.05:  # below that, saturation is not the story
        detail += f", {mean_sat:.0%} of their pre-activations saturated"
    if worst_i == first:
        said = (f"the input-side layer {name(first)} gets {fmt(first_rel)}x the gradient RMS of the output layer {ref} "
                f"(threshold {threshold:g})")
    else:
        said = (f"{name(worst_i)} gets {fmt(worst)}x the gradient RMS of the output layer {ref} (threshold {threshold:g}), "
                f"and the input-side layer {name(first)} {fmt(first_rel)}x")
    evidence["mean_saturated_fraction"] = mean_sat
    return Finding(
        kind="vanishing_gradients",
        severity="error" if worst < VANISH_REL_ERROR else "warning",
        first_step=int(run.steps[0]),
        last_step=int(run.steps[window][-1]),
        layers=[name(i) for i, _ in starved],
        summary=f"vanishing_gradients in the first {steps_seen} steps: {said}{detail}.",
        evidence=evidence,
        remedies=R.for_vanishing(run, saturating),
    )


def _has_execution_order(run: RunLike) -> bool:
    return any(s.get("execution_order") for s in (getattr(run, "streams", None) or []) if isinstance(s, dict))


# ---------------------------------------------------------------------------------- dead units


def dead_units(run: RunLike) -> Finding | None:
    """Units whose gradient is exactly zero on every sampled step from some step to the end: they
    stopped activating (dead from the start, or killed by a large step) and never came back.

    Read from the zero fraction of each layer's bias gradient (a ReLU unit that never fires gets a
    zero bias gradient), or of its weight gradient when it has no bias.
    """
    if len(run.steps) < 2 or _no_gradient_rows(run)[0]:
        return None  # no gradient anywhere: no_gradient() says why, and the units are not the cause
    zero = run.layer_series("grad_zero_frac")
    act_dead = run.layer_series("act_dead_frac")
    heads = head_layers(run)
    tapped = _tapped_layers(run, act_dead)
    names = {layer.name for layer in run.layers}
    dead: dict[str, tuple[float, int]] = {}
    for i, layer in enumerate(run.layers):
        if not layer.trainable or layer.module_type in EXCLUDED_FROM_FLOW or layer.numel < 2 or layer.name in heads:
            continue
        if layer.activation not in _RELU_LIKE:
            continue
        # Two witnesses: units whose pre-activation is never positive (forward hooks), and exact
        # zeros in the bias gradient (or weight gradient without a bias), which say per unit.
        candidates = [_sustained(act_dead[:, i], DEAD_FRACTION)]
        has_bias = sibling(layer.name, "bias") in names
        if not (len(layer.shape) >= 2 and has_bias) and not (
                {layer.name, sibling(layer.name, "weight"), sibling(layer.name, "kernel")} & tapped):
            # Zero bias gradients say "no gradient reaches these units", which is also what units
            # that fire see when every unit above them is dead: where the forward hooks measured
            # the layer, they alone say whether its units fire.
            candidates.append(_sustained(zero[:, i], DEAD_FRACTION))
        found = [c for c in candidates if c is not None]
        if found:
            frac, row = max(found, key=lambda c: c[0])
            name = layer.name
            if last_part(name) == "bias":
                name = next((n for n in (sibling(name, "weight"), sibling(name, "kernel")) if n in names), name)
            if name not in dead or frac > dead[name][0]:
                dead[name] = (frac, row)
    if not dead:
        return None
    names = sorted(dead, key=lambda k: (dead[k][1], -dead[k][0]))
    worst = max(v[0] for v in dead.values())
    first_row = min(v[1] for v in dead.values())
    severity = "error" if worst >= DEAD_ERROR else "warning"
    evidence = {"dead_fraction": {k: v[0] for k, v in dead.items()}, "threshold": DEAD_FRACTION,
                "since_step": {k: int(run.steps[v[1]]) for k, v in dead.items()}, "steps_seen": len(run.steps)}
    summary = (f"dead_units from step {int(run.steps[first_row])}: {dead[names[0]][0]:.0%} of the units of "
               f"{names[0]} never receive a gradient again (exactly zero on every sampled step: they never activate)")
    prog = progress(run)
    if severity == "warning" and prog is not None and prog.training_well:
        # Units left over carry the model: a true fact, not what is hurting this run.
        severity = "info"
        evidence["harmless"] = f"{prog.sentence()} with {1 - worst:.0%} or more of each layer's units active"
        summary += f"; harmless so far: {prog.sentence()}"
    return Finding(
        kind="dead_units",
        severity=severity,
        first_step=int(run.steps[first_row]),
        last_step=int(run.steps[-1]),
        layers=names,
        summary=summary + ".",
        evidence=evidence,
        remedies=R.for_dead_units(),
    )


def _tapped_layers(run: RunLike, act_dead: np.ndarray) -> set[str]:
    """Names of the weight layers whose units the activation tap measured."""
    measured = np.isfinite(act_dead).any(axis=0) if act_dead.size else np.zeros(len(run.layers), bool)
    return {layer.name for i, layer in enumerate(run.layers) if len(layer.shape) >= 2 and measured[i]}


def _sustained(col: np.ndarray, threshold: float) -> tuple[float, int] | None:
    """(median, first row) of the final stretch of computed values that stays at or above
    DEAD_DIP x threshold with a median at or above threshold, if it has at least DEAD_MIN_SAMPLES
    values: true from some step to the end of the run (one noisy batch does not end it)."""
    rows = np.flatnonzero(np.isfinite(col))
    if rows.size < DEAD_MIN_SAMPLES:
        return None
    z = col[rows]
    below = np.flatnonzero(z < DEAD_DIP * threshold)
    start = int(below[-1]) + 1 if below.size else 0
    if rows.size - start < DEAD_MIN_SAMPLES:
        return None
    med = float(np.median(z[start:]))
    return (med, int(rows[start])) if med >= threshold else None


# ---------------------------------------------------------------------------------- saturation


def saturated_units(run: RunLike) -> Finding | None:
    """Hidden sigmoid/tanh layers whose pre-activations sit in the flat tails for most of the batch,
    early on (forward hooks on sampled steps), or whose kernel gradients are exactly zero because
    the tails are flat to float precision: their derivative is ~0 there, so gradients fade. The
    output layer is judged by output_layer()."""
    n = len(run.steps)
    if n < 1:
        return None
    window = early(run)
    heads = head_layers(run)
    sat = np.asarray(nanmedian(run.layer_series("act_sat_frac")[window], axis=0), dtype=np.float64)
    zero = np.asarray(nanmedian(run.layer_series("grad_zero_frac")[window], axis=0), dtype=np.float64)
    hit: dict[str, float] = {}
    flat: dict[str, float] = {}
    for i in weight_layers(run):
        layer = run.layers[i]
        if layer.name in heads:
            continue
        if math.isfinite(sat[i]) and sat[i] >= SAT_FRACTION:
            hit[layer.name] = float(sat[i])
        elif layer.activation in SATURATING and math.isfinite(zero[i]) and zero[i] >= SAT_ZERO_GRAD:
            hit[layer.name] = float(zero[i])  # flat to float precision: the gradient itself is zero
            flat[layer.name] = float(zero[i])
    if not hit:
        return None
    names = sorted(hit, key=lambda k: -hit[k])
    acts = sorted({run.layers[run.layer_index(k)].activation or "?" for k in names}) if hasattr(run, "layer_index") else []
    worst = hit[names[0]]
    how = (f"{worst:.0%} of the kernel gradient of {names[0]} is exactly zero: its "
           f"{'/'.join(acts) or 'activation'} is flat to float precision" if names[0] in flat else
           f"{worst:.0%} of the pre-activations of {names[0]} sit where {'/'.join(acts) or 'the activation'} is flat "
           "(|x| beyond the 0.99 point)")
    severity = "error" if worst >= SAT_ERROR else "warning"
    evidence: dict = {"saturated_fraction": hit, "threshold": SAT_FRACTION, "steps_seen": window.stop}
    if flat:
        evidence["zero_gradient_fraction"] = flat
    prog = progress(run)
    summary = (f"saturated_units in the first {window.stop} steps: {how}"
               f"{f'; {len(names)} layers are at least {SAT_FRACTION:.0%} saturated' if len(names) > 1 else ''}")
    if severity == "warning" and prog is not None and prog.training_well:
        severity = "info"
        evidence["harmless"] = prog.sentence()
        summary += f"; harmless so far: {prog.sentence()}"
    return Finding(
        kind="saturated_units",
        severity=severity,
        first_step=int(run.steps[0]),
        last_step=int(run.steps[window.stop - 1]),
        layers=names,
        summary=summary + ".",
        evidence=evidence,
        remedies=R.for_saturation(acts, first_layer=names[0] == _first_weight_name(run)),
    )


def _first_weight_name(run: RunLike) -> str | None:
    ids = first_stream(run)
    return run.layers[ids[0]].name if ids else None


# ---------------------------------------------------------------------------------- the output layer


def output_layer(run: RunLike) -> Finding | None:
    """What the output layer does: saturated (its sigmoid/softmax/tanh pinned at the flat ends),
    never positive (a ReLU output), or an output/loss pair that cannot learn (a softmax over one
    unit, a bounded output for regression, sigmoids with categorical cross-entropy). Reported with
    its numbers and the remedy for the cause first; harmless (info) while the loss falls well. In a
    run without any gradient it says only what its units show (saturated, never positive): the
    no-gradient finding gives the cause."""
    n = len(run.steps)
    if n < 2:
        return None
    h = head(run)
    if h is None:
        return None
    no_gradient_at_all = bool(_no_gradient_rows(run)[0])
    mismatch = output_mismatch(h)
    prog = progress(run)
    act = h.activation or "linear"
    symptoms = []
    kind = None
    if math.isfinite(h.saturated) and h.saturated >= SAT_FRACTION:
        symptoms.append(f"{h.saturated:.0%} of its outputs sit where {act} is flat")
        kind = "saturated_units"
    if act in ("ReLU", "ReLU6") and math.isfinite(h.dead) and h.dead >= DEAD_FRACTION:
        symptoms.append(f"{h.dead:.0%} of its units are never positive over a batch")
        kind = kind or "dead_units"
    if math.isfinite(h.constant) and h.constant >= OUTPUT_CONSTANT:
        symptoms.append(f"{h.constant:.0%} of its units give every sample the same value")
    stuck = prog is not None and math.isfinite(prog.improvement) and prog.improvement < OUTPUT_STUCK_IMPROVEMENT
    if not symptoms and not (mismatch is not None and stuck):
        return None
    if no_gradient_at_all and kind is None:
        return None  # no_gradient() already says what the output does
    if kind is None:
        kind = "stalled_training" if stuck or mismatch is not None else None
    if kind is None:
        return None  # constant units alone, while the loss moves: nothing to say
    parts = ([mismatch.sentence] if mismatch is not None else []) + symptoms
    evidence: dict = {
        "output_layer": h.name, "output_activation": act, "output_units": h.units, "loss": h.loss,
        "output_saturated_fraction": h.saturated, "output_dead_fraction": h.dead, "output_constant_fraction": h.constant,
        "cause": mismatch.cause if mismatch is not None else None, "steps_seen": n,
    }
    if prog is not None:
        evidence.update(loss_first=prog.first, loss_last=prog.last, improvement=prog.improvement)
    if prog is not None and prog.training_well:
        severity = "info"
        evidence["harmless"] = prog.sentence()
        tail = f"; harmless so far: {prog.sentence()}"
    else:
        severity = "error" if stuck else "warning"
        tail = f"; {prog.sentence()}" if prog is not None else ""
    window = early(run)
    return Finding(
        kind=kind,
        severity=severity,
        first_step=int(run.steps[0]),
        last_step=int(run.steps[window.stop - 1]) if kind != "stalled_training" else int(run.steps[-1]),
        layers=[h.name],
        summary=f"{kind} at the output layer {h.describe()}: {'; '.join(parts)}{tail}.",
        evidence=evidence,
        remedies=R.for_output(h, mismatch),
    )


# ---------------------------------------------------------------------------------- loss spikes


def loss_spike(run: RunLike) -> Finding | None:
    """Finite loss values far above their trailing window (robust z-score), after a warm-up."""
    loss = run.step_series("loss").astype(np.float64)
    n = len(loss)
    if n <= SPIKE_WARMUP + 5:
        return None
    start_level = float(nanmedian(loss[:SPIKE_WARMUP]))
    clean = np.where(np.isfinite(loss), loss, np.nan)
    # Row t of `windows` is loss[t - SPIKE_WINDOW : t] (NaN-padded at the start), all at once.
    windows = np.lib.stride_tricks.sliding_window_view(
        np.concatenate([np.full(SPIKE_WINDOW, np.nan), clean]), SPIKE_WINDOW
    )[:n]
    enough = np.sum(np.isfinite(windows), axis=1) >= SPIKE_WARMUP
    med = np.asarray(nanmedian(windows, axis=1), dtype=np.float64)
    mad = np.asarray(nanmedian(np.abs(windows - med[:, None]), axis=1), dtype=np.float64) * _MAD_TO_SIGMA
    scale = np.maximum(mad, 1e-12 * np.maximum(np.abs(med), 1e-30))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (clean - med) / scale
        progress = start_level - med
        floor = np.where(progress > 0, np.maximum(med + SPIKE_UNDO * progress, 2 * med), 2 * med)
        hit = enough & np.isfinite(clean) & (z > SPIKE_Z) & (clean > floor)
    hit[:SPIKE_WARMUP] = False
    spikes = [(int(t), float(z[t])) for t in np.flatnonzero(hit)]
    if not spikes:
        return None
    t0, z0 = spikes[0]
    top = max(spikes, key=lambda s: s[1])

    def recovered(t: int) -> bool:
        after = clean[t + 1 : t + 1 + SPIKE_RECOVER]
        after = after[np.isfinite(after)]
        return after.size >= 3 and float(np.median(after)) <= med[t] + 3 * scale[t]

    isolated = all(recovered(t) for t, _ in spikes)
    return Finding(
        kind="loss_spike",
        severity="info" if isolated else "warning",
        first_step=int(run.steps[t0]),
        last_step=int(run.steps[spikes[-1][0]]),
        layers=[],
        summary=(
            f"loss_spike at step {int(run.steps[t0])}: the loss jumped to {fmt(float(loss[t0]))}, "
            f"{z0:.0f} robust standard deviations above the previous {SPIKE_WINDOW} steps "
            f"({len(spikes)} spike step{'s' if len(spikes) > 1 else ''})"
            + ("; each time the loss was back at its level right after: outlier batches, not unstable training."
               if isolated else ".")
        ),
        evidence={
            "spike_steps": [int(run.steps[t]) for t, _ in spikes[:50]],
            "max_z": float(top[1]),
            "threshold_z": SPIKE_Z,
            "recovered_at_once": isolated,
            "steps_seen": n,
        },
        remedies=R.for_loss_spike(),
    )


# ---------------------------------------------------------------------------------- stalled


def stalled(run: RunLike) -> Finding | None:
    """The loss does not improve over the run (at least STALL_MIN_STEPS steps) and the updates are
    vanishingly small: a tiny learning rate, or nothing to learn from."""
    loss = run.step_series("loss").astype(np.float64)
    n = len(loss)
    prog = progress(run)
    if n < STALL_MIN_STEPS or prog is None or not math.isfinite(prog.improvement):
        return None
    upd = run.layer_series("update_ratio")[:, weight_layers(run)]
    med_upd = float(nanmedian(upd[np.isfinite(upd)])) if np.isfinite(upd).any() else math.nan
    zero = float(_no_gradient_rows(run).mean())
    if prog.improvement >= STALL_IMPROVEMENT:
        return None
    if not ((math.isfinite(med_upd) and med_upd < STALL_UPDATE) or zero >= NO_GRADIENT_SHARE):
        return None
    moved = f"the median update changed the weights by {fmt(med_upd)} of their norm" if math.isfinite(med_upd) else \
        "the gradients were exactly zero"
    return Finding(
        kind="stalled_training",
        severity="warning",
        first_step=int(run.steps[0]),
        last_step=int(run.steps[-1]),
        layers=[],
        summary=(f"stalled_training: over {n} steps the loss moved from {fmt(prog.first)} to {fmt(prog.last)} "
                 f"({-prog.improvement:+.2%}) while {moved}."),
        evidence={"loss_first": prog.first, "loss_last": prog.last, "improvement": prog.improvement,
                  "median_update_ratio": med_upd, "steps_seen": n, "zero_gradient_share": zero},
        remedies=R.for_stalled(),
    )


RULES = (nonfinite, exploding, no_gradient, ungraded_layers, vanishing, dead_units, saturated_units, output_layer, loss_spike,
         stalled)


def run_rules(run: RunLike, rules: Sequence = RULES) -> list[Finding]:
    out = []
    for rule in rules:
        f = rule(run)
        if f is not None:
            out.append(f)
    # A stall the output layer explains (a constant output, an output/loss pair that cannot learn)
    # is said once, with its cause, not again as a bare flat loss.
    # A stall the output layer or a missing gradient explains (a constant output, an output/loss
    # pair that cannot learn, no gradient at all) is said once, with its cause, not again as a bare
    # flat loss whose remedy (a larger lr) cannot help.
    explained = any(f.kind == "stalled_training" and f.layers for f in out) or any(
        f.kind == "vanishing_gradients" and f.evidence.get("cause") and f.severity == "error" for f in out)
    if explained:
        out = [f for f in out if not (f.kind == "stalled_training" and not f.layers)]
    return out
