"""Keras 3 on the torch backend: a Keras model is a ``torch.nn.Module`` and every variable's value a
``torch.nn.Parameter`` whose ``.grad`` holds the gradient Keras passes to ``apply``, so the PyTorch
probe reads them as it reads any model's: same statistics, run directory, findings and report.
Layers are named by the Keras variable paths (``sequential/dense/kernel``; Keras kernels are
(in, out)).

The optimizer's ``apply(grads, variables)`` is wrapped for the duration of ``fit`` (by
:class:`gradwatch.keras.GradWatch`) or, under ``gradwatch run``, on the base class. Keras' own
clipping options (``clipnorm`` per variable, ``global_clipnorm``, ``clipvalue``) are stored with the
run and applied by Keras inside ``apply``; gradwatch records the gradients before them
(``grad_norm``) and, when one is set, the global norm after them (``grad_norm_clipped``, by calling
the optimizer's own clipping on the same gradients).
"""

from __future__ import annotations

from typing import Any

import keras
import torch

from .errors import GradwatchError
from .keras import layer_infos, loss_name, tap_layers
from .probe.torch import TapTarget, global_norm
from .store import LayerInfo
from .watch import Watch, claim, release


def check_backend() -> None:
    backend = keras.backend.backend()
    if backend != "torch":
        raise GradwatchError(
            f"this part of gradwatch reads Keras gradients on the torch backend; this Keras runs on {backend!r} "
            "(gradwatch.keras.GradWatch picks the right one for each backend)."
        )


class KerasOptimizerView:
    """A Keras optimizer seen as a torch one by a watch stream: its variables' torch parameters as
    one param group, its learning rate (a device tensor: no host read), its config as defaults."""

    def __init__(self, optimizer: Any, variables: list[Any]):
        self.keras_optimizer = optimizer
        self.variables = variables
        try:
            config = optimizer.get_config()
        except Exception:
            # A custom LearningRateSchedule without get_config() makes the optimizer's config raise;
            # the record keeps what can be read directly.
            config = {k: getattr(optimizer, k, None) for k in ("name", "clipnorm", "global_clipnorm", "clipvalue")}
        self.defaults = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool)) or v is None}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        lr = getattr(self.keras_optimizer, "learning_rate", None)
        value = getattr(lr, "value", lr)
        return [{"params": [v.value for v in self.variables], "lr": value if isinstance(value, torch.Tensor) else None}]


def _view_class(optimizer: Any) -> type:
    return type(f"keras.{type(optimizer).__name__}", (KerasOptimizerView,), {})



def layer_table(model: Any, variables: list[Any]) -> tuple[list[LayerInfo], list[torch.Tensor]]:
    """The layer table (see :func:`gradwatch.keras.layer_infos`) and each variable's torch parameter."""
    return layer_infos(model, variables), [v.value for v in variables]


def tap_targets(model: Any, variables: list[Any]) -> list[TapTarget]:
    """The layers :func:`gradwatch.keras.tap_layers` names, as the PyTorch tap's targets."""
    targets = []
    for layer, i, activation, space in tap_layers(model, variables):
        if isinstance(layer, torch.nn.Module):
            axis = 1 if getattr(layer, "data_format", "channels_last") == "channels_first" else -1
            targets.append(TapTarget(layer, i, activation, space, axis))
    return targets


