"""The rules that find too little gradient: a gradient-flow profile that fades toward the input
(vanishing), no gradient at all (no_gradient), and weight layers never given one (ungraded_layers)."""

from __future__ import annotations

import math

import numpy as np

from .. import remedies as R
from ..facts import SATURATING, RunLike, early, first_stream, fmt, head, nanmedian, progress, streams
from ...findings import Finding, Remedy
from .common import first_nonfinite_row, first_row, no_gradient_rows
from .output import MISMATCH_CAUSES, zero_gradient_cause

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
#: Fewer finite steps than this before the first non-finite one: too few to judge the flow on.
VANISH_MIN_STEPS = 5

#: No gradient: the share of the steps, from some step to the end of the run, whose gradients are
#: all exactly zero (one noisy step does not end it), over at least NO_GRADIENT_MIN_STEPS steps.
NO_GRADIENT_SHARE = 0.9
NO_GRADIENT_MIN_STEPS = 5
#: Layers that never get a gradient are an error when they hold this share of the weights, a
#: warning from UNGRADED_WARN_SHARE; a smaller unused part (a pooler a fine-tune does not use) is info.
UNGRADED_ERROR_SHARE = 0.5
UNGRADED_WARN_SHARE = 0.1


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


def _gradient_gone_from(run: RunLike) -> int | None:
    """The first row from which every gradient is exactly zero on at least NO_GRADIENT_SHARE of the
    steps to the end of the run (and on that row), over at least NO_GRADIENT_MIN_STEPS steps."""
    zero = no_gradient_rows(run)
    n = zero.size
    if n == 0:
        return None
    # share of zero-gradient steps from each row to the end
    tail = np.cumsum(zero[::-1])[::-1] / np.arange(n, 0, -1)
    ok = zero & (tail >= NO_GRADIENT_SHARE) & (np.arange(n) <= n - min(NO_GRADIENT_MIN_STEPS, n))
    return first_row(ok)


def no_gradient(run: RunLike) -> Finding | None:
    """Every gradient of every layer exactly zero, from the first step (or from some step to the
    end of the run): nothing can learn. The cause is named from the output layer and the loss (a
    softmax over one unit, an output pinned where the activation or the loss's clipping is flat),
    since a zero everywhere starts there."""
    n = len(run.steps)
    row = _gradient_gone_from(run)
    if row is None:
        return None
    zero = no_gradient_rows(run)
    h = head(run)
    cause, sentence, first_fix = zero_gradient_cause(run, h)
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


def vanishing(run: RunLike) -> Finding | None:
    """The gradient-flow profile, in execution order: the input-side layer gets < VANISH_REL of the
    output layer's gradient RMS early in training (the first EARLY_STEPS steps, or all of a shorter
    run), with gradients that are small but not exactly zero. A dip in the middle of a profile whose
    input side gets its full share is said as info: the gradient still reaches the input."""
    n = len(run.steps)
    if n < 2:
        return None
    if no_gradient_rows(run)[0]:
        return None  # no gradient at all: no_gradient() says why
    window = early(run)
    # Once a loss, gradient or weight is non-finite, what follows is the wreck (a NaN weight passes
    # no gradient back through it), not the flow of a training: judge only the steps before it.
    broken = first_nonfinite_row(run)
    if broken is not None:
        if broken < VANISH_MIN_STEPS:
            return None
        window = slice(0, min(window.stop, broken))
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
