"""What several families of rules read: the first row a mask holds, and the steps without any gradient."""

from __future__ import annotations

import numpy as np

from ..facts import RunLike


def first_row(mask: np.ndarray) -> int | None:
    idx = np.flatnonzero(mask)
    return int(idx[0]) if idx.size else None


def no_gradient_rows(run: RunLike) -> np.ndarray:
    """Steps whose gradients are all exactly zero (finite global norm of 0)."""
    g = run.step_series("grad_norm").astype(np.float64)
    return np.isfinite(g) & (g == 0)


def first_nonfinite_row(run: RunLike) -> int | None:
    """The first row whose loss, gradient norm or any layer's weight norm is not finite; None if none.
    What follows it is the wreck (a NaN weight passes no gradient back, a ReLU of NaN never fires),
    not the training: rules that judge "from some step to the end" stop there."""
    loss = run.step_series("loss")
    logged = np.nan_to_num(run.step_series("loss_logged"), nan=0.0) > 0  # NaN where no loss was given
    bad = (logged & ~np.isfinite(loss)) | np.isinf(run.step_series("grad_norm"))
    flags = run.layer_series("grad_nonfinite")  # 1 where a layer's gradient held NaN/Inf
    if flags.size:
        bad |= (np.nan_to_num(flags, nan=0.0) > 0).any(axis=1)
    weights = run.layer_series("weight_norm")
    if weights.size:
        bad |= np.isinf(weights).any(axis=1)
    # A step that AMP's scaler or a guard skipped did not touch the weights: the run goes on whole.
    for name in ("amp_skipped", "skipped"):
        bad &= ~(np.nan_to_num(run.step_series(name), nan=0.0) > 0)
    rows = np.flatnonzero(bad)
    return int(rows[0]) if rows.size else None
