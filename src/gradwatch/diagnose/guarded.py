"""What guards already did, folded into the findings.

A run with guards can contain a problem that a guard handled: NaN gradients that SkipNonFinite
skipped, a blow-up that Rollback undid. The problem is still reported — its cause is still there —
but as contained (a warning, not an error), with what the guard did as evidence, and without
suggesting the guard that is already on.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from .amp import amp_skipped
from ..findings import Finding

#: Remedy actions each guard already carries out.
_ACTIONS = {
    "ClipNorm": "clip_norm",
    "ClipValue": "clip_value",
    "SkipNonFinite": "skip_nonfinite",
    "Rollback": "rollback",
}
#: Share of the last steps that must be finite for a run to count as having ended finite.
END_SHARE = 0.1


def active_guards(run: Any) -> list[dict[str, Any]]:
    return [g for st in getattr(run, "streams", []) for g in st.get("guards", [])]


def _ended_finite(run: Any, skipped: np.ndarray) -> bool:
    n = len(run.steps)
    tail = slice(n - max(1, int(math.ceil(END_SHARE * n))), n)
    gnorm = run.step_series("grad_norm")[tail]
    stepped = ~skipped[tail] & ~amp_skipped(run)[tail]  # GradScaler's skips changed nothing either
    loss = run.step_series("loss")[tail]
    logged = np.nan_to_num(run.step_series("loss_logged")[tail], nan=0.0) > 0
    return bool(np.isfinite(gnorm[stepped]).all() and np.isfinite(loss[logged & stepped]).all())


def account_for_guards(run: Any, findings: list[Finding]) -> list[Finding]:
    guards = active_guards(run)
    if not guards or len(run.steps) == 0:
        return findings
    names = {g.get("name") for g in guards}
    amp = amp_skipped(run)
    skipped = (np.nan_to_num(run.step_series("skipped"), nan=0.0) > 0) & ~amp  # AMP's overflows are not the guards'
    rolled = np.nan_to_num(run.step_series("rolled_back"), nan=0.0) > 0
    ended_finite = _ended_finite(run, skipped)
    done = {_ACTIONS[n] for n in names if n in _ACTIONS}
    out = []
    for f in findings:
        contained: list[str] = []
        if ended_finite and f.kind == "nonfinite":
            bad = ~np.isfinite(run.step_series("grad_norm")) & ~amp
            n_skipped = int((bad & skipped).sum())
            if n_skipped:
                contained.append(f"SkipNonFinite skipped {n_skipped} step{'s' * (n_skipped != 1)} with non-finite gradients")
            if (bad & ~skipped).any() and not rolled.any():
                contained = []  # some went through unguarded and nothing undid them
        if ended_finite and f.kind in ("nonfinite", "exploding_gradients", "loss_spike") and rolled.any():
            k = int(rolled.sum())
            contained.append(f"Rollback restored a good snapshot {k} time{'s' * (k != 1)}")
        remedies = [r for r in f.remedies if r.action not in done] or f.remedies
        if contained:
            f = replace(
                f,
                severity="warning" if f.severity == "error" else f.severity,
                summary=f"{f.summary.rstrip('.')}; contained: {' and '.join(contained)}, and the run ended finite.",
                evidence={**f.evidence, "contained_by": sorted(n for n in names if n in ("SkipNonFinite", "Rollback")),
                          "skipped_steps": int(skipped.sum()), "rollbacks": int(rolled.sum())},
            )
        out.append(replace(f, remedies=remedies))
    return out
