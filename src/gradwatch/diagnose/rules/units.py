"""The rules on hidden units: dead (never activate again) and saturated (stuck in the flat tails
of a sigmoid or tanh)."""

from __future__ import annotations

import math

import numpy as np

from .. import remedies as R
from ..facts import (
    EXCLUDED_FROM_FLOW, SATURATING, RunLike, early, first_stream, head_layers, last_part, nanmedian, progress, sibling,
    weight_layers,
)
from ...findings import Finding
from .common import first_nonfinite_row, no_gradient_rows

#: Dead units: share of a layer's units whose gradient is exactly zero on every sampled step.
DEAD_FRACTION = 0.5
#: ... on at least this many sampled steps in a row, up to the end of the run.
DEAD_MIN_SAMPLES = 3
#: ... allowing single sampled steps down to this share of the threshold (a noisy batch).
DEAD_DIP = 0.8
#: Dead units are an error when this share of a layer's units never fires.
DEAD_ERROR = 0.9
_RELU_LIKE = (None, "ReLU", "ReLU6", "Hardtanh", "Threshold")  # None: a functional call we cannot see

#: Saturation: the median share of pre-activations beyond the activation's 0.99 point, early on.
SAT_FRACTION = 0.5
SAT_ERROR = 0.9
#: A saturating layer whose kernel gradient is exactly zero for this share of its entries is
#: saturated to float precision (tanh(x) == 1.0 in float32 for x > 9.01).
SAT_ZERO_GRAD = 0.9


def dead_units(run: RunLike) -> Finding | None:
    """Units whose gradient is exactly zero on every sampled step from some step to the end: they
    stopped activating (dead from the start, or killed by a large step) and never came back.

    Read from the zero fraction of each layer's bias gradient (a ReLU unit that never fires gets a
    zero bias gradient), or of its weight gradient when it has no bias.
    """
    if len(run.steps) < 2 or no_gradient_rows(run)[0]:
        return None  # no gradient anywhere: no_gradient() says why, and the units are not the cause
    zero = run.layer_series("grad_zero_frac")
    act_dead = run.layer_series("act_dead_frac")
    broken = first_nonfinite_row(run)
    if broken is not None:  # units judged up to the wreck, not in it (their dying before it still counts)
        zero, act_dead = zero[:broken], act_dead[:broken]
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
