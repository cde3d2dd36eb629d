"""Zero-code attach: run an unmodified training script with every optimizer it creates watched.

``gradwatch run train.py --epochs 3`` behaves like ``python train.py --epochs 3`` — same
``sys.argv``, ``__name__ == "__main__"``, output and exit code — while:

* torch's *global* optimizer step hooks (``register_optimizer_step_pre_hook``) reach every
  ``torch.optim.Optimizer`` the script makes; each one's first step starts a stream, named by the
  module that owns its parameters (found once, on that first step);
* the scalar tensor that ``backward()`` is called on is taken as the loss of the next optimizer step
  (it is detached at once: no graph is kept alive).
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .errors import GradwatchError
from .guards.base import GuardStop
from .objects import live_instances
from .treatment import TreatmentRefused
from .watch import Watch, default_out, loss_node, unwrap_model


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


class _LossCapture:
    """Patches ``Tensor.backward`` and ``torch.autograd.backward`` to see the loss; undone on exit."""

    def __init__(self, watch: Watch):
        self._watch = watch
        self._orig_tensor_backward = torch.Tensor.backward
        self._orig_autograd_backward = torch.autograd.backward

    def _take(self, t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.numel() == 1 and t.is_floating_point():
            self._watch.stage_loss(t.detach(), loss_node(t))

    def __enter__(self) -> "_LossCapture":
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


class _KerasHooks:
    """``gradwatch run`` for Keras 3 scripts (torch backend): Keras optimizers are not torch ones,
    so their ``apply`` is wrapped — on the base class, as soon as the script imports Keras — and
    each optimizer's first apply starts a stream for the Keras model that owns its variables."""

    _MODULE = "keras.src.optimizers.base_optimizer"

    def __init__(self, watch: Watch):
        self._watch = watch
        self._attached: dict[int, Any] = {}
        self._refused: set[int] = set()
        self._restore: list[Any] = []
        self._finder: Any = None

    def __enter__(self) -> "_KerasHooks":
        if self._MODULE in sys.modules:
            self._patch(sys.modules[self._MODULE])
        else:
            hooks = self

            class Finder:
                def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
                    if name != hooks._MODULE:
                        return None
                    import importlib.machinery

                    spec = importlib.machinery.PathFinder.find_spec(name, path)
                    if spec is None or spec.loader is None:
                        return None
                    exec_module = spec.loader.exec_module

                    def exec_and_patch(module: Any) -> None:
                        exec_module(module)
                        hooks._patch(module)

                    spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
                    return spec

            self._finder = Finder()
            sys.meta_path.insert(0, self._finder)
        return self

    def _patch(self, module: Any) -> None:
        base = module.BaseOptimizer
        original = base.apply
        hooks = self

        def apply(opt: Any, grads: Any, trainable_variables: Any = None) -> Any:
            att = hooks._attachment(opt, trainable_variables)
            if att is None:
                return original(opt, grads, trainable_variables)
            grads = list(grads)
            att.before(grads, trainable_variables)
            try:
                return original(opt, grads, trainable_variables)
            finally:
                att.after()

        base.apply = apply
        self._restore.append(lambda: setattr(base, "apply", original))

    def _attachment(self, opt: Any, variables: Any) -> Any:
        key = id(opt)
        if key in self._attached or key in self._refused:
            return self._attached.get(key)
        try:
            from .keras import KerasAttachment, find_keras_model

            variables = list(variables if variables is not None else opt._trainable_variables)
            model = find_keras_model(variables, opt)
            self._attached[key] = KerasAttachment(self._watch, model, opt, variables, wrap=False)
            self._attached[key].capture_loss(model)  # the unscaled loss, also under a LossScaleOptimizer
        except GradwatchError as e:
            self._refused.add(key)
            print(f"gradwatch: not recording {type(opt).__name__}: {e}", file=sys.stderr)
        except Exception as e:  # a monitor must never stop the script it watches
            self._refused.add(key)
            print(f"gradwatch: not recording {type(opt).__name__} after an internal error "
                  f"({type(e).__name__}: {e}); training continues. Please report this.", file=sys.stderr)
        return self._attached.get(key)

    def __exit__(self, *exc: Any) -> None:
        if self._finder is not None and self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        while self._restore:
            self._restore.pop()()


class StepLimitReached(BaseException):
    """Raised from the optimizer's post-step hook after ``max_steps`` steps: a trial run is over.
    A BaseException, so that a script's ``except Exception`` does not swallow it."""


