"""Where an optimizer is inside torch's ``step()`` call, for the step hooks.

Two shapes of step need care. ``step(closure)`` (LBFGS, Lightning, any closure loop) computes its
gradients inside the step, so they can only be read once the closure has run. And a subclass whose
``step()`` calls ``super().step()`` fires the hooks twice per step once torch has hooked both
classes: the call is recognised by torch's step wrapper frame, still on the stack.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

#: Autograd nodes that only rescale or copy a loss (``loss / accumulate_grad_batches`` in Lightning
#: and the HF Trainer, ``loss * weight``): the loss function is the node below them.
_SCALING_NODES = ("DivBackward", "MulBackward", "CloneBackward", "ToCopyBackward")


def loss_node(loss: Any) -> str | None:
    """The autograd node that produced a loss tensor (``MseLossBackward0``, ``NllLossBackward0``):
    names the loss function for the diagnosis. A rescaling by a constant is looked through. Python
    attributes only: no device read."""
    node = getattr(loss, "grad_fn", None) if isinstance(loss, torch.Tensor) else None
    for _ in range(4):
        if node is None or not type(node).__name__.startswith(_SCALING_NODES):
            break
        inputs = [f for f, _ in getattr(node, "next_functions", ()) if f is not None]
        if len(inputs) != 1:  # a product or quotient of two graphs: not a plain rescaling
            break
        node = inputs[0]
    return type(node).__name__ if node is not None else None


class StepCall:
    """One optimizer's step() in progress: its closure state and the frame of torch's hooked step()."""

    def __init__(self, optimizer: torch.optim.Optimizer, quiet: bool):
        self.optimizer = optimizer
        self.quiet = quiet
        #: optimizer.step(closure): "waiting" until the closure has computed this step's gradients.
        self.closure_state: str | None = None
        self.closure_said = False
        #: The frame of torch's hooked step() this optimizer is inside.
        self.step_frame: Any = None

    def enter(self, args: tuple, kwargs: dict[str, Any], record: Callable[[], None],
              stage_loss: Callable[[torch.Tensor, str | None], None]) -> Any:
        """The body of a step pre-hook. A plain ``step()``: ``record()`` now. ``step(closure)`` (LBFGS,
        Lightning, any closure loop): the gradients do not exist yet — the closure computes them
        inside the step — so the closure is wrapped and the step is recorded right after its first
        call returns, before the optimizer uses them; the closure's loss is the step's. Returns what
        a pre-hook returns (new arguments, or None)."""
        if self.step_frame is not None and _frame_is_active(self.step_frame):
            # A step() inside this optimizer's step(): a subclass calling super().step(), when torch
            # has hooked both classes' step. The outer call records it, once.
            return None
        self.step_frame = _torch_step_frame()
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        if closure is None:
            self.closure_state = None
            record()
            return None
        self.closure_state = "waiting"

        def closure_then_record(*a: Any, **k: Any) -> Any:
            result = closure(*a, **k)
            if self.closure_state == "waiting":
                self.closure_state = "recorded"
                if isinstance(result, torch.Tensor) and result.numel() == 1 and result.is_floating_point():
                    stage_loss(result.detach(), loss_node(result))
                with torch.no_grad():
                    record()
            return result

        if len(args) > 1:
            return (args[0], closure_then_record, *args[2:]), kwargs
        return args, {**kwargs, "closure": closure_then_record}

    def leave(self) -> bool:
        """The body of a step post-hook: whether the step just taken is to be finished as recorded
        (False for the end of a nested step(), or a closure the optimizer never called)."""
        if self.step_frame is not None and _torch_step_frame() is not self.step_frame:
            return False  # the end of a nested step() (see enter)
        self.step_frame = None
        if self.closure_state == "waiting":  # the optimizer was given a closure and never called it
            self.closure_state = None
            if not self.closure_said and not self.quiet:
                self.closure_said = True
                print(f"gradwatch: {type(self.optimizer).__name__}.step(closure) returned without calling its "
                      "closure, so its gradients were never computed at a point gradwatch could read; "
                      "such steps are not recorded.", file=sys.stderr)
            return False
        self.closure_state = None
        return True


# ------------------------------------------------------------------- torch's hooked step() frames

#: The code of torch's hooked ``Optimizer.step`` wrapper (one code object for every hooked class).
_STEP_WRAPPER_CODE = torch.optim.Optimizer.profile_hook_step(lambda *a, **k: None).__code__


def _torch_step_frame(limit: int = 10) -> Any:
    """The frame of the hooked ``step()`` that is calling the current hook, or None."""
    frame = sys._getframe(2)
    for _ in range(limit):
        if frame is None or frame.f_code is _STEP_WRAPPER_CODE:
            return frame
        frame = frame.f_back
    return None


def _frame_is_active(target: Any) -> bool:
    """Whether ``target`` is on the current call stack (a step() that raised is not)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame is target:
            return True
        frame = frame.f_back
    return False
