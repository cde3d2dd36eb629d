"""One rule per pathology: a small pure function from a recorded run to a Finding (or None).

Every rule reads scale-free signals — gradient RMS relative to the last layer, growth over the
run's own early median, fractions, robust z-scores — because absolute thresholds are wrong by orders
of magnitude from one model to the next. Rules never import torch: they read a stored run.

Each threshold is a named constant with the reason it has that value.
"""

from __future__ import annotations

import math
import warnings
from typing import Protocol, Sequence

import numpy as np

from ..store import LayerInfo
from . import remedies as R
from .finding import Finding

# ---------------------------------------------------------------------------------- thresholds

#: Gradient-flow profile: a layer receiving less than this fraction of the last weight layer's
#: gradient RMS is starved (the issue's example threshold; healthy ReLU/He and BN nets sit at 0.1–10).
VANISH_REL = 1e-2
#: With saturating activations (sigmoid, tanh) in the path the bar is lower: seed 000 calls its
#: 3-hidden-layer sigmoid net vanishing at ~5% of the output layer's gradient.
VANISH_REL_SATURATING = 0.1
#: ... and below this it is an error: three orders of magnitude, nothing reaches the input side.
VANISH_REL_ERROR = 1e-3
#: Steps that make the "early" window in which vanishing and dead units must be caught.
EARLY_STEPS = 100
#: Explosion: the global gradient norm exceeds its own early median by this factor.
EXPLODE_FACTOR = 100.0
#: Steps whose median is the explosion baseline (the first ones with a finite norm).
BASELINE_STEPS = 10
#: Update ratio ‖Δw‖/‖w‖ above which a step rewrites a layer wholesale (rule of thumb is ~1e-3).
UPDATE_RATIO_EXPLODE = 1.0
#: ... counted only if the gradient norm also grew this much (or turned non-finite).
UPDATE_GATE_GROWTH = 10.0
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
#: the updates are tiny (median update ratio below STALL_UPDATE).
STALL_MIN_STEPS = 200
STALL_IMPROVEMENT = 0.01
STALL_UPDATE = 1e-5

_MAD_TO_SIGMA = 1.4826  # for normal data, sigma = 1.4826 * MAD

_EXCLUDED_FROM_FLOW = ("Embedding", "EmbeddingBag")
_SATURATING = ("Sigmoid", "Tanh", "Hardsigmoid", "Hardtanh", "Softsign", "LogSigmoid")  # sparse rows: their RMS is not comparable


class RunLike(Protocol):
    layers: list[LayerInfo]
    steps: np.ndarray

    def step_series(self, name: str) -> np.ndarray: ...

    def layer_series(self, name: str) -> np.ndarray: ...


