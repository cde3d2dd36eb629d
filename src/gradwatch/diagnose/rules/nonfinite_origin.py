"""nonfinite: where the first non-finite value came from (the forward, the backward, or weights
that had already blown up)."""

from __future__ import annotations

import numpy as np

from .. import remedies as R
from ..facts import RunLike
from ...findings import Finding
from .common import first_row
from .explosion import norm_exploded_before


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
    t_grad, t_loss, t_w = first_row(bad_grad), first_row(bad_loss), first_row(bad_w)
    candidates = [t for t in (t_grad, t_loss, t_w) if t is not None]
    if not candidates:
        return None
    row = min(candidates)
    gnorm = run.step_series("grad_norm")
    exploded_before = norm_exploded_before(gnorm, row)
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
    first = first_row(np.isfinite(loss))
    if first is not None:
        out[first:] = True
    return out
