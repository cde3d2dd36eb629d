"""One rule per pathology: a small pure function from a recorded run to a Finding (or None).

Every rule reads scale-free signals — gradient RMS relative to the last layer, growth over the
run's own early median, fractions, robust z-scores — because absolute thresholds are wrong by orders
of magnitude from one model to the next. Rules never import torch: they read a stored run.

Each threshold is a named constant, with the reason it has that value, in the module of the rule
it belongs to:

- ``nonfinite_origin``: nonfinite (where the first NaN/inf came from);
- ``explosion``: exploding (threshold crossing, update ratios, sustained_rise);
- ``gradient_flow``: vanishing (the flow profile), no_gradient, ungraded_layers;
- ``units``: dead_units, saturated_units;
- ``output``: output_layer, and the cause of a run without any gradient;
- ``loss_curve``: loss_spike, stalled;
- ``common``: what several of them read.

This package runs them (``RULES``, :func:`run_rules`) and names them all.
"""

from __future__ import annotations

from typing import Sequence

from ..facts import RunLike, weight_layers
from ...findings import Finding
from .explosion import (
    BASELINE_STEPS, EXPLODE_FACTOR, RISE_BLOCK_FACTOR, RISE_BLOCKS, RISE_HISTORY, RISE_LOSS_IMPROVEMENT, RISE_MIN_LEVEL, RISE_R2,
    RISE_WINDOW, UPDATE_GATE_GROWTH, UPDATE_GATE_STEPS, UPDATE_RATIO_EXPLODE, exploding, sustained_rise,
)
from .gradient_flow import (
    NO_GRADIENT_MIN_STEPS, NO_GRADIENT_SHARE, UNGRADED_ERROR_SHARE, UNGRADED_WARN_SHARE, VANISH_INPUT_MAX, VANISH_REL,
    VANISH_REL_ERROR, VANISH_REL_SATURATING, flow_profile, no_gradient, ungraded_layers, vanishing,
)
from .loss_curve import (
    SPIKE_RECOVER, SPIKE_UNDO, SPIKE_WARMUP, SPIKE_WINDOW, SPIKE_Z, STALL_IMPROVEMENT, STALL_MIN_STEPS, STALL_UPDATE, loss_spike,
    stalled,
)
from .nonfinite_origin import nonfinite
from .output import MISMATCH_CAUSES, OUTPUT_CONSTANT, OUTPUT_STUCK_IMPROVEMENT, output_layer
from .units import (
    DEAD_DIP, DEAD_ERROR, DEAD_FRACTION, DEAD_MIN_SAMPLES, SAT_ERROR, SAT_FRACTION, SAT_ZERO_GRAD, dead_units, saturated_units,
)

RULES = (nonfinite, exploding, no_gradient, ungraded_layers, vanishing, dead_units, saturated_units, output_layer, loss_spike,
         stalled)


def run_rules(run: RunLike, rules: Sequence = RULES) -> list[Finding]:
    out = []
    for rule in rules:
        f = rule(run)
        if f is not None:
            out.append(f)
    # A stall the output layer or a missing gradient explains (a constant output, an output/loss
    # pair that cannot learn, no gradient at all) is said once, with its cause, not again as a bare
    # flat loss whose remedy (a larger lr) cannot help.
    explained = any(f.kind == "stalled_training" and f.layers for f in out) or any(
        f.kind == "vanishing_gradients" and f.evidence.get("cause") and f.severity == "error" for f in out)
    if explained:
        out = [f for f in out if not (f.kind == "stalled_training" and not f.layers)]
    return out


__all__ = [
    "RULES", "RunLike", "run_rules", "weight_layers",
    # the rules, in RULES order
    "nonfinite", "exploding", "no_gradient", "ungraded_layers", "vanishing", "dead_units", "saturated_units", "output_layer",
    "loss_spike", "stalled",
    # helpers others read
    "flow_profile", "sustained_rise", "MISMATCH_CAUSES",
    # thresholds
    "BASELINE_STEPS", "EXPLODE_FACTOR", "RISE_BLOCK_FACTOR", "RISE_BLOCKS", "RISE_HISTORY", "RISE_LOSS_IMPROVEMENT",
    "RISE_MIN_LEVEL", "RISE_R2", "RISE_WINDOW", "UPDATE_GATE_GROWTH", "UPDATE_GATE_STEPS", "UPDATE_RATIO_EXPLODE",
    "NO_GRADIENT_MIN_STEPS", "NO_GRADIENT_SHARE", "UNGRADED_ERROR_SHARE", "UNGRADED_WARN_SHARE", "VANISH_INPUT_MAX", "VANISH_REL",
    "VANISH_REL_ERROR", "VANISH_REL_SATURATING",
    "SPIKE_RECOVER", "SPIKE_UNDO", "SPIKE_WARMUP", "SPIKE_WINDOW", "SPIKE_Z",
    "STALL_IMPROVEMENT", "STALL_MIN_STEPS", "STALL_UPDATE",
    "OUTPUT_CONSTANT", "OUTPUT_STUCK_IMPROVEMENT",
    "DEAD_DIP", "DEAD_ERROR", "DEAD_FRACTION", "DEAD_MIN_SAMPLES", "SAT_ERROR", "SAT_FRACTION", "SAT_ZERO_GRAD",
]