def _nanmedian(x: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: not computed there
        return np.nanmedian(x, axis=axis)


def _first(mask: np.ndarray) -> int | None:
    idx = np.flatnonzero(mask)
    return int(idx[0]) if idx.size else None


def _split_name(name: str) -> tuple[str, str]:
    """``("encoder.0", "weight")`` from ``encoder.0.weight``; Keras paths split at "/"
    (``sequential/dense/kernel``)."""
    cut = max(name.rfind("."), name.rfind("/"))
    return (name[:cut], name[cut:]) if cut >= 0 else ("", name)


def _last(name: str) -> str:
    return _split_name(name)[1].lstrip("./")


def _sibling(name: str, last: str) -> str:
    prefix, tail = _split_name(name)
    return f"{prefix}{tail[:1]}{last}" if prefix else last


def weight_layers(run: RunLike) -> list[int]:
    """Weight matrices and kernels (``*.weight``, ``weight_ih_l0``, Keras ``*/kernel``...): what
    carries the gradient flow. Embedding tables and free parameters (positional tables, scales)
    are left out."""
    return [
        i for i, l in enumerate(run.layers)
        if len(l.shape) >= 2 and l.trainable and l.module_type not in _EXCLUDED_FROM_FLOW and l.numel > 0
        and ("weight" in _last(l.name) or "kernel" in _last(l.name))
    ]


def _output_layers(run: RunLike) -> set[str]:
    """Each optimizer's last weight layer and its bias: the head, whose units are not activations."""
    out: set[str] = set()
    for ids in _streams(run):
        name = run.layers[ids[-1]].name
        out |= {name, _sibling(name, "bias")}
    return out


def _streams(run: RunLike) -> list[list[int]]:
    """Weight-layer indices per optimizer stream, in model order."""
    by: dict[int, list[int]] = {}
    for i in weight_layers(run):
        by.setdefault(run.layers[i].stream, []).append(i)
    return [ids for _, ids in sorted(by.items())]


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
        "forward": "the loss turned non-finite while the gradients before it were normal — look at the input data and the loss (log of 0, division by 0)",
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
    row = None
    if math.isfinite(base) and base > 0:
        row = _first(np.isfinite(gnorm[:horizon]) & (gnorm[:horizon] > EXPLODE_FACTOR * base))
    # Weight matrices only: a zero-initialised bias has |w| = 0 and an infinite ratio on step 0.
    upd = run.layer_series("update_ratio")[:horizon][:, weight_layers(run)]
    with np.errstate(invalid="ignore"):
        big_update = np.isfinite(upd) & (np.nan_to_num(upd, nan=0.0) > UPDATE_RATIO_EXPLODE)
    upd_row = _first(big_update.any(axis=1)) if big_update.size else None
    # With Adam/RMSprop a too-large lr alone gives huge update ratios whatever the gradient: count
    # them as an explosion only when the gradients also grew or went non-finite.
    if upd_row is not None and first_bad is None and not _grew(gnorm, UPDATE_GATE_GROWTH):
        upd_row = None
    if row is None and upd_row is None:
        # A jump straight from normal to non-finite with growth on the way is an explosion too.
        if first_bad is not None and _grew_into_nonfinite(gnorm, first_bad):
            row = first_bad
        else:
            return None
    rows = [r for r in (row, upd_row) if r is not None]
    at = min(rows)
    peak = float(np.nanmax(np.where(np.isfinite(gnorm[: max(horizon, 1)]), gnorm[: max(horizon, 1)], np.nan))) if horizon else math.nan
    layer_rms = run.layer_series("grad_rms")
    layer_growth = _layer_growth(layer_rms[: max(at + 1, 1)])
    worst = [run.layers[i].name for i in np.argsort(-np.nan_to_num(layer_growth, nan=-1.0))[:3] if np.isfinite(layer_growth[i])]
    severity = "error" if first_bad is not None else "warning"
    step = int(steps[at])
    summary = (
        f"exploding_gradients at step {step}: the global gradient norm reached "
        f"{_f(peak)}, {_f(peak / base) if base > 0 else '?'}x its early median {_f(base)} (threshold {EXPLODE_FACTOR:g}x)"
        + (f"; it turned non-finite at step {int(steps[first_bad])}" if first_bad is not None else "")
        + "."
    )
    if upd_row is not None and (row is None or upd_row < row):
        summary = (f"exploding_gradients at step {step}: one update changed a layer by more than "
                   f"{UPDATE_RATIO_EXPLODE:g}x its own norm (|dw|/|w|; a healthy step is ~1e-3).")
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
        },
        remedies=R.for_exploding(run),
    )


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
    start = _nanmedian(rms[: max(1, min(BASELINE_STEPS, rms.shape[0]))], axis=0)
    with np.errstate(all="ignore"):
        return np.nanmax(np.where(np.isfinite(rms), rms, np.nan), axis=0) / start


# ---------------------------------------------------------------------------------- vanishing


def flow_profile(run: RunLike, rows: slice) -> tuple[list[int], np.ndarray]:
    """Weight layers of the first stream in model order, and their median grad RMS over ``rows``
    relative to the last of them."""
    streams = _streams(run)
    if not streams:
        return [], np.zeros(0)
    ids = streams[0]
    rms = run.layer_series("grad_rms")[rows][:, ids]
    med = np.asarray(_nanmedian(np.where(np.isfinite(rms), rms, np.nan), axis=0), dtype=np.float64)
    with np.errstate(all="ignore"):
        rel = med / med[-1]
    return ids, rel


