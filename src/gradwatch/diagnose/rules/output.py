"""The output layer and its loss: output_layer (saturated, never positive, or an output/loss pair
that cannot learn), and the cause of a run without any gradient, which starts there."""

from __future__ import annotations

import math

from .. import remedies as R
from ..facts import Head, RunLike, autograd_node, early, head, output_mismatch, progress
from ...findings import Finding, Remedy
from .common import no_gradient_rows
from .units import DEAD_FRACTION, SAT_FRACTION

#: The output layer is constant when this share of its units gives every sample one value.
OUTPUT_CONSTANT = 0.9
#: An output problem is an error when the loss improved by less than this over the run.
OUTPUT_STUCK_IMPROVEMENT = 0.1

#: Causes that are an output layer and loss that cannot learn together (facts.output_mismatch).
MISMATCH_CAUSES = ("softmax_single_unit", "bounded_regression_output", "sigmoid_categorical",
                   "probability_loss_on_linear_output")


def zero_gradient_cause(run: RunLike, h: Head | None) -> tuple[str, str, Remedy | None]:
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
    no_gradient_at_all = bool(no_gradient_rows(run)[0])
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
