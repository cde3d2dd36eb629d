"""Mixed precision in the diagnosis: steps GradScaler skipped are how it calibrates its loss scale,
not explosions or NaN; a scaler that skips step after step is a problem of its own."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..findings import Finding, Remedy

#: GradScaler is stuck when it skipped at least this share of the last AMP_WINDOW steps (and at
#: least AMP_MIN_SKIPS of them): the gradients overflow at every scale it backs off to.
AMP_STUCK_SHARE = 0.5
AMP_WINDOW = 20
AMP_MIN_SKIPS = 10

#: Gradient series whose values at an AMP-skipped step are the overflow the scaler caught.
_STEP_GRAD = ("grad_norm", "grad_norm_clipped", "clip_coef")


def amp_skipped(run: Any) -> np.ndarray:
    try:
        flags = run.step_series("amp_skipped")
    except KeyError:  # a RunLike from before AMP support
        return np.zeros(len(run.steps), bool)
    return np.nan_to_num(flags, nan=0.0) > 0


class WithoutAmpSkips:
    """The run as the rules see it: at steps GradScaler skipped, the gradient statistics are
    missing (NaN, like an unsampled metric), so an overflow the scaler caught is not a finding."""

    def __init__(self, run: Any, mask: np.ndarray):
        self._run = run
        self._mask = mask

    def __getattr__(self, name: str) -> Any:
        return getattr(self._run, name)

    def step_series(self, name: str) -> np.ndarray:
        v = self._run.step_series(name)
        if name in _STEP_GRAD:
            v = v.copy()
            v[self._mask] = np.nan
        return v

    def layer_series(self, name: str) -> np.ndarray:
        v = self._run.layer_series(name)
        if name.startswith("grad_") or name == "update_ratio":
            v = v.copy()
            v[self._mask] = np.nan
        return v


def amp_stuck(run: Any, mask: np.ndarray) -> Finding | None:
    """A nonfinite error when GradScaler keeps skipping at the end of the run."""
    n = len(mask)
    tail = mask[-AMP_WINDOW:]
    if n == 0 or tail.sum() < AMP_MIN_SKIPS or tail.mean() < AMP_STUCK_SHARE:
        return None
    steps = run.steps
    scale = run.step_series("amp_scale")
    first = int(steps[max(0, n - AMP_WINDOW) + int(np.flatnonzero(tail)[0])])
    last_scale = scale[np.flatnonzero(mask)[-1]]
    return Finding(
        kind="nonfinite",
        severity="error",
        first_step=first,
        last_step=int(steps[-1]),
        layers=[],
        summary=(f"nonfinite at step {first}: GradScaler skipped {int(tail.sum())} of the last {len(tail)} steps — the "
                 f"gradients overflow even at loss scale {float(last_scale):.3g}, so the weights stopped changing."),
        evidence={"origin": "backward", "amp_skipped_steps": int(mask.sum()), "recent_share": float(tail.mean()),
                  "amp_scale_last": float(last_scale)},
        remedies=[
            Remedy("clip_norm", {"max_norm": 1.0}, "after scaler.unscale_(optimizer), a norm cap keeps single steps bounded."),
            Remedy("scale_lr", {"factor": 0.1},
                   "weights that grew out of range overflow float16 in the forward pass; a smaller step keeps them in range."),
            Remedy("set_dtype", {"dtype": "bfloat16"}, "bfloat16 has float32's range: no loss scaling, no overflow."),
        ],
    )
