"""Rollback: restore the last good snapshot of model and optimizer when training blows up.

Snapshots are device-to-device (or device-to-host) copies, taken every ``every`` steps without a
host read. The decision to roll back is taken on the host from the statistics the probe flushes
anyway (loss and global gradient norm of every step), so it costs no extra synchronisation; the
price is latency: a blow-up is acted on at the next flush, ``flush_every`` steps at most later.
The restore itself is a set of copies queued on the device.

Loop protection (in the spirit of PaLM's restart-and-skip and dlib's trainer, which both back off
rather than retry the same way): every rollback multiplies the learning rate by ``lr_factor`` again
and doubles the number of batches skipped after it; after ``max_rollbacks`` the run stops with a
:class:`GuardStop` that says what happened.
"""

from __future__ import annotations

import math
import numbers
import os
from collections import deque
from typing import Any

import numpy as np
import torch

from ..errors import GradwatchError
from .base import Guard, GuardSetup, GuardStep, GuardStop, Window
from .snapshots import Snapshot, SnapshotStore

#: A robust z-score's spread never counts as less than this share of the median (a flat loss would
#: otherwise make any wiggle a "spike"), nor, for log10 gradient norms, less than this many decades.
MIN_REL_SPREAD = 0.01
MIN_LOG_SPREAD = 0.1
_MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation


def robust_z(x: float, history: "deque[float]", floor: float) -> float:
    h = np.asarray(history, np.float64)
    med = float(np.median(h))
    spread = max(_MAD_TO_STD * float(np.median(np.abs(h - med))), floor, 1e-12)
    return (x - med) / spread