def vanishing(run: RunLike) -> Finding | None:
    """The gradient-flow profile: the input-side layers get < VANISH_REL of the last layer's RMS,
    early in training (the first EARLY_STEPS steps), with gradients that are small but not zero."""
    n = len(run.steps)
    if n < 2:
        return None
    early = slice(0, min(EARLY_STEPS, n))
    ids, rel = flow_profile(run, early)
    if len(ids) < 2 or not np.isfinite(rel[:-1]).any():
        return None
    acts = [run.layers[i].activation for i in ids if run.layers[i].activation]
    saturating = [a for a in acts if a in _SATURATING]
    threshold = VANISH_REL_SATURATING if saturating else VANISH_REL
    starved = [i for i, r in zip(ids[:-1], rel[:-1]) if math.isfinite(r) and r < threshold]
    if not starved:
        return None
    # Gradients that are exactly zero are dead units, not vanishing ones.
    zero = _nanmedian(run.layer_series("grad_zero_frac")[early][:, starved], axis=0)
    starved = [i for i, z in zip(starved, np.atleast_1d(zero)) if not (math.isfinite(z) and z > 0.9)]
    if not starved:
        return None
    first = ids[0]
    worst = float(np.nanmin(rel[:-1]))
    severity = "error" if worst < VANISH_REL_ERROR else "warning"
    ref = run.layers[ids[-1]].name
    detail = f"; {len(saturating)} layers use {'/'.join(sorted(set(saturating)))}" if saturating else ""
    sat = run.layer_series("act_sat_frac")[early][:, ids]
    sat_med = np.asarray(_nanmedian(sat, axis=0), dtype=np.float64)
    mean_sat = float(np.nanmean(sat_med)) if np.isfinite(sat_med).any() else math.nan
    if math.isfinite(mean_sat) and mean_sat >= 0.05:  # below that, saturation is not the story
        detail += f", {mean_sat:.0%} of their pre-activations saturated"
    return Finding(
        kind="vanishing_gradients",
        severity=severity,
        first_step=int(run.steps[0]),
        last_step=int(run.steps[early][-1]),
        layers=[run.layers[i].name for i in starved],
        summary=(
            f"vanishing_gradients in the first {early.stop} steps: layer {run.layers[first].name} gets "
            f"{_f(float(rel[0]))}x the gradient RMS of {ref} (threshold {threshold:g}){detail}."
        ),
        evidence={
            "profile": {run.layers[i].name: float(r) for i, r in zip(ids, rel)},
            "reference_layer": ref,
            "threshold": threshold,
            "window_steps": [int(run.steps[0]), int(run.steps[early][-1])],
            "saturating_activations": len(saturating),
            "mean_saturated_fraction": mean_sat,
            "depth": len(ids),
        },
        remedies=R.for_vanishing(run, saturating),
    )


# ---------------------------------------------------------------------------------- dead units


def dead_units(run: RunLike) -> Finding | None:
    """Units whose gradient is exactly zero on every sampled step from some step to the end: they
    stopped activating (dead from the start, or killed by a large step) and never came back.

    Read from the zero fraction of each layer's bias gradient (a ReLU unit that never fires gets a
    zero bias gradient), or of its weight gradient when it has no bias.
    """
    if len(run.steps) < 2:
        return None
    zero = run.layer_series("grad_zero_frac")
    act_dead = run.layer_series("act_dead_frac")
    head = _output_layers(run)
    dead: dict[str, tuple[float, int]] = {}
    for i, layer in enumerate(run.layers):
        if not layer.trainable or layer.module_type in _EXCLUDED_FROM_FLOW or layer.numel < 2 or layer.name in head:
            continue
        if layer.activation not in _RELU_LIKE:
            continue
        # Two witnesses: units whose pre-activation is never positive (forward hooks), and exact
        # zeros in the bias gradient (or weight gradient without a bias), which say per unit.
        candidates = [_sustained(act_dead[:, i], DEAD_FRACTION)]
        has_bias = any(l.name == _sibling(layer.name, "bias") for l in run.layers)
        if not (len(layer.shape) >= 2 and has_bias):
            candidates.append(_sustained(zero[:, i], DEAD_FRACTION))
        found = [c for c in candidates if c is not None]
        if found:
            frac, row = max(found, key=lambda c: c[0])
            name = layer.name
            if _last(name) == "bias":
                names = {l.name for l in run.layers}
                name = next((n for n in (_sibling(name, "weight"), _sibling(name, "kernel")) if n in names), name)
            if name not in dead or frac > dead[name][0]:
                dead[name] = (frac, row)
    if not dead:
        return None
    names = sorted(dead, key=lambda k: (dead[k][1], -dead[k][0]))
    worst = max(v[0] for v in dead.values())
    first_row = min(v[1] for v in dead.values())
    return Finding(
        kind="dead_units",
        severity="error" if worst >= 0.9 else "warning",
        first_step=int(run.steps[first_row]),
        last_step=int(run.steps[-1]),
        layers=names,
        summary=(
            f"dead_units from step {int(run.steps[first_row])}: {dead[names[0]][0]:.0%} of the units of "
            f"{names[0]} never receive a gradient again (exactly zero on every sampled step: they never activate)."
        ),
        evidence={"dead_fraction": {k: v[0] for k, v in dead.items()}, "threshold": DEAD_FRACTION,
                  "since_step": {k: int(run.steps[v[1]]) for k, v in dead.items()}},
        remedies=R.for_dead_units(),
    )


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
    """Sigmoid/tanh layers whose pre-activations sit in the flat tails for most of the batch, early
    on (forward hooks on sampled steps): their derivative is ~0 there, so gradients fade."""
    n = len(run.steps)
    if n < 1:
        return None
    sat = run.layer_series("act_sat_frac")[: min(EARLY_STEPS, n)]
    med = np.asarray(_nanmedian(sat, axis=0), dtype=np.float64)
    hit = {run.layers[i].name: float(m) for i, m in enumerate(med) if math.isfinite(m) and m >= SAT_FRACTION}
    if not hit:
        return None
    names = sorted(hit, key=lambda k: -hit[k])
    acts = sorted({run.layers[run.layer_index(k)].activation or "?" for k in names}) if hasattr(run, "layer_index") else []
    worst = hit[names[0]]
    return Finding(
        kind="saturated_units",
        severity="error" if worst >= SAT_ERROR else "warning",
        first_step=int(run.steps[0]),
        last_step=int(run.steps[min(EARLY_STEPS, n) - 1]),
        layers=names,
        summary=(
            f"saturated_units in the first {min(EARLY_STEPS, n)} steps: {worst:.0%} of the pre-activations of "
            f"{names[0]} sit where {'/'.join(acts) or 'the activation'} is flat (|x| beyond the 0.99 point)"
            f"{f'; {len(names)} layers are at least {SAT_FRACTION:.0%} saturated' if len(names) > 1 else ''}."
        ),
        evidence={"saturated_fraction": hit, "threshold": SAT_FRACTION},
        remedies=R.for_saturation(acts),
    )