class _GlobalHooks:
    """torch's global optimizer step hooks, feeding every optimizer's steps to one Watch."""

    def __init__(self, watch: Watch, max_steps: int | None = None):
        self._watch = watch
        self._max_steps = max_steps
        self._handles: list[Any] = []
        self._refused: set[int] = set()

    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        w = self._watch
        if id(optimizer) not in w._attached and id(optimizer) not in self._refused:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            try:
                model = find_owner_module(params)
                label = variable_name(model) if model is not None else None
                w.add_optimizer(optimizer, model, hooks=False, label=label)
            except GradwatchError as e:
                # Training goes on unwatched rather than failing for the monitor's sake.
                self._refused.add(id(optimizer))
                print(f"gradwatch: not recording {type(optimizer).__name__}: {e}", file=sys.stderr)
                return
        if id(optimizer) in w._attached:
            w.on_before_optimizer_step(optimizer)

    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if id(optimizer) in self._watch._attached:
            self._watch.on_after_optimizer_step(optimizer)
        if self._max_steps is not None and self._watch.steps >= self._max_steps:
            raise StepLimitReached()

    def __enter__(self) -> "_GlobalHooks":
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._handles = [register_optimizer_step_pre_hook(self._before), register_optimizer_step_post_hook(self._after)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _exit_code(e: SystemExit) -> int:
    """What ``python script.py`` exits with for this SystemExit (a message goes to stderr)."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def _print_script_traceback(exc: BaseException, script: str) -> None:
    """Print the traceback as python would, without the runner's own frames on top."""
    tb = exc.__traceback__
    target = os.path.abspath(script)
    frames = tb
    while frames is not None and os.path.abspath(frames.tb_frame.f_code.co_filename) != target:
        frames = frames.tb_next
    traceback.print_exception(type(exc), exc, frames or tb)


def run_script(
    target: str,
    args: Sequence[str] = (),
    *,
    module: bool = False,
    out: str | os.PathLike[str] | None = None,
    max_steps: int | None = None,
    seed: int | None = None,
    treatment: Any = None,
    **watch_options: Any,
) -> tuple[int, Watch]:
    """Run a script (or ``-m`` module) as ``python`` would, recording every optimizer it steps.

    Args:
        max_steps: stop the script (cleanly, exit code 0) after this many optimizer steps.
        seed: seed Python's, numpy's and torch's generators before the script starts.
        treatment: a :class:`~gradwatch.treatment.Treatment` installed while the script runs
            (remedies applied from outside; its guards join the watch's).
    Returns:
        the script's exit code, and the :class:`~gradwatch.watch.Watch` (closed) that recorded it.
    """
    name = target.rsplit(".", 1)[-1] if module else Path(target).stem
    if treatment is not None and treatment.guards:
        watch_options["guards"] = list(watch_options.get("guards") or []) + treatment.guards
    if seed is not None:
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    w = Watch(out=out if out is not None else default_out(name), _lazy=True, **watch_options)
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [target, *args]
    if not module:
        # As `python script.py` does: the script's folder is the first import location.
        sys.path[0:1] = [str(Path(target).resolve().parent)]
    code, status = 0, "finished"
    try:
        with contextlib.ExitStack() as stack:
            if treatment is not None:
                stack.enter_context(treatment)  # first: its hooks run before the watch's
            stack.enter_context(_GlobalHooks(w, max_steps))
            stack.enter_context(_KerasHooks(w))
            stack.enter_context(_LossCapture(w))
            try:
                if module:
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(target, run_name="__main__")
            except StepLimitReached:
                code, status = 0, "finished"
            except TreatmentRefused as e:  # doctor's remedy does not fit this model: the trial is void
                print(f"gradwatch: error: the remedy could not be applied: {e}", file=sys.stderr)
                code, status = 3, "refused"
            except SystemExit as e:
                code = _exit_code(e)
                status = "finished" if code == 0 else "exited"
            except GuardStop as e:  # a guard stopped training on purpose: its sentence, not a traceback
                print(f"gradwatch: a guard stopped the run: {e}", file=sys.stderr)
                code, status = 1, "stopped"
            except KeyboardInterrupt as e:
                _print_script_traceback(e, target)
                code, status = 130, "interrupted"
            except BaseException as e:  # the script's own error: report it as python would
                _print_script_traceback(e, target)
                code, status = 1, "crashed"
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
        w.close(status=status)
    return code, w