class KerasAttachment:
    """Wraps one Keras optimizer's ``apply`` so that a watch sees every step it takes."""

    #: How ``gradwatch run`` names the owner of an optimizer it leaves to this attachment.
    owner_name = "gradwatch.keras.GradWatch"

    def __init__(self, watch: Watch, model: Any, optimizer: Any, variables: list[Any] | None = None, *, wrap: bool = True):
        check_backend()
        # A doctor treatment's guards (gradwatch.treatment) are for torch optimizers: Keras clips with
        # its own options (gradwatch.keras_treatment), so this stream leaves them out.
        treatment = bool(watch.guards) and all(getattr(g, "from_treatment", False) for g in watch.guards)
        if watch.guards and not treatment:
            raise GradwatchError("gradwatch's guards act on torch optimizers; with Keras use its own clipnorm/clipvalue.")
        variables = list(variables if variables is not None else model.trainable_variables)
        if not variables:
            raise GradwatchError(f"the Keras model {model.name!r} has no trainable variables; there is nothing to watch.")
        # A LossScaleOptimizer unscales into new tensors and hands them to its inner optimizer:
        # watch that one, which sees the true gradients.
        optimizer = getattr(optimizer, "inner_optimizer", None) or optimizer
        stale = optimizer.__dict__.get("apply")
        if stale is not None and isinstance(getattr(stale, "__self__", None), KerasAttachment):
            stale.__self__.abandon()  # a fit() that raised left its wrapper (Keras callbacks see no exceptions)
        self.watch = watch
        self.optimizer = optimizer
        self.view = _view_class(optimizer)(optimizer, variables)
        module = model if isinstance(model, torch.nn.Module) else None
        self.att = watch.add_optimizer(self.view, module, hooks=False, layer_table=layer_table(model, variables),
                                       tap_targets=tap_targets(model, variables) if module is not None else None,
                                       loss=loss_name(model))
        if treatment:
            self.att.guards = None
            watch.describe_stream(self.view, guards=[])
        self._clip = any(getattr(optimizer, k, None) for k in ("clipnorm", "global_clipnorm", "clipvalue"))
        self._loss: torch.Tensor | None = None
        self._model: Any = None
        if wrap:
            self._original = optimizer.apply
            optimizer.apply = self._apply  # instance attribute: only this optimizer, undone by detach()
            claim(optimizer, self)  # `gradwatch run`'s Keras hooks leave it to this callback

    def before(self, grads: Any, variables: Any = None) -> None:
        """The optimizer is about to apply ``grads``. They are what is recorded: the probe reads
        ``.grad``, which a custom train_step (or a LossScaleOptimizer's unscaling) may not have
        filled with these tensors, so each variable's ``.grad`` shows ``grads`` while the probe reads."""
        grads = list(grads)
        variables = list(variables) if variables is not None else self.view.variables
        swapped = []
        for v, g in zip(variables, grads):
            p = getattr(v, "value", None)
            if isinstance(p, torch.Tensor) and isinstance(g, torch.Tensor) and p.grad is not g:
                if g.shape == p.shape and g.dtype == p.dtype and g.device == p.device:
                    swapped.append((p, p.grad))
                    p.grad = g
        if self._loss is not None:
            self.watch.stage_loss(self._loss)
            self._loss = None
        try:
            self.watch.on_before_optimizer_step(self.view)
            if self._clip and self.watch.watches(self.view):
                self._record_clipping(grads)
        finally:
            for p, old in swapped:
                p.grad = old

    def capture_loss(self, model: Any) -> None:
        """Take each training step's loss from the model's own loss computation (logs only carry the
        epoch's running mean); undone by detach()."""
        original = getattr(model, "_compute_loss", None)
        if original is None:
            return
        attachment = self

        def compute_loss(*a: Any, **k: Any) -> Any:
            loss = original(*a, **k)
            if isinstance(loss, torch.Tensor) and loss.numel() == 1 and k.get("training", True):
                attachment._loss = loss.detach()
            return loss

        model._compute_loss = compute_loss
        self._model = model

    def host_step(self, n: int = 1) -> None:
        """The torch probe hears of each step from the optimizer itself: nothing to do."""

    def after(self) -> None:
        self.watch.on_after_optimizer_step(self.view)

    def _apply(self, grads: Any, trainable_variables: Any = None) -> Any:
        if self.watch.closed:  # the watch is gone (its fit raised): step as if never wrapped
            self.detach()
            return self.optimizer.apply(grads, trainable_variables)
        grads = list(grads)
        self.before(grads, trainable_variables)
        try:
            return self._original(grads, trainable_variables)
        finally:
            self.after()

    @torch.no_grad()
    def _record_clipping(self, grads: list[Any]) -> None:
        """The norm after Keras' own clipping (its clipping function, on the same gradients)."""
        opt = self.optimizer
        clipped = [g for g in opt._clip_gradients(grads) if g is not None]
        after = global_norm(clipped, clipped[0].device) if clipped else None
        if after is None:
            return
        limit = opt.global_clipnorm or (opt.clipnorm if not opt.clipvalue else None)
        self.watch.record_clipping(self.view, float(limit) if limit else None, after=after)

    def detach(self) -> None:
        release(self.optimizer, self)
        if self.optimizer.__dict__.get("apply") == self._apply:
            del self.optimizer.apply
        if self._model is not None and "_compute_loss" in self._model.__dict__:
            del self._model._compute_loss
            self._model = None

    def abandon(self) -> None:
        """Undo a wrapper whose fit() raised, and close its run as crashed."""
        self.detach()
        if not self.watch.closed:
            self.watch.close(status="crashed")




def start(model: Any, out: Any, options: dict[str, Any]) -> tuple[Watch, KerasAttachment]:
    """A watch recording ``model``'s optimizer during ``fit`` (for :class:`gradwatch.keras.GradWatch`)."""
    check_backend()
    watch = Watch(model if isinstance(model, torch.nn.Module) else None, out=out, attach_later=True, **options)
    watch.status_at_exit = "crashed"  # closed at exit without on_train_end: fit() raised
    try:
        attachment = KerasAttachment(watch, model, model.optimizer)
        attachment.capture_loss(model)
    except BaseException:
        watch.close(status="crashed")
        raise
    return watch, attachment


class LoopWatch:
    """A custom loop's Keras optimizer under a watch, on the torch backend (see
    :func:`gradwatch.keras.watch`): its ``apply`` is wrapped until :meth:`close`."""

    def __init__(self, model: Any, optimizer: Any, out: Any, options: dict[str, Any]):
        check_backend()
        self.watch = Watch(model if isinstance(model, torch.nn.Module) else None, out=out, attach_later=True,
                           **{"summary": not options.get("quiet", False), **options})
        try:
            if not optimizer.built:
                optimizer.build(model.trainable_variables)
            self.attachment = KerasAttachment(self.watch, model, optimizer)
            self.attachment.capture_loss(model)
        except BaseException:
            self.watch.close(status="crashed")
            raise

    out = property(lambda self: self.watch.out)
    findings = property(lambda self: self.watch.findings)
    run = property(lambda self: self.watch.run)

    def step(self, n: int = 1) -> None:
        """Steps are seen at each ``apply``: nothing to do."""

    def close(self, status: str = "finished") -> None:
        self.attachment.detach()
        self.watch.close(status=status)

    def __enter__(self) -> "LoopWatch":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        from .session import status_for

        self.close(status=status_for(exc))