# ---------------------------------------------------------------------------------- loss spikes


def loss_spike(run: RunLike) -> Finding | None:
    """Finite loss values far above their trailing window (robust z-score), after a warm-up."""
    loss = run.step_series("loss").astype(np.float64)
    n = len(loss)
    if n <= SPIKE_WARMUP + 5:
        return None
    start_level = float(_nanmedian(loss[:SPIKE_WARMUP]))
    clean = np.where(np.isfinite(loss), loss, np.nan)
    # Row t of `windows` is loss[t - SPIKE_WINDOW : t] (NaN-padded at the start), all at once.
    windows = np.lib.stride_tricks.sliding_window_view(
        np.concatenate([np.full(SPIKE_WINDOW, np.nan), clean]), SPIKE_WINDOW
    )[:n]
    enough = np.sum(np.isfinite(windows), axis=1) >= SPIKE_WARMUP
    med = np.asarray(_nanmedian(windows, axis=1), dtype=np.float64)
    mad = np.asarray(_nanmedian(np.abs(windows - med[:, None]), axis=1), dtype=np.float64) * _MAD_TO_SIGMA
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
            f"loss_spike at step {int(run.steps[t0])}: the loss jumped to {_f(float(loss[t0]))}, "
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
        },
        remedies=R.for_loss_spike(),
    )


# ---------------------------------------------------------------------------------- stalled


def stalled(run: RunLike) -> Finding | None:
    """The loss does not improve over a long stretch and the updates are vanishingly small."""
    loss = run.step_series("loss").astype(np.float64)
    n = len(loss)
    if n < STALL_MIN_STEPS or not np.isfinite(loss).any():
        return None
    k = max(1, n // 10)
    first, last = float(_nanmedian(loss[:k])), float(_nanmedian(loss[-k:]))
    if not (math.isfinite(first) and math.isfinite(last)) or first <= 0:
        return None
    improvement = (first - last) / abs(first)
    upd = run.layer_series("update_ratio")
    med_upd = float(_nanmedian(upd[np.isfinite(upd)])) if np.isfinite(upd).any() else math.nan
    if improvement >= STALL_IMPROVEMENT or not (math.isfinite(med_upd) and med_upd < STALL_UPDATE):
        return None
    return Finding(
        kind="stalled_training",
        severity="warning",
        first_step=int(run.steps[0]),
        last_step=int(run.steps[-1]),
        layers=[],
        summary=(
            f"stalled_training: over {n} steps the loss moved from {_f(first)} to {_f(last)} "
            f"({improvement:+.1%}) while the median update changed weights by {_f(med_upd)} of their norm."
        ),
        evidence={"loss_first": first, "loss_last": last, "improvement": improvement, "median_update_ratio": med_upd},
        remedies=R.for_stalled(),
    )


RULES = (nonfinite, exploding, vanishing, dead_units, saturated_units, loss_spike, stalled)


def _f(x: float) -> str:
    if x is None or not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.2e}"


def run_rules(run: RunLike, rules: Sequence = RULES) -> list[Finding]:
    out = []
    for rule in rules:
        f = rule(run)
        if f is not None:
            out.append(f)
    return out