class Rollback(Guard):
    """Keep snapshots of model and optimizer state; on a blow-up, restore the last good one.

    A step triggers a rollback when its loss is non-finite, its gradient norm is non-finite (and no
    guard skipped it), or either spikes: a robust z-score (median and MAD of the last ``window``
    good steps; log10 for the norm) above ``z_thresh``.

    Args:
        every: steps between snapshots (a snapshot counts as good once the steps before it are
            stored and clean).
        keep: good snapshots kept (the oldest is dropped first).
        lr_factor: each rollback multiplies every param group's learning rate by this.
        skip_batches: optimizer steps made no-ops after a rollback (their batches are dropped, as
            PaLM skipped the batches around a spike); doubles with each further rollback.
        max_rollbacks: rollbacks allowed; the next trigger stops the run with :class:`GuardStop`.
        z_thresh: robust z-score that counts as a spike.
        window: good steps the z-score compares against; ``min_history`` must be seen first.
        storage: ``"device"`` (copies next to the model), ``"cpu"`` (host memory, pinned for CUDA
            models, for models that cannot afford another copy on the accelerator), or a directory
            (snapshots are written there with ``torch.save``, for models whose copies fit in neither;
            writing one waits for the device, once per ``every`` steps).
    """

    def __init__(
        self,
        every: int = 100,
        keep: int = 2,
        lr_factor: float = 0.5,
        skip_batches: int = 0,
        max_rollbacks: int = 3,
        z_thresh: float = 8.0,
        window: int = 50,
        min_history: int = 20,
        storage: str | os.PathLike[str] = "device",
    ):
        for name, v, low in (("every", every, 1), ("keep", keep, 1), ("skip_batches", skip_batches, 0),
                             ("max_rollbacks", max_rollbacks, 0), ("window", window, 2), ("min_history", min_history, 2)):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < low:
                raise GradwatchError(f"Rollback({name}) must be an integer >= {low}; got {v!r}.")
        if isinstance(lr_factor, bool) or not isinstance(lr_factor, numbers.Real) or not 0 < lr_factor <= 1:
            raise GradwatchError(f"Rollback(lr_factor) must be in (0, 1]; got {lr_factor!r}.")
        if isinstance(z_thresh, bool) or not isinstance(z_thresh, numbers.Real) or not z_thresh > 0:
            raise GradwatchError(f"Rollback(z_thresh) must be a positive number; got {z_thresh!r}.")
        if not isinstance(storage, (str, os.PathLike)) or not str(storage):
            raise GradwatchError(f"Rollback(storage) must be 'device', 'cpu' or a directory path; got {storage!r}.")
        self.every = int(every)
        self.keep = int(keep)
        self.lr_factor = float(lr_factor)
        self.skip_batches = int(skip_batches)
        self.max_rollbacks = int(max_rollbacks)
        self.z_thresh = float(z_thresh)
        self.window = int(window)
        self.min_history = int(min(min_history, window))
        self.storage = storage if storage in ("device", "cpu") else str(storage)

    def setup(self, ctx: GuardSetup) -> None:
        self._opt = ctx.optimizer
        self._say = ctx.say
        self._store = SnapshotStore(ctx.optimizer, ctx.model, self.storage, ctx.say)
        #: Snapshots taken and not yet dropped, oldest first.
        self._snapshots: list[Snapshot] = []
        self._loss: deque[float] = deque(maxlen=self.window)
        self._lognorm: deque[float] = deque(maxlen=self.window)
        self._pending: tuple[Snapshot, str, int] | None = None
        self._skip_left = 0
        self.rollbacks = 0
        #: One dict per rollback: step of the trigger, reason, snapshot step restored, step it happened, lr factor.
        self.events: list[dict[str, Any]] = []

    # -- snapshots --------------------------------------------------------------------------------

    def _take(self, step: int) -> None:
        self._snapshots.append(self._store.take(step))

    def _restore(self, snap: Snapshot) -> None:
        self._store.restore(snap)

    def _discard(self, snap: Snapshot) -> None:
        self._snapshots.remove(snap)
        self._store.release(snap)

    # -- the step ---------------------------------------------------------------------------------

    def prepare(self, step: GuardStep) -> None:
        if self._pending is not None:
            snap, reason, bad_step = self._pending
            self._pending = None
            if self.rollbacks >= self.max_rollbacks:
                raise GuardStop(
                    f"training blew up again at step {bad_step} ({reason}) after {self.rollbacks} rollback"
                    f"{'s' * (self.rollbacks != 1)}; Rollback stops the run rather than loop. Lower the learning "
                    "rate, add ClipNorm or ZClip, or look at the data around that step."
                )
            self._restore(snap)
            self.rollbacks += 1
            factor = self.lr_factor
            lrs = []
            scaled: set[int] = set()  # param groups may share one lr tensor: scale it once
            for group in self._opt.param_groups:
                lr = group.get("lr")
                if isinstance(lr, torch.Tensor):
                    if id(lr) not in scaled:
                        scaled.add(id(lr))
                        lr.mul_(factor)
                elif isinstance(lr, (int, float)):
                    group["lr"] = lr * factor
                    lrs.append(group["lr"])
            self._skip_left = self.skip_batches * 2 ** (self.rollbacks - 1)
            self.events.append({"trigger_step": bad_step, "reason": reason, "restored_step": snap.step,
                                "at_step": step.index, "lr_factor": factor, "skipped_batches": self._skip_left})
            lr_text = f"; learning rate x{factor:g}" + (f" -> {lrs[0]:.3g}" if lrs else "") if factor != 1 else ""
            skip_text = f"; the next {self._skip_left} batches are skipped" if self._skip_left else ""
            self._say(f"Rollback {self.rollbacks}/{self.max_rollbacks}: {reason} at step {bad_step}; restored the "
                      f"snapshot of step {snap.step}{lr_text}{skip_text}.")
            step.rolled_back = True
            step.host_skip = True  # this step's gradients come from the broken model
            return
        if self._skip_left > 0:
            self._skip_left -= 1
            step.host_skip = True
            return
        # At most one snapshot waits for its window to be checked: with every < flush_every the
        # snapshots thin out to one per window instead of piling up.
        if step.index % self.every == 0 and all(x.good for x in self._snapshots):
            self._take(step.index)

    # -- the decision, on the host ----------------------------------------------------------------

    def on_window(self, window: Window) -> None:
        if not len(window.steps) or self._pending is not None:
            return
        bad_step, reason, loss_bad = None, "", False
        for i, s in enumerate(window.steps):
            if window.skipped[i] > 0 or window.amp_skipped[i] > 0:
                continue  # a skipped step changed nothing (GradScaler's overflows are its own business)
            logged = window.loss_logged[i] > 0
            loss, norm = float(window.loss[i]), float(window.grad_norm[i])
            if logged and not math.isfinite(loss):
                bad_step, reason, loss_bad = int(s), "non-finite loss", True
            elif not math.isfinite(norm):
                bad_step, reason = int(s), "non-finite gradients"
            else:
                if logged and len(self._loss) >= self.min_history:
                    z = robust_z(loss, self._loss, MIN_REL_SPREAD * abs(float(np.median(self._loss))))
                    if z > self.z_thresh:
                        bad_step, reason, loss_bad = int(s), f"loss spike (robust z = {z:.0f})", True
                if bad_step is None and norm > 0 and len(self._lognorm) >= self.min_history:
                    z = robust_z(math.log10(norm), self._lognorm, MIN_LOG_SPREAD)
                    if z > self.z_thresh:
                        bad_step, reason = int(s), f"gradient-norm spike (robust z = {z:.0f})"
            if bad_step is not None:
                break
            if logged:
                self._loss.append(loss)
            if norm > 0:
                self._lognorm.append(math.log10(norm))
        if bad_step is None:
            last = int(window.steps[-1])
            for snap in self._snapshots:  # the state of step s was good if the loss at s was
                snap.good = snap.good or snap.step <= last
        else:
            # A snapshot of step s holds the weights the loss of step s was computed with: a bad loss
            # at step b condemns the snapshot of b itself; bad gradients at b (finite loss) do not.
            limit = bad_step - 1 if loss_bad else bad_step
            for snap in [x for x in self._snapshots if x.step > limit]:
                self._discard(snap)
            for snap in self._snapshots:
                snap.good = True
            if not self._snapshots:
                raise GuardStop(f"training blew up at step {bad_step} ({reason}) before Rollback had a good snapshot; "
                                "it takes one every `every` steps from step 0.")
            self._pending = (self._snapshots[-1], reason, bad_step)
        good = [x for x in self._snapshots if x.good]
        for snap in good[: max(0, len(good) - self.keep)]:
            if self._pending is None or snap is not self._pending[0]:
                self._discard(snap)

    def summary(self) -> str | None:
        if not self.events:
            return f"Rollback: no rollback was needed (snapshot every {self.every} steps)"
        parts = [f"step {e['trigger_step']} ({e['reason']}) -> step {e['restored_step']}" for e in self.events]
        return f"Rollback rolled back {len(self.events)} time{'s' * (len(self.events) != 1)}: " + "; ".join(parts)
