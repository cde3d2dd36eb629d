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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import GradwatchError
from ..probe.distributed import local_tensor, world
from .base import Guard, GuardSetup, GuardStep, GuardStop, Window

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


@dataclass
class _Saved:
    copy: torch.Tensor
    device: torch.device


@dataclass
class _Snapshot:
    step: int
    good: bool = False
    tensors: list[torch.Tensor] = field(default_factory=list)  # copies of the model's tensors
    file: Path | None = None  # storage on disk: the tensors and state live in this file instead
    # id(param) -> its optimizer state; tensors as (copy, the device the original lives on)
    state: dict[int, dict[str, Any]] = field(default_factory=dict)


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

    @property
    def _on_disk(self) -> bool:
        return self.storage not in ("device", "cpu")

    def setup(self, ctx: GuardSetup) -> None:
        self._opt = ctx.optimizer
        self._say = ctx.say
        self._disk_warned = False
        self._opt_params = [p for g in ctx.optimizer.param_groups for p in g["params"]]
        # This optimizer's parameters; the model's buffers (BatchNorm statistics) too when the model
        # is this optimizer's alone — with several optimizers on one model each restores only its own.
        tensors: list[torch.Tensor] = []
        seen: set[int] = set()
        mine = {id(p) for p in self._opt_params}
        buffers: list[torch.Tensor] = []
        if ctx.model is not None and all(id(p) in mine for p in ctx.model.parameters() if p.requires_grad):
            buffers = [b for _, b in ctx.model.named_buffers()]  # persistent or not
        for t in self._opt_params + buffers:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                tensors.append(t)
        self._tensors = tensors
        if self._on_disk:
            try:
                Path(self.storage).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise GradwatchError(f"Rollback cannot keep snapshots in {self.storage} ({e.strerror}); "
                                     "give a writable directory, or storage='cpu'.") from None
        self._snapshots: list[_Snapshot] = []
        self._pool: list[_Snapshot] = []
        self._loss: deque[float] = deque(maxlen=self.window)
        self._lognorm: deque[float] = deque(maxlen=self.window)
        self._pending: tuple[_Snapshot, str, int] | None = None
        self._skip_left = 0
        self.rollbacks = 0
        #: One dict per rollback: step of the trigger, reason, snapshot step restored, step it happened, lr factor.
        self.events: list[dict[str, Any]] = []

    # -- snapshots --------------------------------------------------------------------------------

    def _copy_of(self, t: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
        t = local_tensor(t)  # FSDP2: each rank keeps its own shard
        if old is not None and old.shape == t.shape and old.dtype == t.dtype:
            buf = old
        elif self._on_disk:
            return t.detach().to("cpu", copy=True)  # read now: it is written to disk next
        elif self.storage == "cpu":
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
        else:
            buf = torch.empty_like(t, memory_format=torch.contiguous_format)
        return buf.copy_(t.detach(), non_blocking=buf.is_pinned())

    def _to_disk(self, snap: _Snapshot) -> None:
        index = {id(p): i for i, p in enumerate(self._opt_params)}
        payload = {
            "step": snap.step,
            "tensors": snap.tensors,
            "state": {
                index[pid]: {k: {"tensor": v.copy, "device": str(v.device)} if isinstance(v, _Saved) else v
                             for k, v in st.items()}
                for pid, st in snap.state.items()
                if pid in index
            },
        }
        rank = world()
        suffix = f"-rank{rank[0]}" if rank is not None else ""  # every data-parallel rank keeps its own
        path = Path(self.storage) / f"rollback-step{snap.step}{suffix}.pt"
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        snap.file, snap.tensors, snap.state = path, [], {}

    def _from_disk(self, snap: _Snapshot) -> _Snapshot:
        assert snap.file is not None
        payload = torch.load(snap.file, map_location="cpu", weights_only=True)
        state = {
            id(self._opt_params[int(i)]): {
                k: _Saved(v["tensor"], torch.device(v["device"])) if isinstance(v, dict) and "tensor" in v else v
                for k, v in st.items()
            }
            for i, st in payload["state"].items()
        }
        return _Snapshot(snap.step, good=True, tensors=list(payload["tensors"]), state=state)

    def _discard(self, snap: _Snapshot) -> None:
        self._snapshots.remove(snap)
        if snap.file is not None:
            snap.file.unlink(missing_ok=True)
        else:
            self._pool.append(snap)

    def _take(self, step: int) -> None:
        snap = self._pool.pop() if self._pool else _Snapshot(step)
        old_tensors = snap.tensors if len(snap.tensors) == len(self._tensors) else [None] * len(self._tensors)
        snap.tensors = [self._copy_of(t, o) for t, o in zip(self._tensors, old_tensors)]
        old_state = snap.state
        snap.state = {}
        for p, st in self._opt.state.items():
            prev = old_state.get(id(p), {})
            saved: dict[str, Any] = {}
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    old = prev.get(k)
                    saved[k] = _Saved(self._copy_of(v, old.copy if isinstance(old, _Saved) else None), v.device)
                else:
                    saved[k] = v
            snap.state[id(p)] = saved
        snap.step, snap.good = step, False
        if self._on_disk:
            try:
                self._to_disk(snap)
            except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
                # A full or missing disk must not cost the guard (under data parallelism it would leave
                # this rank out of the next reduction): the snapshot stays in host memory instead.
                snap.file = None
                if not self._disk_warned:
                    self._disk_warned = True
                    self._say(f"Rollback: could not write a snapshot to {self.storage} ({getattr(e, 'strerror', None) or e}); "
                              "keeping snapshots in host memory instead.")
        self._snapshots.append(snap)

    def _restore(self, snap: _Snapshot) -> None:
        if snap.file is not None:
            snap = self._from_disk(snap)
        for t, saved in zip(self._tensors, snap.tensors):
            local_tensor(t.detach()).copy_(saved, non_blocking=saved.is_pinned())
        state = self._opt.state
        params = [p for g in self._opt.param_groups for p in g["params"]]
        for p in params:
            saved_state = snap.state.get(id(p))
            if saved_state is None:
                state.pop(p, None)  # created after the snapshot
                continue
            cur = state.setdefault(p, {})
            for k in [k for k in cur if k not in saved_state]:
                del cur[k]
            for k, v in saved_state.items():
                if isinstance(v, _Saved):
                    live = cur.get(k)
                    live = local_tensor(live) if isinstance(live, torch.Tensor) else live
                    if isinstance(live, torch.Tensor) and live.shape == v.copy.shape and live.dtype == v.copy.dtype:
                        live.copy_(v.copy, non_blocking=v.copy.is_pinned())
                    else:
                        cur[k] = v.copy.to(v.device, copy=True)
                else:
                    cur[k] = v

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
