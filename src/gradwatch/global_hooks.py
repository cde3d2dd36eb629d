"""``gradwatch run``'s process-wide hooks into torch, feeding one Watch every optimizer the script steps:

* torch's *global* optimizer step hooks (``register_optimizer_step_pre_hook``) reach every
  ``torch.optim.Optimizer``; each one's first step starts a stream, named by the module that owns
  its parameters (found once, on that first step) — :class:`GlobalHooks`;
* the scalar tensor that ``backward()`` is called on is taken as the loss of the next optimizer step
  (it is detached at once: no graph is kept alive) — :class:`LossCapture`.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import torch
from torch import nn

from .errors import GradwatchError
from .objects import live_instances
from .script_clips import ScriptClips
from .watch import Watch, claimed_by, loss_node, unwrap_model


def find_owner_module(params: Sequence[torch.Tensor]) -> nn.Module | None:
    """The module that owns ``params``: most of them, fewest others; on a tie the outermost, so
    that ``Sequential(Linear, Sigmoid)`` is watched with its activation rather than its Linear
    alone, except that wrappers (``DistributedDataParallel``, ``DataParallel``, ``torch.compile``'s
    module) lose to the model they wrap.

    Searched among live modules once per optimizer (at its first step).
    """
    wanted = {id(p) for p in params}
    best_key: tuple[int, int] = (0, 0)
    tied: list[nn.Module] = []
    for obj in live_instances(nn.Module):
        ids = {id(p) for p in obj.parameters()}
        covered = len(wanted & ids)
        if not covered:
            continue
        key = (covered, -len(ids))
        if key > best_key:
            best_key, tied = key, [obj]
        elif key == best_key:
            tied.append(obj)
    candidates = [m for m in tied if unwrap_model(m) is m] or tied
    for m in candidates:  # the outermost: no other candidate contains it
        if not any(o is not m and any(x is m for x in o.modules()) for o in candidates):
            return m
    return candidates[0] if candidates else None


def variable_name(obj: object, max_depth: int = 64) -> str | None:
    """The name the calling code binds ``obj`` to (``G``, ``netD``, ``self.model`` -> ``model``)."""
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            break
        if frame.f_globals.get("__name__", "").partition(".")[0] in ("gradwatch", "torch"):
            frame = frame.f_back  # our frames and torch's: the user's names are further out
            continue
        for name, value in frame.f_locals.items():
            if value is obj and not name.startswith("_"):
                return name
        owner = frame.f_locals.get("self")
        if owner is not None:
            for name, value in getattr(owner, "__dict__", {}).items():
                if value is obj and not name.startswith("_"):
                    return name
        frame = frame.f_back
    return None


class LossCapture:
    """Patches ``Tensor.backward`` and ``torch.autograd.backward`` to see the loss; undone on exit."""

    def __init__(self, watch: Watch):
        self._watch = watch
        self._orig_tensor_backward = torch.Tensor.backward
        self._orig_autograd_backward = torch.autograd.backward

    def _take(self, t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.numel() == 1 and t.is_floating_point():
            self._watch.stage_loss(t.detach(), loss_node(t))

    def __enter__(self) -> "LossCapture":
        orig_t, orig_a, take = self._orig_tensor_backward, self._orig_autograd_backward, self._take

        def tensor_backward(self_t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            take(self_t)
            return orig_t(self_t, *args, **kwargs)

        def autograd_backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
            take(tensors[0] if isinstance(tensors, (list, tuple)) and len(tensors) == 1 else tensors)
            return orig_a(tensors, *args, **kwargs)

        torch.Tensor.backward = tensor_backward  # type: ignore[method-assign]
        torch.autograd.backward = autograd_backward  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.Tensor.backward = self._orig_tensor_backward  # type: ignore[method-assign]
        torch.autograd.backward = self._orig_autograd_backward  # type: ignore[assignment]


class StepLimitReached(BaseException):
    """Raised from the optimizer's post-step hook after ``max_steps`` steps: a trial run is over.
    A BaseException, so that a script's ``except Exception`` does not swallow it."""


class GlobalHooks:
    """torch's global optimizer step hooks, feeding every optimizer's steps to one Watch — except
    the optimizers someone else records (a trainer callback, a watch of the script's own). ``clips``
    is told of each step, to say when the script clipped its gradients before it."""

    def __init__(self, watch: Watch, max_steps: int | None = None, clips: ScriptClips | None = None):
        self._watch = watch
        self._max_steps = max_steps
        self._clips = clips
        self._handles: list[Any] = []
        self._refused: set[int] = set()
        #: Who else records optimizers of this script (the script's own watches and callbacks), by id.
        self.others: dict[int, Any] = {}

    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        w = self._watch
        owner = claimed_by(optimizer)
        if owner is not None:
            if getattr(owner, "watch", None) is not w:
                self.others[id(owner)] = owner
            return None
        if not w.watches(optimizer) and id(optimizer) not in self._refused:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            try:
                model = find_owner_module(params)
                label = variable_name(model) if model is not None else None
                w.add_optimizer(optimizer, model, hooks=False, label=label)
            except GradwatchError as e:
                # Training goes on unwatched rather than failing for the monitor's sake.
                self._refused.add(id(optimizer))
                print(f"gradwatch: not recording {type(optimizer).__name__}: {e}", file=sys.stderr)
                return None
        if self._clips is not None:
            self._clips.say(optimizer)
        return w.step_pre_hook(optimizer, args, kwargs)

    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if claimed_by(optimizer) is None:
            self._watch.step_post_hook(optimizer, args, kwargs)
        if self._max_steps is not None and self._watch.steps >= self._max_steps:
            raise StepLimitReached()

    def __enter__(self) -> "GlobalHooks":
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._handles = [register_optimizer_step_pre_hook(self._before), register_optimizer_step_post_hook(self._after)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
