"""Host-side derivation: a flushed window of raw device sums -> a :class:`~gradwatch.store.Chunk`.

Everything stored (RMS, mean, std, ratios, the global norm, the histograms) is computed here, in
float64, from the ring rows the flush copied and the per-row facts the host kept itself.
"""

from __future__ import annotations

import math

import numpy as np

from ..store import HIST_BINS, HIST_EXP_MAX, HIST_EXP_MIN, LAYER_METRICS, STEP_METRICS, Chunk
from .layout import AMP_SCALE, AMP_SKIPPED, COEF, EXP_BINS, GRAD_BLOCKS, LOSS, LR, NORM_AFTER, SKIPPED, THRESHOLD, RingLayout


class HostRows:
    """Per-row facts of the window that are known in Python already, so they never touch the device."""

    def __init__(self, rows: int, layers: int):
        self.steps = np.zeros(rows, np.int64)
        self.lr = np.full(rows, np.nan, np.float64)
        self.time = np.zeros(rows, np.float64)
        self.sampled = np.zeros(rows, np.float64)
        self.loss_logged = np.zeros(rows, np.float64)
        self.present = np.zeros((rows, layers), bool)  # layers that had a gradient
        self.rolled = np.zeros(rows, np.float64)
        self.grads_scaled = np.zeros(rows, bool)  # rows whose gradients still carried the AMP loss scale
        self.hist_steps: list[int] = []  # the sampled steps, one histogram row each
        self.lr_tensor = False  # some step's lr was a device tensor: its value is in the ring's LR slot

    def begin(self, row: int, step: int, sampled: bool, elapsed: float, lr: object) -> None:
        """Reset ``row`` for ``step`` (``lr`` a Python number, or anything else for "not known here")."""
        self.steps[row] = step
        self.sampled[row] = sampled
        self.loss_logged[row] = 0
        self.time[row] = elapsed
        self.lr[row] = lr if isinstance(lr, (int, float)) else math.nan
        self.present[row] = False
        self.rolled[row] = 0
        self.grads_scaled[row] = False

    def hist_rows(self, n: int) -> np.ndarray:
        """Rows (of the first ``n``) of the sampled steps, in histogram order."""
        return np.searchsorted(self.steps[:n], np.array(self.hist_steps, np.int64))


