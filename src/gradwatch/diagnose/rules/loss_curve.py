"""The rules on the loss curve: spikes far above its trailing window (loss_spike), and a loss that
does not move while the updates are tiny (stalled)."""

from __future__ import annotations

import math

import numpy as np

from .. import remedies as R
from ..facts import RunLike, fmt, nanmedian, progress, weight_layers
from ...findings import Finding
from .common import no_gradient_rows
from .gradient_flow import NO_GRADIENT_SHARE

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
#: the updates are tiny (median update ratio below STALL_UPDATE; a healthy step is ~1e-3 of |w|).
#: Twenty steps hold a verdict: real runs are often that short (full batch, few epochs), and a
#: loss flat to 1% while the weights move by 1e-5 per step is flat however long one waits.
STALL_MIN_STEPS = 20
STALL_IMPROVEMENT = 0.01
STALL_UPDATE = 1e-5

_MAD_TO_SIGMA = 1.4826  # for normal data, sigma = 1.4826 * MAD


def loss_spike(run: RunLike) -> Finding | None:
    """Finite loss values far above their trailing window (robust z-score), after a warm-up."""
    loss = run.step_series("loss").astype(np.float64)
    n = len(loss)
    if n <= SPIKE_WARMUP + 5:
        return None
    start_level = float(nanmedian(loss[:SPIKE_WARMUP]))
    clean = np.where(np.isfinite(loss), loss, np.nan)
    # Row t of `windows` is loss[t - SPIKE_WINDOW : t] (NaN-padded at the start), all at once.
    windows = np.lib.stride_tricks.sliding_window_view(
        np.concatenate([np.full(SPIKE_WINDOW, np.nan), clean]), SPIKE_WINDOW
    )[:n]
    enough = np.sum(np.isfinite(windows), axis=1) >= SPIKE_WARMUP
    med = np.asarray(nanmedian(windows, axis=1), dtype=np.float64)
    mad = np.asarray(nanmedian(np.abs(windows - med[:, None]), axis=1), dtype=np.float64) * _MAD_TO_SIGMA
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
            f"loss_spike at step {int(run.steps[t0])}: the loss jumped to {fmt(float(loss[t0]))}, "
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
            "steps_seen": n,
        },
        remedies=R.for_loss_spike(),
    )


# ---------------------------------------------------------------------------------- stalled


def stalled(run: RunLike) -> Finding | None:
    """The loss does not improve over the run (at least STALL_MIN_STEPS steps) and the updates are
    vanishingly small: a tiny learning rate, or nothing to learn from."""
    loss = run.step_series("loss").astype(np.float64)
    n = len(loss)
    prog = progress(run)
    if n < STALL_MIN_STEPS or prog is None or not math.isfinite(prog.improvement):
        return None
    upd = run.layer_series("update_ratio")[:, weight_layers(run)]
    med_upd = float(nanmedian(upd[np.isfinite(upd)])) if np.isfinite(upd).any() else math.nan
    zero = float(no_gradient_rows(run).mean())
    if prog.improvement >= STALL_IMPROVEMENT:
        return None
    if not ((math.isfinite(med_upd) and med_upd < STALL_UPDATE) or zero >= NO_GRADIENT_SHARE):
        return None
    moved = f"the median update changed the weights by {fmt(med_upd)} of their norm" if math.isfinite(med_upd) else \
        "the gradients were exactly zero"
    return Finding(
        kind="stalled_training",
        severity="warning",
        first_step=int(run.steps[0]),
        last_step=int(run.steps[-1]),
        layers=[],
        summary=(f"stalled_training: over {n} steps the loss moved from {fmt(prog.first)} to {fmt(prog.last)} "
                 f"({-prog.improvement:+.2%}) while {moved}."),
        evidence={"loss_first": prog.first, "loss_last": prog.last, "improvement": prog.improvement,
                  "median_update_ratio": med_upd, "steps_seen": n, "zero_gradient_share": zero},
        remedies=R.for_stalled(),
    )
