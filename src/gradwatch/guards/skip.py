"""SkipNonFinite: a step whose gradients are not finite leaves parameters and optimizer state as they were."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

from ..errors import GradwatchError
from ..probe.distributed import local_tensor
from .base import Guard, GuardSetup, GuardStep, GuardStop, Window


class SkipNonFinite(Guard):
    """Skip every optimizer step whose gradients hold NaN or ±Inf — or are so large that their
    float32 global norm overflows (about 1.8e19) — with the parameters **and the optimizer state**
    left exactly as they were.

    The decision stays on the device (``isfinite`` of the norm the probe already has). It is carried
    out in one of two ways, neither of which reads the flag on the host:

    * optimizers that take a ``found_inf`` tensor (the fused ones: ``Adam(fused=True)``, ``AdamW``,
      ``SGD``, ``Adagrad``) get it, as ``GradScaler`` does, and skip inside their kernel — free;
    * any other optimizer: before the step, the parameters that have a gradient and their state
      tensors are copied into preallocated buffers; after it, ``torch.where(skip, saved, new)`` puts
      them back where the step is skipped. Multiplying the gradients by zero would not do: ``0·NaN``
      is NaN, and Adam's moments would still decay. This costs one copy of those tensors per step.

    Two cases do read the flag once, on the host: a step at which the optimizer creates its state
    (normally its first: the state's initial values are not known beforehand, so a skipped first
    step removes the state again), and optimizers that keep non-tensor state (plain Python numbers).

    Args:
        max_consecutive: after this many skipped steps in a row, stop with :class:`GuardStop`
            instead of skipping forever (checked when each window of statistics is flushed).
    """

    def __init__(self, max_consecutive: int = 25):
        if not isinstance(max_consecutive, numbers.Integral) or isinstance(max_consecutive, bool) or max_consecutive < 1:
            raise GradwatchError(f"SkipNonFinite(max_consecutive) must be a positive integer; got {max_consecutive!r}.")
        self.max_consecutive = int(max_consecutive)

    def setup(self, ctx: GuardSetup) -> None:
        self._opt = ctx.optimizer
        self._say = ctx.say
        self._fused = bool(getattr(ctx.optimizer, "_step_supports_amp_scaling", False))
        self._buffers: dict[int, torch.Tensor] = {}
        self._armed = False
        self._run = 0  # consecutive skipped steps so far (host, from flushed windows)
        self._run_start = -1
        self._skipped: list[int] = []
        self._warned = False

    # -- before the step --------------------------------------------------------------------------

    def before_step(self, step: GuardStep) -> None:
        step.request_skip(~torch.isfinite(step.raw_norm))
        self._armed = True
        state = self._opt.state
        # This rank's part of each tensor (an FSDP2 DTensor's local shard; a plain tensor itself).
        self._params = [local_tensor(p.detach()) for p in step.params]
        # Parameters without optimizer state yet: if this step creates some, its initial values are
        # not known beforehand, so a skipped step removes it again (one host read, at that step only).
        self._stateless = [p for p in step.params if not state.get(p)]
        self._found_set = False
        if self._fused:
            return  # found_inf is handed over in commit(), once every guard has asked
        self._entries: list[tuple[dict[str, Any], str, torch.Tensor]] = []
        self._host_values: list[tuple[dict[str, Any], str, Any]] = []
        for p in step.params:
            for k, v in state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    self._entries.append((state[p], k, v))
                else:
                    self._host_values.append((state[p], k, v))
        live = self._params + [local_tensor(v.detach()) for _, _, v in self._entries]
        self._saved = [self._buffer(t) for t in live]
        if live:
            torch._foreach_copy_(self._saved, live)
        if self._host_values and not self._warned:
            self._warned = True
            self._say(f"SkipNonFinite: {type(self._opt).__name__} keeps plain-number state, which cannot be "
                      "restored on the device; the skip flag is read on the host at each step for it.")

    def _buffer(self, t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(id(t))
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.device != t.device:
            buf = self._buffers[id(t)] = torch.empty_like(t, memory_format=torch.contiguous_format)
        return buf

    def commit(self, step: GuardStep) -> None:
        """Fused optimizers: hand them the final skip flag (every guard's request is in it now)."""
        if not (self._fused and self._armed):
            return
        opt = self._opt
        found = step.skip.to(device=step.params[0].device, dtype=torch.float32)
        self._had_found = hasattr(opt, "found_inf")
        self._prev_found = getattr(opt, "found_inf", None)
        prev = self._prev_found
        opt.found_inf = found if prev is None else torch.maximum(prev, found.to(prev.device))
        self._found_set = True

    def abort(self, step: GuardStep | None) -> None:
        """The step goes on unguarded (something after commit failed): take back the flag."""
        self._give_back_found_inf()
        self._armed = False

    def _give_back_found_inf(self) -> None:
        if not self._found_set:
            return
        self._found_set = False
        if self._had_found:
            self._opt.found_inf = self._prev_found
        elif hasattr(self._opt, "found_inf"):
            del self._opt.found_inf

    # -- after the step ---------------------------------------------------------------------------

    def after_step(self, step: GuardStep) -> None:
        if not self._armed:
            return
        self._armed = False
        self._give_back_found_inf()
        skip = step.skip
        state = self._opt.state
        created = [p for p in self._stateless if state.get(p)]
        if created or (not self._fused and self._host_values):
            if bool(skip):  # sync-ok: only at a step that created optimizer state, or plain-number state
                if not self._fused:
                    self._restore_exactly()
                for p in created:
                    del state[p]  # created by this skipped step
            return
        if self._fused:
            return  # the kernel skipped the update itself
        n = len(self._params)
        for p, saved in zip(self._params, self._saved[:n]):
            torch.where(skip, saved, p, out=p)
        for (st, k, old), saved in zip(self._entries, self._saved[n:]):
            cur = st.get(k)
            if cur is old:
                local = local_tensor(old.detach())
                torch.where(skip, saved, local, out=local)
            elif isinstance(cur, torch.Tensor) and cur is local_tensor(cur):
                st[k] = torch.where(skip, saved, cur)  # the optimizer replaced the tensor instead of updating it

    def _restore_exactly(self) -> None:
        n = len(self._params)
        for p, saved in zip(self._params, self._saved[:n]):
            p.copy_(saved)
        for (st, k, old), saved in zip(self._entries, self._saved[n:]):
            if st.get(k) is old and old is not local_tensor(old):
                local_tensor(old.detach()).copy_(saved)  # a DTensor stays one
            else:
                st[k] = saved.clone()
        for st, k, v in self._host_values:
            st[k] = v

    # -- on the host, per flushed window ---------------------------------------------------------

    def on_window(self, window: Window) -> None:
        bad = (window.skipped > 0) & ~np.isfinite(window.grad_norm)
        for step, b, amp in zip(window.steps, bad, window.amp_skipped > 0):
            if amp:
                continue  # GradScaler's overflow (a fused optimizer shows it to the guards too): not ours
            if b:
                self._skipped.append(int(step))
                if self._run == 0:
                    self._run_start = int(step)
                self._run += 1
            else:
                self._run = 0
        if self._run >= self.max_consecutive:
            raise GuardStop(
                f"{self._run} optimizer steps in a row had non-finite gradients (steps {self._run_start}-"
                f"{self._skipped[-1]}); SkipNonFinite stops here rather than skip forever. The weights or "
                "the data are broken: lower the learning rate, add ClipNorm, or check the inputs for NaN."
            )

    @property
    def skipped_steps(self) -> list[int]:
        """Steps skipped for non-finite gradients, as far as the stored windows tell."""
        return list(self._skipped)

    def summary(self) -> str | None:
        n = len(self._skipped)
        if not n:
            return "SkipNonFinite: no step had non-finite gradients"
        shown = ", ".join(map(str, self._skipped[:8])) + (", ..." if n > 8 else "")
        return f"SkipNonFinite skipped {n} step{'s' * (n != 1)} with non-finite gradients (at {shown})"
