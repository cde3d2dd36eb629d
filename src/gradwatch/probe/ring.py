"""The device ring: one float32 buffer per probe, a row per step, and which column of a row holds
which statistic of which layer.

A row is STEP_SLOTS per-step values, then one block of one column per layer for each name in
BLOCKS, in that order. Behind the rows, in the same buffer, each sampled step of the window has a
histogram row (layers x EXP_BINS), so a flush is exactly one device->host copy. :class:`RingLayout`
does all the column arithmetic; the probe, the host derivation and the cross-rank reduction ask it.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .kernels import to_device
from .layout import (  # noqa: F401 - the layout's names, importable from here as before
    AMP_SCALE, AMP_SKIPPED, BLOCKS, COEF, EXP_BINS, GRAD_BLOCKS, GUARD_SLOTS, LOSS, LR, NORM_AFTER, SKIPPED, STEP_SLOTS,
    THRESHOLD, RingLayout, max_sampled_in_window,
)


class RingBuffer:
    """The device buffer (``rows`` ring rows, then ``hist_rows`` histogram rows, NaN where nothing was
    written) and the host staging buffer a flush copies it into (pinned on CUDA)."""

    def __init__(self, layout: RingLayout, rows: int, hist_rows: int, device: torch.device):
        self.layout = layout
        self.device = device
        ring_size = rows * layout.width
        total = ring_size + hist_rows * layout.layers * EXP_BINS
        self.buf = torch.full((total,), math.nan, dtype=torch.float32, device=device)
        self.ring = self.buf[:ring_size].view(rows, layout.width)
        self.hist = self.buf[ring_size:].view(hist_rows, layout.layers, EXP_BINS)
        self.staging = torch.empty((total,), dtype=torch.float32, pin_memory=device.type == "cuda")
        self._index_cache: dict[tuple, torch.Tensor] = {}

    def column_index(self, key: tuple, block: str, layer_ids: Sequence[int]) -> torch.Tensor:
        """Ring columns of ``block`` for ``layer_ids`` as a device index, built once per ``key`` (no
        per-step host-to-device copy)."""
        idx = self._index_cache.get(key)
        if idx is None:
            idx = self._index_cache[key] = self._to_device(self.layout.column_ids(block, layer_ids))
        return idx

    def put_hist(self, hist_row: int, key: tuple, layer_ids: list[int], counts: list[torch.Tensor]) -> None:
        """Exponent counts of ``layer_ids`` into histogram row ``hist_row`` (the device index of their
        positions built once per ``key``)."""
        idx = self._index_cache.get(("h", key))
        if idx is None:
            idx = self._index_cache[("h", key)] = self._to_device(layer_ids)
        self.hist[hist_row].index_copy_(0, idx, torch.stack(counts).to(device=self.device, dtype=torch.float32))

    def _to_device(self, values: list[int]) -> torch.Tensor:
        """An index tensor on the buffer's device without a blocking copy (pinned source on CUDA)."""
        return to_device(values, torch.long, self.device)

    # -- step slots (every write a queued device copy or fill: no host read) -------------------------

    def put_lr(self, row: int, lr: torch.Tensor) -> None:
        self.ring[row, LR].copy_(lr.detach(), non_blocking=True)

    def put_loss(self, row: int, loss: torch.Tensor | float) -> None:
        if isinstance(loss, torch.Tensor):
            self.ring[row, LOSS].copy_(loss.detach().reshape(()), non_blocking=True)
        else:
            self.ring[row, LOSS].fill_(loss)

    def put_guards(self, row: int, norm_after: torch.Tensor, coef: torch.Tensor, threshold: torch.Tensor | None,
                   skipped: torch.Tensor | bool) -> None:
        """What the guards did: 0-d device tensors (no threshold: NaN), ``skipped`` also a host bool."""
        nan = torch.full((), math.nan, dtype=torch.float32, device=self.device)
        skip = skipped if isinstance(skipped, torch.Tensor) else torch.full((), 1.0 if skipped else 0.0, device=self.device)
        values = [norm_after, coef, nan if threshold is None else threshold, skip]
        self.ring[row, GUARD_SLOTS].copy_(torch.stack([v.to(device=self.device, dtype=torch.float32) for v in values]))

    def put_amp(self, row: int, scale: torch.Tensor | None, skipped: torch.Tensor | bool) -> None:
        """GradScaler's loss scale (a device tensor) and whether it skipped the step (a device flag or a
        host bool)."""
        if scale is not None:
            self.ring[row, AMP_SCALE].copy_(scale.detach().reshape(()).to(device=self.device, dtype=torch.float32),
                                            non_blocking=True)
        if isinstance(skipped, torch.Tensor):
            self.ring[row, AMP_SKIPPED].copy_((skipped.detach().reshape(()) > 0).to(device=self.device, dtype=torch.float32))
        else:
            self.ring[row, AMP_SKIPPED].fill_(1.0 if skipped else 0.0)

    # -- flush ----------------------------------------------------------------------------------------

    def used(self, rows: int, hist_rows: int) -> int:
        """Elements of the buffer that ``rows`` ring rows and ``hist_rows`` histogram rows span."""
        return self.ring[:rows].numel() if hist_rows == 0 else self.buf.numel()

    def to_host(self, used: int, rows: int, hist_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``rows`` ring rows and ``hist_rows`` histogram rows on the host, in float64: one
        device->host copy of the ``used`` elements."""
        self.staging[:used].copy_(self.buf[:used], non_blocking=self.staging.is_pinned())
        if self.staging.is_pinned():
            torch.cuda.current_stream(self.device).synchronize()  # sync-ok: the one sync per flush
        host = self.staging.numpy()  # sync-ok: host memory, after the one copy
        ring = host[: self.ring.numel()].reshape(self.ring.shape)[:rows].astype(np.float64)
        hist = host[self.ring.numel() :].reshape(self.hist.shape)[:hist_rows].astype(np.float64)
        return ring, hist

    def clear(self, used: int) -> None:
        self.buf[:used].fill_(math.nan)  # steps write only what they compute; the rest stays NaN
