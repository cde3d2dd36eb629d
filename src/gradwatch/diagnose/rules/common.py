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
