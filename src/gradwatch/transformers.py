"""Hugging Face Trainer: ``Trainer(..., callbacks=[gradwatch.transformers.GradWatchCallback()])``.

Where the Trainer's gradients are final (transformers 5.x, ``Trainer._run_epoch``): for each
optimizer step it runs ``training_step`` once per micro-batch (forward, loss divided by
``gradient_accumulation_steps``, ``accelerator.backward``), firing ``on_substep_end`` after every
micro-batch but the last. After the last one it calls ``accelerator.clip_grad_norm_(model.parameters(),
max_grad_norm)``, which first unscales AMP gradients (``accelerator.unscale_gradients()``), then clips
and returns the norm *before* clipping (the ``grad_norm`` the Trainer logs); with ``max_grad_norm`` 0
the same call with an infinite threshold only measures the norm. Then the Trainer fires
``on_pre_optimizer_step``, calls ``optimizer.step()``, fires ``on_optimizer_step``, steps the LR
scheduler, zeroes the gradients and fires ``on_step_end``; ``on_log`` follows every ``logging_steps``.

No callback event falls between the last backward and the clipping: ``on_pre_optimizer_step``
already sees the clipped gradients, and the Trainer clips by default (``max_grad_norm=1.0``). So at
``on_train_begin`` the callback finds the Trainer that calls it (on the call stack) and, for the
duration of ``train()``, wraps that Trainer's ``accelerator.unscale_gradients``: right after it
returns, the gradients are final — accumulated over the micro-batches, all-reduced, unscaled — and
not yet clipped. Every statistic of the step is recorded there, so ``grad_norm`` is the Trainer's
own pre-clip ``grad_norm``. When the Trainer clips, the global norm after its clipping is measured
once more at ``on_pre_optimizer_step`` and stored as ``grad_norm_clipped`` (with ``clip_coef`` and
``clip_threshold = max_grad_norm``), so the run shows both. The update ratio is measured at
``on_optimizer_step``.

Fallback: a step in which no unscaling call came (a Trainer not found on the stack; and, untested
here, DeepSpeed — whose engine clips on its own and may keep gradients out of ``.grad`` altogether —
SageMaker model parallelism, gradients on several device meshes) is recorded at
``on_pre_optimizer_step``, *after* the Trainer's clipping: its ``grad_norm`` and
per-layer statistics are those of the clipped gradients, ``grad_norm_clipped`` holds the same norm
and ``clip_coef`` is NaN. The stream's ``trainer.recorded`` entry in ``meta.json`` says which point
was used, and (unless ``quiet``) a line on stderr says so the first time the fallback is taken.

Loss: callbacks see no per-step loss (the Trainer sums it on the device and reads it only when it
logs), so the run gets the loss the Trainer logs: at each ``on_log`` carrying ``loss`` (every
``logging_steps``) that value — the mean training loss over the steps since the previous log —
is attached to the step just taken; the other steps have no loss. No device read is added for it.

Only the world-process-zero writes a run (the other ranks see the same all-reduced gradients). A
Trainer has no exception event: a ``train()`` that raises leaves the run open; it is closed as
``crashed`` (``interrupted`` for Ctrl-C) when the interpreter exits on that exception, or when the
next ``train()`` with the same callback begins. fp16 steps whose loss scale overflowed (the scaler
skips them) are recorded as they are, with non-finite gradients.

``gradwatch run`` adds this callback to every ``Trainer`` a script builds (``watch=`` the runner's
watch) unless the script gave one; the callback claims the torch optimizer on every rank
(:func:`gradwatch.watch.claim`), so the runner's global optimizer hooks, which would only see the
clipped gradients, leave it alone.
"""

from __future__ import annotations

import atexit
import inspect
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .errors import GradwatchError
from .session import default_out
from .watch import Watch, claim, refuse_rank0_guards, release

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import DefaultFlowCallback
except ImportError:  # pragma: no cover - exercised only without the extra
    raise GradwatchError(
        "gradwatch.transformers needs Hugging Face transformers; install it with `pip install gradwatch[transformers]`."
    ) from None

BEFORE_CLIPPING = "before clipping (right after accelerator.unscale_gradients)"
AFTER_CLIPPING = "after clipping (on_pre_optimizer_step)"


