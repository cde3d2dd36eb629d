"""Clipping whose threshold follows the run: ZClip (EMA z-score) and AutoClip (percentile of history).

Both keep their statistics on the device and decide with ``torch.where``; a non-finite norm is
neither clipped (SkipNonFinite's business) nor allowed into the statistics.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..errors import GradwatchError
from .base import GuardSetup, GuardStep
from .clip import NORM_EPS, _Counted, _positive


class ZClip(_Counted):
    """Clip gradient-norm spikes by their z-score against an exponential moving average
    (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training").

    The first ``warmup`` steps only collect norms; their mean and variance start the EMAs. After
    that, a norm whose z-score ``z = (‖g‖ − μ) / σ`` exceeds ``z_thresh`` is scaled down to
    ``μ + z_thresh² σ / z`` (the paper's adaptive rule: the larger the outlier, the closer to the
    mean it is pulled), and the EMAs are updated with the norm as clipped. No fixed cap hides behind
    it: before the warmup ends nothing is clipped.

    Args:
        alpha: EMA smoothing factor (weight of the old value).
        z_thresh: the z-score above which a norm is a spike.
        warmup: steps that only collect statistics.
        eps: added to σ before dividing.
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25, eps: float = 1e-6):
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
            raise GradwatchError(f"ZClip(alpha) must be between 0 and 1; got {alpha!r}.")
        if not isinstance(warmup, numbers.Integral) or isinstance(warmup, bool) or warmup < 1:
            raise GradwatchError(f"ZClip(warmup) must be a positive integer; got {warmup!r}.")
        self.alpha = float(alpha)
        self.z_thresh = _positive("ZClip(z_thresh)", z_thresh)
        self.warmup = int(warmup)
        self.eps = _positive("ZClip(eps)", eps)

    @property
    def warmed_up(self) -> int:
        """The warm-up steps seen so far (at most ``warmup``)."""
        return getattr(self, "_seen", 0)

    def setup(self, ctx: GuardSetup) -> None:
        self._seen = 0
        self._buf = torch.full((self.warmup,), math.nan, dtype=torch.float32, device=ctx.device)
        self._mean = torch.full((), math.nan, dtype=torch.float32, device=ctx.device)
        self._var = torch.full((), math.nan, dtype=torch.float32, device=ctx.device)

    def before_step(self, step: GuardStep) -> None:
        norm = step.norm()
        finite = torch.isfinite(norm)
        if self._seen < self.warmup:
            self._buf[self._seen].copy_(torch.where(finite, norm, math.nan))
            self._seen += 1
            if self._seen == self.warmup:  # population mean and variance of the finite warm-up norms
                self._mean = torch.nanmean(self._buf)
                self._var = torch.nanmean((self._buf - self._mean) ** 2)
            return
        mean, var = self._mean, self._var
        ready = torch.isfinite(mean)
        std = torch.sqrt(var)
        z = (norm - mean) / (std + self.eps)
        spike = finite & ready & (z > self.z_thresh)
        target = mean + self.z_thresh**2 * std / z
        step.scale(torch.where(spike, target / (norm + NORM_EPS), 1.0))
        step.threshold = mean + self.z_thresh * std
        self._count(step, spike)
        effective = torch.where(spike, target, norm)
        a = self.alpha
        new_mean = a * mean + (1 - a) * effective
        new_var = a * var + (1 - a) * (effective - new_mean) ** 2
        update = finite & ready
        start = finite & ~ready  # no finite norm in the warm-up: start from the first one
        self._mean = torch.where(update, new_mean, torch.where(start, norm, mean))
        self._var = torch.where(update, new_var, torch.where(start, 0.0, var))


class AutoClip(_Counted):
    """Clip to a percentile of the gradient norms seen so far (Seetharaman et al. 2020, "AutoClip:
    Adaptive Gradient Clipping for Source Separation Networks").

    Each step's norm joins the history first; the threshold is its ``percentile``-th percentile
    (linear interpolation, as ``numpy.percentile``), applied like :class:`ClipNorm`.

    Args:
        percentile: 0-100; the paper recommends 10.
        history: keep only the last this many norms (default: all of them, as the paper does; the
            percentile then costs a sort of the whole history per step).
    """

    def __init__(self, percentile: float = 10.0, history: int | None = None):
        if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real) or not 0 <= percentile <= 100:
            raise GradwatchError(f"AutoClip(percentile) must be between 0 and 100; got {percentile!r}.")
        if history is not None and (not isinstance(history, numbers.Integral) or isinstance(history, bool) or history < 1):
            raise GradwatchError(f"AutoClip(history) must be a positive integer or None; got {history!r}.")
        self.percentile = float(percentile)
        self.history = None if history is None else int(history)

    def setup(self, ctx: GuardSetup) -> None:
        self._n = 0
        self._norms = torch.full((1024,), math.nan, dtype=torch.float32, device=ctx.device)

    def before_step(self, step: GuardStep) -> None:
        norm = step.norm()
        if self._n == len(self._norms):  # grow by doubling (a host decision: the size is known here)
            bigger = torch.full((2 * self._n,), math.nan, dtype=torch.float32, device=self._norms.device)
            bigger[: self._n].copy_(self._norms)
            self._norms = bigger
        self._norms[self._n].copy_(torch.where(torch.isfinite(norm), norm, math.nan))
        self._n += 1
        start = 0 if self.history is None else max(0, self._n - self.history)
        threshold = torch.nanquantile(self._norms[start : self._n], self.percentile / 100.0)
        coef = torch.clamp(threshold / (norm + NORM_EPS), max=1.0)
        coef = torch.where(torch.isfinite(norm) & torch.isfinite(coef), coef, 1.0)
        self._count(step, coef < 1.0)
        step.scale(coef)
        step.threshold = threshold
