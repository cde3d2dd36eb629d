"""Lightning: ``Trainer(callbacks=[gradwatch.lightning.GradWatch()])``.

Lightning runs the training step inside ``optimizer.step(closure)``, so an optimizer's own step
pre-hook fires *before* the gradients of that step exist; gradwatch therefore reads them in the
callback hook ``on_before_optimizer_step``, which Lightning calls after the closure — after
backward, after AMP unscaling and after gradient accumulation — and before its own gradient
clipping (``gradient_clip_val``). When clipping is configured, the norm after it is measured once
more when the optimizer has stepped (the gradients are still the clipped ones) and stored as
``grad_norm_clipped`` with ``clip_threshold = gradient_clip_val``, so the run shows both.

Each flushed window is also logged through the trainer's logger (``gradwatch/grad_norm``,
``gradwatch/grad_norm_clipped``, ``gradwatch/loss``) from numbers already on the host: no extra
device synchronisation.

``gradwatch run`` adds this callback to every ``Trainer`` a script builds (``watch=`` the runner's
watch), so an unmodified Lightning script is recorded at the same points. The callback claims the
trainer's optimizers on every rank (:func:`gradwatch.watch.claim`), so the runner's global
optimizer hooks, which would read the gradients one step late, leave them alone.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from .errors import GradwatchError
from .store import Chunk
from .session import default_out
from .watch import Watch, claim, refuse_rank0_guards, release

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - exercised only without the extra
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    except ImportError:
        raise GradwatchError(
            "gradwatch.lightning needs Lightning; install it with `pip install gradwatch[lightning]`."
        ) from None


class GradWatch(Callback):
    """Record (and diagnose, report) a Lightning training run with gradwatch.

    Args:
        out: run directory (default ``gradwatch-runs/lightning-TIME``).
        log_to_logger: also log the per-step norms and loss through ``trainer.logger``.
        watch: record into this open :class:`gradwatch.Watch` instead of starting a run per fit; it
            stays open after the fit (its owner closes it). ``gradwatch run`` passes its own.
        **watch_options: passed to :class:`gradwatch.Watch` (``flush_every``, ``sample_every``,
            ``guards``, ``report``, ``quiet``, ``log_to=["tensorboard", "wandb", "mlflow"]``, ...).
    """

    def __init__(self, out: str | os.PathLike[str] | None = None, *, log_to_logger: bool = True,
                 watch: Watch | None = None, **watch_options: Any):
        super().__init__()
        if watch is not None and (out is not None or watch_options):
            raise GradwatchError("GradWatch(watch=...) records into that watch, whose directory and options are "
                                 "set already; pass either watch= or out= and options, not both.")
        self.out = out
        self.log_to_logger = log_to_logger
        self.watch_options = watch_options
        self._given = watch
        self.watch: Watch | None = None
        self._claimed: list[Any] = []
        self._removers: list[Any] = []
        self._trainer: Any = None
        self._handles: list[Any] = []
        self._clip: float | None = None
        self._findings: list[Any] = []
        self._fits = 0
        self._loss_sum: torch.Tensor | None = None  # micro-batch losses since the last optimizer step
        self._stepped = False
        self._loss_named = False

    # -- lifecycle --------------------------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        guards = self._given.guards if self._given is not None else self.watch_options.get("guards")
        refuse_rank0_guards(guards, trainer.world_size, "gradwatch.lightning.GradWatch", "Lightning's gradient_clip_val")
        for opt in trainer.optimizers:  # on every rank: `gradwatch run`'s global hooks leave them to this callback
            claim(opt, self)
            self._claimed.append(opt)
        if trainer.global_rank != 0:
            return  # one writer per run: rank 0 (other ranks see the same all-reduced gradients)
        self._trainer = trainer
        self._fits += 1
        self._loss_sum, self._stepped, self._loss_named = None, False, False
        out = self.out if self.out is not None else default_out("lightning")
        if self.out is not None and self._fits > 1:  # fit() again with the same callback: a new run beside it
            out = f"{self.out}-{self._fits}"
        self.watch = Watch.for_callback(self._given, "GradWatch", pl_module, out, self.watch_options)
        clip = trainer.gradient_clip_val
        self._clip = float(clip) if clip else None
        for opt in trainer.optimizers:
            # Only rank 0 records (no collective may run on it alone); the loss comes from the batch's outputs.
            self.watch.add_optimizer(opt, pl_module, hooks=False, reduce_ranks=False, own_loss=True)
            self._handles.append(opt.register_step_post_hook(lambda o, a, k: self._after_step(o)))
            self._removers.append(self.watch.add_window_listener(self._log_window, opt))

    def on_before_backward(self, trainer: Any, pl_module: torch.nn.Module, loss: torch.Tensor) -> None:
        """The loss still has its graph here: its autograd node names the loss function (once)."""
        if self.watch is not None and not self._loss_named:
            self._loss_named = True
            for opt in trainer.optimizers:
                self.watch.note_loss_function(opt, loss)

    def on_before_optimizer_step(self, trainer: Any, pl_module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.watch is not None and self.watch.watches(optimizer):
            self.watch.on_before_optimizer_step(optimizer)

    def _after_step(self, optimizer: torch.optim.Optimizer) -> None:
        w = self.watch
        if w is None or not w.watches(optimizer):
            return
        if self._clip is not None:
            # The norm Lightning's clipping left: the gradients are still the clipped ones after the step.
            by_norm = self._trainer.gradient_clip_algorithm in (None, "norm")
            w.record_clipping(optimizer, self._clip if by_norm else None)
        w.on_after_optimizer_step(optimizer)
        self._stepped = True

    def on_train_batch_end(self, trainer: Any, pl_module: torch.nn.Module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.watch is None:
            return
        # With accumulate_grad_batches=k Lightning hands each micro-batch's loss already divided by k,
        # and the optimizer steps inside the last micro-batch: their sum is the step's mean loss.
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            loss = loss.detach()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        if self._stepped:
            if self._loss_sum is not None:
                self.watch.log(self._loss_sum)
            self._loss_sum, self._stepped = None, False

    def _log_window(self, chunk: Chunk) -> None:
        logger = self._trainer.logger if self._trainer is not None else None
        if not self.log_to_logger or logger is None:
            return
        v = chunk.step_values
        for i, step in enumerate(np.asarray(chunk.steps)):
            metrics = {f"gradwatch/{name}": float(v[name][i]) for name in ("grad_norm", "grad_norm_clipped", "loss")
                       if np.isfinite(v[name][i])}
            if metrics:
                logger.log_metrics(metrics, step=int(step))

    def _close(self, status: str) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.watch is not None:
            w, self.watch = self.watch, None
            if w is not self._given:
                w.close(status=status)
                self._findings = w.findings
            else:  # a given watch stays open (its owner closes it); the fit's last steps reach the logger now
                for opt in self._claimed:
                    if w.watches(opt):
                        w.flush(opt)
        while self._removers:
            self._removers.pop()()
        while self._claimed:
            release(self._claimed.pop(), self)

    def on_fit_end(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        self._close("finished")

    def on_exception(self, trainer: Any, pl_module: torch.nn.Module, exception: BaseException) -> None:
        self._close("interrupted" if isinstance(exception, KeyboardInterrupt) else "crashed")

    @property
    def findings(self) -> list[Any]:
        """The findings of the last fit (after it ended); with ``watch=``, that watch's."""
        return self._given.findings if self._given is not None else self._findings

    def teardown(self, trainer: Any, pl_module: torch.nn.Module, stage: str) -> None:
        self._close("finished")
