"""Zero-code attach: run an unmodified training script with every optimizer it creates watched.

``gradwatch run train.py --epochs 3`` behaves like ``python train.py --epochs 3`` — same
``sys.argv``, ``__name__ == "__main__"``, output and exit code — while:

* torch's *global* optimizer step hooks (``register_optimizer_step_pre_hook``) reach every
  ``torch.optim.Optimizer`` the script makes; each one's first step starts a stream, named by the
  module that owns its parameters (found once, on that first step);
* ``step(closure)`` (LBFGS, custom closure loops) is recorded right after the closure's first call,
  when the step's gradients exist (:meth:`~gradwatch.watch.Watch.step_pre_hook`);
* the scalar tensor that ``backward()`` is called on is taken as the loss of the next optimizer step
  (it is detached at once: no graph is kept alive);
* a Lightning ``Trainer`` or a Hugging Face ``Trainer`` gets gradwatch's own callback when it is
  built (:class:`_TrainerHooks`) — the global hooks would see Lightning's gradients one step late
  and the Trainer's after its clipping — and the global hooks stand down for the optimizers a
  callback (or a watch of the script's own) records: see :func:`~gradwatch.watch.claim`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.machinery
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
from .session import default_out
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


class _AfterImport:
    """Runs ``patch(module)`` for each named module as soon as it is imported (at once if it is
    already): a meta-path finder wraps the module's ``exec_module``. Taken off on exit; what the
    patches did is undone by the ``undo`` callables they return."""

    def __init__(self, patches: dict[str, Any]):
        self._patches = patches
        self._undo: list[Any] = []
        self._finder: Any = None

    def _apply(self, name: str, module: Any) -> None:
        try:
            undo = self._patches[name](module)
        except Exception as e:  # a monitor must never stop the script it watches
            print(f"gradwatch: could not hook into {name} ({type(e).__name__}: {e}); it is not recorded.",
                  file=sys.stderr)
            return
        if undo is not None:
            self._undo.append(undo)

    def __enter__(self) -> "_AfterImport":
        waiting = set()
        for name in self._patches:
            if name in sys.modules:
                self._apply(name, sys.modules[name])
            else:
                waiting.add(name)
        if not waiting:
            return self
        hooks = self

        class Finder:
            def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
                if name not in waiting:
                    return None
                spec = importlib.machinery.PathFinder.find_spec(name, path)
                if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                    return None
                exec_module = spec.loader.exec_module

                def exec_and_patch(module: Any) -> None:
                    exec_module(module)
                    waiting.discard(name)
                    hooks._apply(name, module)

                spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
                return spec

        self._finder = Finder()
        sys.meta_path.insert(0, self._finder)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._finder is not None and self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        while self._undo:
            self._undo.pop()()


class _KerasHooks:
    """``gradwatch run`` for Keras 3 scripts (torch backend): Keras optimizers are not torch ones,
    so their ``apply`` is wrapped — on the base class, as soon as the script imports Keras — and
    each optimizer's first apply starts a stream for the Keras model that owns its variables.
    An optimizer that a ``gradwatch.keras.GradWatch`` callback of the script's own records is left to it."""

    def __init__(self, watch: Watch, others: dict[int, Any] | None = None):
        self._watch = watch
        self._attachments: dict[int, Any] = {}
        self._refused: set[int] = set()
        self._others = others if others is not None else {}
        self._imports = _AfterImport({"keras.src.optimizers.base_optimizer": self._patch})

    def __enter__(self) -> "_KerasHooks":
        self._imports.__enter__()
        return self

    def _patch(self, module: Any) -> Any:
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
        return lambda: setattr(base, "apply", original)

    def _attachment(self, opt: Any, variables: Any) -> Any:
        key = id(opt)
        owner = claimed_by(getattr(opt, "inner_optimizer", None) or opt)
        if owner is not None:  # the script's own callback records it
            self._others[id(owner)] = owner
            return None
        if key in self._attachments or key in self._refused:
            return self._attachments.get(key)
        try:
            from .keras import KerasAttachment, find_keras_model

            variables = list(variables if variables is not None else opt._trainable_variables)
            model = find_keras_model(variables, opt)
            self._attachments[key] = KerasAttachment(self._watch, model, opt, variables, wrap=False)
            self._attachments[key].capture_loss(model)  # the unscaled loss, also under a LossScaleOptimizer
        except GradwatchError as e:
            self._refused.add(key)
            print(f"gradwatch: not recording {type(opt).__name__}: {e}", file=sys.stderr)
        except Exception as e:  # a monitor must never stop the script it watches
            self._refused.add(key)
            print(f"gradwatch: not recording {type(opt).__name__} after an internal error "
                  f"({type(e).__name__}: {e}); training continues. Please report this.", file=sys.stderr)
        return self._attachments.get(key)

    def __exit__(self, *exc: Any) -> None:
        self._imports.__exit__(*exc)


