"""Zero-code attach: run an unmodified training script with every optimizer it creates watched.

``gradwatch run train.py --epochs 3`` behaves like ``python train.py --epochs 3`` — same
``sys.argv``, ``__name__ == "__main__"``, output and exit code — while:

* torch's *global* optimizer step hooks (``register_optimizer_step_pre_hook``) reach every
  ``torch.optim.Optimizer`` the script makes; each one's first step starts a stream, named by the
  module that owns its parameters (found once, on that first step) — :mod:`gradwatch.global_hooks`;
* ``step(closure)`` (LBFGS, custom closure loops) is recorded right after the closure's first call,
  when the step's gradients exist (:meth:`~gradwatch.watch.Watch.step_pre_hook`);
* the scalar tensor that ``backward()`` is called on is taken as the loss of the next optimizer step
  (it is detached at once: no graph is kept alive);
* the script's own ``clip_grad_norm_`` / ``clip_grad_value_`` calls are noted, so that a stream says
  its gradients were clipped before the step saw them — :mod:`gradwatch.script_clips`;
* a Lightning ``Trainer`` or a Hugging Face ``Trainer`` gets gradwatch's own callback when it is
  built, and Keras optimizers' ``apply`` is wrapped (:mod:`gradwatch.trainer_hooks`) — the global
  hooks would see Lightning's gradients one step late and the Trainer's after its clipping — and
  the global hooks stand down for the optimizers a callback (or a watch of the script's own)
  records: see :func:`~gradwatch.watch.claim`.

This module runs the script and ends the run (exit code, traceback, the watch's status).
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

from .global_hooks import GlobalHooks, LossCapture, StepLimitReached, find_owner_module, variable_name
from .guards.base import GuardStop
from .script_clips import ScriptClips
from .session import default_out
from .trainer_hooks import AfterImport, KerasHooks, TrainerHooks
from .treatment import TreatmentRefused
from .watch import Watch

__all__ = ["StepLimitReached", "find_owner_module", "run_script", "variable_name"]


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
) -> tuple[int, Any]:
    """Run a script (or ``-m`` module) as ``python`` would, recording every optimizer it steps.

    Args:
        max_steps: stop the script (cleanly, exit code 0) after this many optimizer steps.
        seed: seed Python's, numpy's and torch's generators before the script starts, and
            TensorFlow's global seed as soon as the script imports it.
        treatment: a :class:`~gradwatch.treatment.Treatment` installed while the script runs
            (remedies applied from outside; its guards join the watch's).
    Returns:
        the script's exit code, and the run (closed) that recorded it: the
        :class:`~gradwatch.watch.Watch`, or for a Keras script on TensorFlow or JAX its run.
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
    hooks: GlobalHooks | None = None
    keras_hooks: KerasHooks | None = None
    try:
        with contextlib.ExitStack() as stack:
            if treatment is not None:
                stack.enter_context(treatment)  # first: its hooks run before the watch's
            if seed is not None:  # TensorFlow's own ops (tf.data's shuffle in Keras' fit) draw from its global seed
                stack.enter_context(AfterImport({"tensorflow": lambda tf: tf.random.set_seed(seed)}))
            clips = ScriptClips(w)
            hooks = stack.enter_context(GlobalHooks(w, max_steps, clips))
            stack.enter_context(clips)
            keras_hooks = stack.enter_context(KerasHooks(w, hooks.others, max_steps, StepLimitReached))
            stack.enter_context(TrainerHooks(w))
            stack.enter_context(LossCapture(w))
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
        compiled = keras_hooks.compiled.close(status) if keras_hooks is not None and keras_hooks.compiled else None
        if compiled is not None and compiled.layers:
            w.quiet = True  # the Keras (TensorFlow/JAX) run in the same directory holds the record
            w.close(status=status)
            return code, compiled  # type: ignore[return-value]
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
