"""Guards: fixes that act during training, between backward and the optimizer step, on the device.

    import gradwatch as gw
    with gw.watch(model, optimizer, guards=[gw.guards.ClipNorm(1.0), gw.guards.SkipNonFinite()]) as w:
        ...

They compose as a list, run in its order, and every step records the global gradient norm before
and after them, the clip coefficient, the threshold in force, and whether the step was skipped or
rolled back (``run.step_series("grad_norm_clipped")``, ``"clip_coef"``, ``"skipped"``, ...).
"""

from __future__ import annotations

from .adaptive import AutoClip, ZClip
from .base import Guard, GuardSetup, GuardStep, GuardStop, Window
from .clip import AGC, ClipNorm, ClipNormPerLayer, ClipValue
from .rollback import Rollback
from .skip import SkipNonFinite

__all__ = [
    "AGC",
    "AutoClip",
    "ClipNorm",
    "ClipNormPerLayer",
    "ClipValue",
    "Guard",
    "GuardSetup",
    "GuardStep",
    "GuardStop",
    "Rollback",
    "SkipNonFinite",
    "Window",
    "ZClip",
]