class _ClipNotice:
    """Notes the script's own ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` calls (which
    parameters, which limit), so that the global hooks can say that a stream's gradients were
    clipped before ``optimizer.step()`` saw them. The call itself is unchanged (a generator of
    parameters is read into a list first, which the function does as well)."""

    NAMES = {"clip_grad_norm_": "max_norm", "clip_grad_value_": "clip_value"}

    def __init__(self, hooks: _GlobalHooks):
        self._hooks = hooks
        self._undo: list[Any] = []

    def __enter__(self) -> "_ClipNotice":
        from torch.nn.utils import clip_grad

        for name, limit in self.NAMES.items():
            original = getattr(clip_grad, name, None)
            if original is None:
                continue
            wrapper = self._wrap(original, name, limit)
            for module in (clip_grad, torch.nn.utils):
                if getattr(module, name, None) is original:
                    setattr(module, name, wrapper)
                    self._undo.append(functools.partial(setattr, module, name, original))
        return self

    def _wrap(self, original: Any, name: str, limit_name: str) -> Any:
        hooks = self._hooks

        @functools.wraps(original)
        def clip(parameters: Any, *args: Any, **kwargs: Any) -> Any:
            params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            limit = args[0] if args else kwargs.get(limit_name)
            if isinstance(limit, (int, float)):
                hooks.script_clip = ({id(p) for p in params}, {"function": name, limit_name: float(limit)})
            return original(params, *args, **kwargs)

        return clip

    def __exit__(self, *exc: Any) -> None:
        while self._undo:
            self._undo.pop()()


