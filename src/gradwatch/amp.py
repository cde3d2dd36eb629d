"""Mixed precision: what ``torch.amp.GradScaler`` did at each step, seen without a host read.

``scaler.step(optimizer)`` takes one of two paths, and gradwatch follows both:

* most optimizers: the scaler unscales the gradients in place (``unscale_``), then calls
  ``optimizer.step()`` only if they are all finite. gradwatch's step hooks therefore see unscaled
  gradients, and a step the scaler skips never reaches them: the wrapper below notices that
  ``optimizer.step()`` was not called during ``scaler.step`` and records the step as skipped by AMP
  (the scaler has already read its inf flag on the host to decide, so this costs nothing more);
* optimizers that unscale inside their kernel (``fused=True``): the scaler hands the loss scale and
  its inf flag to the optimizer (``optimizer.grad_scale`` / ``optimizer.found_inf``) and always calls
  ``step()``. The statistics are then taken from scaled gradients and divided by the scale at the
  flush; the flag is copied on the device into the step's record.

The scale in force is recorded at every step (``amp_scale``). Diagnosis leaves AMP-skipped steps out:
an overflow the scaler caught is how mixed precision calibrates its scale, not an explosion.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

#: optimizer id -> the GradScaler whose step() is running for it (set only during scaler.step).
_current: dict[int, Any] = {}
#: Called with (scaler, optimizer) before each scaler.step; each returns what to run after it (watch.py installs one).
_listeners: list[Callable[[Any, torch.optim.Optimizer], Any]] = []
_installed = False


def scaler_for(optimizer: torch.optim.Optimizer) -> Any | None:
    """The GradScaler stepping ``optimizer`` right now, or None."""
    return _current.get(id(optimizer))


def scale_of(scaler: Any) -> torch.Tensor | None:
    """The scaler's current loss scale as a device tensor (None before its first ``scale()``)."""
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, torch.Tensor) else None


def install(listener: Callable[[Any, torch.optim.Optimizer], Any]) -> None:
    """Wrap ``torch.amp.GradScaler.step`` once (idempotent). ``listener(scaler, optimizer)`` is called
    before the step and returns a callable to run after it (or None)."""
    global _installed
    if listener not in _listeners:
        _listeners.append(listener)
    if _installed:
        return
    try:
        from torch.amp import GradScaler
    except ImportError:  # pragma: no cover - every supported torch has it
        return
    original = GradScaler.step

    def step(self: Any, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if not getattr(self, "_enabled", False) or not _listeners:
            return original(self, optimizer, *args, **kwargs)
        afters = [a for a in (listen(self, optimizer) for listen in list(_listeners)) if a is not None]
        _current[id(optimizer)] = self
        try:
            result = original(self, optimizer, *args, **kwargs)
        finally:
            _current.pop(id(optimizer), None)
        for after in afters:
            after()
        return result

    step.__wrapped__ = original  # type: ignore[attr-defined]
    step.__doc__ = original.__doc__
    GradScaler.step = step  # type: ignore[method-assign]
    _installed = True