def derive(ring: np.ndarray, n: int, exp_counts: np.ndarray, rows: HostRows, layout: RingLayout,
           numel: np.ndarray) -> Chunk:
    """Everything stored, in float64 on the host, from the raw device sums of one window.

    Args:
        ring: the window's ``n`` ring rows (float64; the gradient blocks of loss-scaled rows are
            divided in place).
        exp_counts: the sampled steps' exponent histograms (steps x layers x EXP_BINS).
        rows: the host's facts of the same rows.
        numel: elements per layer.
    """

    def block(name: str) -> np.ndarray:
        return layout.block(ring, name)

    numel = numel[None, :]
    present = rows.present[:n]
    hist_rows = rows.hist_rows(n)
    if rows.grads_scaled[:n].any():
        exp_counts = _unscale(ring, rows.grads_scaled[:n], exp_counts, hist_rows, layout)
    zeros = np.full((n, layout.layers), np.nan)
    zeros[hist_rows] = exp_counts[:, :, 0]  # exponent 0: exact zeros (and subnormals)
    with np.errstate(divide="ignore", invalid="ignore"):
        g_norm = np.where(present, block("g_norm"), np.nan)
        w_norm, w_sum, w_cnorm = block("w_norm"), block("w_sum"), block("w_cnorm")
        layer = {
            "grad_norm": g_norm,
            "grad_rms": g_norm / np.sqrt(numel),
            "grad_mean": block("g_sum") / numel,
            "grad_std": block("g_cnorm") / np.sqrt(numel),
            "grad_maxabs": np.maximum(-block("g_min"), block("g_max")),
            "grad_nonfinite": np.where(present, ~np.isfinite(g_norm), np.nan),
            "grad_zero_frac": zeros / numel,
            "weight_norm": w_norm,
            "weight_rms": w_norm / np.sqrt(numel),
            "weight_mean": w_sum / numel,
            "weight_std": w_cnorm / np.sqrt(numel),
            "update_ratio": block("dw_norm") / w_norm,
            "act_dead_frac": block("a_dead"),
            "act_sat_frac": block("a_sat"),
            "act_const_frac": block("a_const"),
        }
        # The global norm over the layers that have a gradient, as clip_grad_norm_ defines it.
        global_norm = np.sqrt(np.sum(np.where(present, g_norm, 0.0) ** 2, axis=1))
        global_norm[~present.any(axis=1)] = np.nan
    lr = rows.lr[:n].copy()
    if rows.lr_tensor:
        lr = np.where(np.isnan(lr), ring[:, LR], lr)
    steps = {
        "loss": ring[:, LOSS],
        "grad_norm": global_norm,
        "lr": lr,
        "time": rows.time[:n].copy(),
        "sampled": rows.sampled[:n].copy(),  # 1 where the sampled statistics were computed
        "loss_logged": rows.loss_logged[:n].copy(),  # 1 where a loss was given for the step
        "grad_norm_clipped": ring[:, NORM_AFTER],
        "clip_coef": ring[:, COEF],
        "clip_threshold": ring[:, THRESHOLD],
        "skipped": np.nan_to_num(ring[:, SKIPPED], nan=0.0),  # no guard: nothing skipped
        "rolled_back": rows.rolled[:n].copy(),
        "amp_scale": ring[:, AMP_SCALE],
        "amp_skipped": np.nan_to_num(ring[:, AMP_SKIPPED], nan=0.0),  # no GradScaler: nothing skipped
    }
    assert set(steps) == set(STEP_METRICS) and set(layer) == set(LAYER_METRICS)
    return Chunk(
        steps=rows.steps[:n].copy(),
        step_values=steps,
        layer_values=layer,
        hist_steps=np.array(rows.hist_steps, np.int64),
        hist=fold_exponent_counts(exp_counts),
    )


def _unscale(ring: np.ndarray, grads_scaled: np.ndarray, exp_counts: np.ndarray, hist_rows: np.ndarray,
             layout: RingLayout) -> np.ndarray:
    """Rows whose gradients carried GradScaler's loss scale (a fused optimizer unscales inside its
    kernel, after the statistics were taken): divide the gradient sums by it and shift the log2
    histogram by log2(scale) bins (GradScaler's scales are powers of two)."""
    rows = np.flatnonzero(grads_scaled)
    scale = ring[rows, AMP_SCALE][:, None]
    for name in GRAD_BLOCKS:
        b = layout.block(ring, name)
        b[rows] = b[rows] / scale
    counts = exp_counts.copy()
    for h, r in enumerate(hist_rows):
        if not grads_scaled[r] or not np.isfinite(ring[r, AMP_SCALE]) or ring[r, AMP_SCALE] <= 0:
            continue
        k = int(round(math.log2(ring[r, AMP_SCALE])))
        inner = exp_counts[h, :, 1:EXP_BINS - 1]  # exponent 0 (zeros) and 255 (inf/NaN) stay put
        shifted = np.zeros_like(inner)
        if k >= 0:
            shifted[:, : inner.shape[1] - k] = inner[:, k:]
            shifted[:, 0] += inner[:, :k].sum(axis=1)  # below the smallest normal: the lowest bin
        else:
            shifted[:, -k:] = inner[:, : inner.shape[1] + k]
        counts[h, :, 1:EXP_BINS - 1] = shifted
    return counts


def fold_exponent_counts(counts: np.ndarray) -> np.ndarray:
    """Fold 256 float32-exponent counts into the stored bins (see :func:`gradwatch.store.hist_edges`)."""
    # Exponent field e holds |g| in [2^(e-127), 2^(e-126)); e = 0 zeros and subnormals; e = 255 inf/NaN.
    lo = HIST_EXP_MIN + 127
    hi = HIST_EXP_MAX + 127
    out = np.empty(counts.shape[:-1] + (HIST_BINS,), np.float32)
    out[..., 0] = counts[..., :lo].sum(-1)
    out[..., 1:-1] = counts[..., lo:hi]
    out[..., -1] = counts[..., hi:].sum(-1)
    return out