class _TrainerHooks:
    """Trainers that run the step themselves get gradwatch's callback for them, into this run.

    A Lightning ``Trainer`` runs the whole step inside ``optimizer.step(closure)`` and calls
    ``on_before_optimizer_step`` (before its own clipping) from inside that closure; a Hugging Face
    ``Trainer`` clips before ``optimizer.step()``. The callbacks read the gradients at those points.
    So the Trainer's ``__init__`` is wrapped, as soon as the script imports the Trainer's module, to
    add :class:`gradwatch.lightning.GradWatch` (to the ``callbacks`` argument, in a new list) or
    :class:`gradwatch.transformers.GradWatchCallback` (with ``add_callback`` after ``__init__``) —
    unless the script already gave one — recording into the runner's watch. The callback claims
    its optimizers, so the global hooks leave them alone.
    """

    LIGHTNING = ("lightning.pytorch.trainer.trainer", "pytorch_lightning.trainer.trainer")
    TRANSFORMERS = "transformers.trainer"

    def __init__(self, watch: Watch):
        self._watch = watch
        patches: dict[str, Any] = {name: self._patch_lightning for name in self.LIGHTNING}
        patches[self.TRANSFORMERS] = self._patch_transformers
        self._imports = _AfterImport(patches)

    def __enter__(self) -> "_TrainerHooks":
        self._imports.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._imports.__exit__(*exc)

    @staticmethod
    def _wrap_init(cls: type, wrapper: Any) -> Any:
        original = cls.__dict__["__init__"]
        patched = functools.wraps(original)(lambda self, *a, **k: wrapper(original, self, *a, **k))
        cls.__init__ = patched  # type: ignore[misc]
        return lambda: setattr(cls, "__init__", original) if cls.__dict__.get("__init__") is patched else None

    def _patch_lightning(self, module: Any) -> Any:
        def init(original: Any, trainer: Any, *args: Any, **kwargs: Any) -> Any:
            kwargs["callbacks"] = self._lightning_callbacks(kwargs.get("callbacks"))
            return original(trainer, *args, **kwargs)

        return self._wrap_init(module.Trainer, init)

    def _lightning_callbacks(self, given: Any) -> Any:
        callbacks = [] if given is None else list(given) if isinstance(given, (list, tuple)) else [given]
        mine = sys.modules.get("gradwatch.lightning")
        if mine is not None and any(isinstance(c, mine.GradWatch) for c in callbacks):
            return given  # the script added gradwatch's callback itself: it records, once
        try:
            from .lightning import GradWatch
        except Exception as e:  # e.g. a pytorch_lightning without the lightning package
            print(f"gradwatch: could not add the Lightning callback ({type(e).__name__}: {e}); the global "
                  "optimizer hooks record instead, after Lightning's closure (clipped gradients, if it clips).",
                  file=sys.stderr)
            return given
        return [*callbacks, GradWatch(watch=self._watch)]

    def _patch_transformers(self, module: Any) -> Any:
        def init(original: Any, trainer: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(trainer, *args, **kwargs)
            try:
                from .transformers import GradWatchCallback

                handler = getattr(trainer, "callback_handler", None)
                if not any(isinstance(c, GradWatchCallback) for c in getattr(handler, "callbacks", ())):
                    trainer.add_callback(GradWatchCallback(watch=self._watch))
            except Exception as e:  # a monitor must never stop the script it watches
                print(f"gradwatch: could not add the Trainer callback ({type(e).__name__}: {e}); the global "
                      "optimizer hooks record instead, after the Trainer's gradient clipping.", file=sys.stderr)
            return result

        return self._wrap_init(module.Trainer, init)


class StepLimitReached(BaseException):
    """Raised from the optimizer's post-step hook after ``max_steps`` steps: a trial run is over.
    A BaseException, so that a script's ``except Exception`` does not swallow it."""


class _GlobalHooks:
    """torch's global optimizer step hooks, feeding every optimizer's steps to one Watch — except
    the optimizers someone else records (a trainer callback, a watch of the script's own)."""

    def __init__(self, watch: Watch, max_steps: int | None = None):
        self._watch = watch
        self._max_steps = max_steps
        self._handles: list[Any] = []
        self._refused: set[int] = set()
        #: Who else records optimizers of this script (the script's own watches and callbacks), by id.
        self.others: dict[int, Any] = {}
        #: The script's latest clip_grad_norm_/clip_grad_value_ call: (ids of its parameters, its settings).
        self.script_clip: tuple[set[int], dict[str, Any]] | None = None
        self._clip_said: set[int] = set()

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
        if self.script_clip is not None and id(optimizer) not in self._clip_said:
            self._say_script_clips(optimizer)
        return w.step_pre_hook(optimizer, args, kwargs)

    def _say_script_clips(self, optimizer: torch.optim.Optimizer) -> None:
        """The script clipped this optimizer's gradients itself before stepping: what reaches step()
        is clipped. Said once per optimizer, on stderr and in the stream's meta.json entry."""
        ids, clip = self.script_clip  # type: ignore[misc]
        if not any(id(p) in ids for g in optimizer.param_groups for p in g["params"]):
            return
        self._clip_said.add(id(optimizer))
        w = self._watch
        if not w.watches(optimizer):
            return
        w.describe_stream(optimizer, script_clipping=clip)
        if w.quiet:
            return
        limit = clip.get("max_norm", clip.get("clip_value"))
        option = "--clip-norm" if "max_norm" in clip else "--clip-value"
        print(f"gradwatch: the script clips {type(optimizer).__name__}'s gradients itself ({clip['function']}, "
              f"{'max_norm' if 'max_norm' in clip else 'clip_value'}={limit:g}) before optimizer.step(), so gradwatch "
              f"records them after that clip and they look no larger than {limit:g}. To see them before it, let "
              f"gradwatch clip instead: remove that call and run with `{option} {limit:g}`.", file=sys.stderr)

    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if claimed_by(optimizer) is None:
            self._watch.step_post_hook(optimizer, args, kwargs)
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
    w = Watch(out=out if out is not None else default_out(name), attach_later=True, **watch_options)
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [target, *args]
    if not module:
        # As `python script.py` does: the script's folder is the first import location.
        sys.path[0:1] = [str(Path(target).resolve().parent)]
    code, status = 0, "finished"
    hooks: _GlobalHooks | None = None
    try:
        with contextlib.ExitStack() as stack:
            if treatment is not None:
                stack.enter_context(treatment)  # first: its hooks run before the watch's
            hooks = stack.enter_context(_GlobalHooks(w, max_steps))
            stack.enter_context(_ClipNotice(hooks))
            stack.enter_context(_KerasHooks(w, hooks.others))
            stack.enter_context(_TrainerHooks(w))
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
        others = hooks.others.values() if hooks is not None else ()
        if others and not w.layers and not w.quiet:
            # Not "nothing was recorded": the script records its optimizers itself.
            names = ", ".join(sorted({_describe_owner(o) for o in others}))
            print(f"gradwatch: the script records its optimizers itself ({names}); `gradwatch run` added nothing "
                  "to that.", file=sys.stderr)
            w.quiet = True
        w.close(status=status)
    return code, w


def _describe_owner(owner: Any) -> str:
    """``GradWatch -> runs/lit`` for a callback or watch of the script's own."""
    out = getattr(owner, "out", None)
    if out is None:
        out = getattr(getattr(owner, "watch", None), "out", None)
    name = getattr(owner, "owner_name", type(owner).__name__)
    return f"{name} -> {out}" if out is not None else name