class GradWatchCallback(TrainerCallback):
    """Record (and diagnose, report) a Hugging Face ``Trainer`` run with gradwatch.

    Args:
        out: run directory (default ``gradwatch-runs/transformers-TIME``).
        log_to_trainer: add gradwatch's numbers to the Trainer's training logs (every
            ``logging_steps``, so they reach ``report_to``'s loggers, the progress output and
            ``state.log_history``): ``gradwatch/grad_norm_max``, the largest global gradient norm
            (before clipping) over the steps since the previous log — the Trainer's ``grad_norm`` is
            the last step's only — and, when the Trainer clips, ``gradwatch/clipped_frac``, the
            fraction of those steps whose norm was above ``max_grad_norm``. They are kept on the
            device and read once per log, when the Trainer reads its own loss. For the loggers to
            see them the callback moves itself ahead of them in the Trainer's callback list.
        watch: record into this open :class:`gradwatch.Watch` instead of starting a run per
            ``train()``; it stays open afterwards (its owner closes it). ``gradwatch run`` passes its own.
        **watch_options: passed to :class:`gradwatch.Watch` (``flush_every``, ``sample_every``,
            ``guards``, ``report``, ``quiet``, ``log_to=["tensorboard", "wandb", "mlflow"]``, ...).

    After ``train()``: ``callback.findings`` holds the diagnosis and ``callback.run_dir`` the run.
    """

    def __init__(self, out: str | os.PathLike[str] | None = None, *, log_to_trainer: bool = True,
                 watch: Watch | None = None, **watch_options: Any):
        super().__init__()
        if watch is not None and (out is not None or watch_options):
            raise GradwatchError("GradWatchCallback(watch=...) records into that watch, whose directory and options "
                                 "are set already; pass either watch= or out= and options, not both.")
        self._given = watch
        self._claimed: Any = None
        self.out = out
        self.log_to_trainer = log_to_trainer
        self.watch_options = watch_options
        self.watch: Watch | None = None
        #: The run directory of the last ``train()``.
        self.run_dir: Path | None = None
        self._opt: torch.optim.Optimizer | None = None
        self._clip: float | None = None
        self._recorded = False  # this step was recorded before clipping
        self._recorded_at: str | None = None
        self._fallback_said = False
        self._unwrap: Any = None  # takes the unscale_gradients wrapper off again
        self._acc_max: torch.Tensor | None = None
        self._acc_clipped: torch.Tensor | None = None
        self._acc_steps = 0
        self._findings: list[Any] = []

    # -- lifecycle --------------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close("crashed")  # a previous train() that raised never reached on_train_end
        guards = self._given.guards if self._given is not None else self.watch_options.get("guards")
        refuse_rank0_guards(guards, getattr(args, "world_size", 1),
                            "gradwatch.transformers.GradWatchCallback", "the Trainer's max_grad_norm")
        model, optimizer = kwargs.get("model"), _torch_optimizer(kwargs.get("optimizer"))
        if optimizer is not None:  # on every rank: `gradwatch run`'s global hooks leave it to this callback
            claim(optimizer, self)
            self._claimed = optimizer
        if not state.is_world_process_zero:
            return  # one writer per run (other ranks see the same all-reduced gradients)
        quiet = self._given.quiet if self._given is not None else self.watch_options.get("quiet", False)
        if optimizer is None:
            if not quiet:
                print("gradwatch: the Trainer passed no torch optimizer to its callbacks; nothing is recorded.",
                      file=sys.stderr)
            return
        out = self.out if self.out is not None else default_out("transformers")
        self.watch = Watch.for_callback(self._given, "GradWatchCallback", model, out, self.watch_options)
        self.run_dir = self.watch.out
        self._opt = optimizer
        clip = args.max_grad_norm
        self._clip = float(clip) if clip is not None and clip > 0 else None
        self._recorded = False
        self._recorded_at = None
        self._fallback_said = False
        self._acc_max = self._acc_clipped = None
        self._acc_steps = 0
        # Only the main process records (no collective may run on it alone); the loss comes from the logs.
        self.watch.add_optimizer(optimizer, model, hooks=False, reduce_ranks=False, own_loss=True)
        trainer = _find_trainer(self)
        if trainer is not None:
            self._wrap_unscale(trainer)
            if self.log_to_trainer:
                _move_ahead_of_loggers(self, trainer.callback_handler.callbacks)
        self._describe(args, BEFORE_CLIPPING if self._unwrap is not None else AFTER_CLIPPING)
        if self.watch is not self._given:
            atexit.register(self._at_exit)  # a given watch's owner closes it, also after a crash

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close("finished")

    @property
    def findings(self) -> list[Any]:
        """The :class:`~gradwatch.diagnose.Finding` list of the last ``train()`` (after it ended);
        with ``watch=``, that watch's."""
        return self._given.findings if self._given is not None else self._findings

    def _close(self, status: str) -> None:
        if self._unwrap is not None:
            unwrap, self._unwrap = self._unwrap, None
            unwrap()
        atexit.unregister(self._at_exit)
        if self._claimed is not None:
            release(self._claimed, self)
            self._claimed = None
        if self.watch is not None:
            w, self.watch = self.watch, None
            if w is not self._given:  # a given watch stays open: its owner closes it
                w.close(status=status)
                self._findings = w.findings
        self._opt = None

    def _at_exit(self) -> None:
        """The interpreter is exiting with the run still open: train() never reached on_train_end, so
        it raised (caught or not); sys.last_type says whether it was Ctrl-C."""
        last = getattr(sys, "last_type", None)
        if self.watch is not None:
            self._close("interrupted" if last is not None and issubclass(last, KeyboardInterrupt) else "crashed")

    # -- the step ---------------------------------------------------------------------------------

    def _wrap_unscale(self, trainer: Any) -> None:
        """Record right after the accelerator unscales, which its clip_grad_norm_ does before clipping."""
        acc = getattr(trainer, "accelerator", None)
        original = getattr(acc, "unscale_gradients", None)
        if original is None or not callable(original):
            return
        callback = self

        def unscale_gradients(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            callback._before_clipping()
            return result

        def unwrap() -> None:
            if acc.__dict__.get("unscale_gradients") is unscale_gradients:
                del acc.unscale_gradients

        acc.unscale_gradients = unscale_gradients
        self._unwrap = unwrap

    def _before_clipping(self) -> None:
        w = self.watch
        if w is None or self._opt is None or self._recorded:
            return
        self._recorded = True  # first: a step that failed here is not recorded a second time
        w.on_before_optimizer_step(self._opt)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        w = self.watch
        if w is None or self._opt is None:
            return
        before, self._recorded = self._recorded, False
        if not before:
            if not self._fallback_said:
                self._fallback_said = True
                if self._recorded_at != AFTER_CLIPPING:
                    self._describe(args, AFTER_CLIPPING)
                if not w.quiet and self._clip is not None:
                    print("gradwatch: recording the Trainer's steps after its gradient clipping "
                          f"(max_grad_norm={self._clip:g}): grad_norm and the layer statistics are of the "
                          "clipped gradients.", file=sys.stderr)
            w.on_before_optimizer_step(self._opt)
        if not w.watches(self._opt):
            return
        if self._clip is not None:
            # The norm the Trainer's clipping left (the gradients the optimizer is about to get); a step
            # recorded after the clipping already does not know the norm before it.
            w.record_clipping(self._opt, self._clip, measured=before)
        if self.log_to_trainer:
            self._accumulate(w.last_global_norm(self._opt))

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        w = self.watch
        if w is not None and self._opt is not None and w.watches(self._opt):
            w.on_after_optimizer_step(self._opt)

    @torch.no_grad()
    def _accumulate(self, norm: torch.Tensor | None) -> None:
        """Device-side running max of the global norm (and clipped-step count) until the next log."""
        if norm is None:
            return
        if self._acc_max is None:
            self._acc_max = torch.full((), -math.inf, device=norm.device)
            self._acc_clipped = torch.zeros((), device=norm.device)
        torch.maximum(self._acc_max, norm, out=self._acc_max)  # NaN stays NaN: a non-finite step shows
        if self._clip is not None:
            self._acc_clipped.add_((norm > self._clip).to(self._acc_clipped.dtype))
        self._acc_steps += 1

    # -- logs -------------------------------------------------------------------------------------

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        w = self.watch
        if w is None or not logs or "loss" not in logs:
            return  # eval logs carry eval_loss, the end-of-train summary train_loss
        loss = logs["loss"]
        if isinstance(loss, (int, float, torch.Tensor)):
            w.log(loss)
        if not self.log_to_trainer or self._acc_max is None or self._acc_steps == 0:
            return
        top, clipped = torch.stack([self._acc_max, self._acc_clipped]).tolist()  # one read, at a Trainer log
        extra = {"gradwatch/grad_norm_max": top}
        if self._clip is not None and self._recorded_at == BEFORE_CLIPPING:
            extra["gradwatch/clipped_frac"] = clipped / self._acc_steps
        self._acc_max.fill_(-math.inf)
        self._acc_clipped.zero_()
        self._acc_steps = 0
        logs.update(extra)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step and "loss" in history[-1]:
            history[-1].update(extra)

    # -- meta -------------------------------------------------------------------------------------

    def _describe(self, args: Any, recorded: str) -> None:
        """Say in the stream's meta.json entry where in the Trainer's step the gradients were read."""
        self._recorded_at = recorded
        self.watch.describe_stream(self._opt, trainer={
            "framework": "transformers.Trainer",
            "recorded": recorded,
            "max_grad_norm": self._clip,
            "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
        })


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (and similar wrappers)."""
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def _find_trainer(callback: GradWatchCallback) -> Any:
    """The Trainer whose callback handler is calling ``callback`` now (callbacks get no reference)."""
    try:
        from transformers import Trainer
    except Exception:
        return None
    frame = inspect.currentframe()
    try:
        for _ in range(32):
            if frame is None:
                break
            obj = frame.f_locals.get("self")
            if isinstance(obj, Trainer):
                handler = getattr(obj, "callback_handler", None)
                if any(cb is callback for cb in getattr(handler, "callbacks", ())):
                    return obj
            frame = frame.f_back
    finally:
        del frame
    return None


def _move_ahead_of_loggers(callback: GradWatchCallback, callbacks: list[Any]) -> None:
    """Put ``callback`` right after the DefaultFlowCallback, so its additions to a log reach the
    report_to loggers and the progress output. Safe while the handler iterates the list: only the
    entries before ``callback`` move."""
    i = next((k for k, cb in enumerate(callbacks) if cb is callback), None)
    if i is None:
        return
    target = 0
    for k, cb in enumerate(callbacks[:i]):
        if isinstance(cb, DefaultFlowCallback):
            target = k + 1
    if target < i:
        callbacks.insert(target, callbacks.pop(i))
