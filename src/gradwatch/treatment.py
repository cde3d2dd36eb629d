"""Remedies applied to an unmodified training script, from outside (what ``gradwatch doctor`` tries).

A remedy is a finding's ``{"action": ..., "args": ...}``. How each is applied without editing the
script:

* ``clip_norm``, ``clip_value``, ``skip_nonfinite``, ``rollback``: guards, through the runner's watch;
* ``scale_lr``, ``weight_decay``: every param group of each optimizer, just before its first step;
* ``set_optimizer``: the ``torch.optim`` classes the script constructs are replaced, while it runs,
  by the named optimizer (keeping the parameters and param groups it passes);
* ``swap_activation``, ``reinit``, ``insert_norm``: model surgery, on the model's first forward
  call, before any gradient exists (new parameters join the optimizers that hold the model's).

A Keras script gets the same remedies the Keras way (:mod:`gradwatch.keras_treatment`: its
optimizers' clipping options, learning rate and weight decay, ``keras.optimizers`` classes, surgery
at ``compile``); the guards here act on torch optimizers only (``from_treatment`` marks them, so that
a Keras stream leaves them out).

Actions that need the code itself (``scale_targets``, ``check_data``, ``reduce_depth``) are not
applicable; :func:`applicable` says why.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from . import surgery
from .errors import GradwatchError
from .keras_treatment import OPTIMIZER_NAMES, KerasTreatment
from .objects import live_instances
from .guards import ClipNorm, ClipValue, Guard, Rollback, SkipNonFinite

GUARD_ACTIONS = {"clip_norm", "clip_value", "skip_nonfinite", "rollback"}
STEP_ACTIONS = {"scale_lr", "weight_decay"}
SURGERY_ACTIONS = {"swap_activation", "reinit", "insert_norm"}
NEEDS_CODE = {
    "scale_targets": "standardise the targets in the script (e.g. sklearn's StandardScaler)",
    "check_data": "look for NaN/Inf in the input data",
    "reduce_depth": "remove layers from the model definition",
    "scale_inputs": "standardise the input features in the script (e.g. sklearn's StandardScaler)",
    "change_output": "change the output layer's activation (or units) in the model definition",
    "check_graph": "find where the forward leaves autograd (.detach(), .data, .item(), numpy, torch.no_grad())",
    "change_loss": "change the loss in the script (e.g. from_logits=True, or a loss that matches the output)",
    "set_dtype": "autocast to bfloat16 instead of float16 (torch.autocast(..., dtype=torch.bfloat16), no GradScaler)",
}


class TreatmentRefused(BaseException):
    """A remedy could not be applied to this script's model (surgery refused it); the trial is void.
    A BaseException, so that the script's own ``except Exception`` does not swallow it."""


_live = live_instances


_keras_types: dict[type, bool] = {}


def _is_keras(module: nn.Module) -> bool:
    """A Keras layer or model (on the torch backend they are modules too), by class, cached."""
    known = _keras_types.get(type(module))
    if known is None:
        known = _keras_types[type(module)] = surgery.is_keras_model(module)
    return known


def _check_remedy(r: Any) -> dict[str, Any]:
    if not isinstance(r, dict) or not isinstance(r.get("action"), str) or not isinstance(r.get("args", {}), dict):
        raise GradwatchError(f'a remedy is {{"action": NAME, "args": {{...}}}}; got {r!r}.')
    return {"action": r["action"], "args": dict(r.get("args", {}))}


def applicable(remedy: dict[str, Any]) -> str | None:
    """None if the remedy can be applied from outside; else what to do by hand."""
    action = remedy.get("action")
    if action in GUARD_ACTIONS | STEP_ACTIONS | SURGERY_ACTIONS or action == "set_optimizer":
        return None
    return NEEDS_CODE.get(str(action), f"{action} is not something gradwatch can apply from outside")


def describe(remedy: dict[str, Any]) -> str:
    args = ", ".join(f"{k}={v}" for k, v in remedy.get("args", {}).items())
    return f"{remedy['action']}({args})"


def guards_for(remedies: Iterable[dict[str, Any]]) -> list[Guard]:
    out: list[Guard] = []
    for r in remedies:
        a, args = r["action"], r.get("args", {})
        if a == "clip_norm":
            out.append(ClipNorm(args.get("max_norm", 1.0)))
        elif a == "clip_value":
            out.append(ClipValue(args.get("value", 5.0)))
        elif a == "skip_nonfinite":
            out.append(SkipNonFinite())
        elif a == "rollback":
            out.append(Rollback(lr_factor=args.get("lr_factor", 0.5), skip_batches=args.get("skip_batches", 0)))
    for g in out:
        g.from_treatment = True  # type: ignore[attr-defined]  # torch optimizers only (see gradwatch.keras_torch)
    return out


class Treatment:
    """Installs remedies around a script run; :meth:`uninstall` puts everything back."""

    def __init__(self, remedies: Iterable[dict[str, Any]]):
        if not isinstance(remedies, (list, tuple)):
            raise GradwatchError(f"remedies are a list of {{\"action\": ..., \"args\": ...}}; got {type(remedies).__name__}.")
        self.remedies = [_check_remedy(r) for r in remedies]
        for r in self.remedies:
            why = applicable(r)
            if why is not None:
                raise GradwatchError(f"{describe(r)} cannot be applied from outside the script: {why}.")
        self.guards = guards_for(self.remedies)
        self.log: list[str] = []  # what was applied, and where
        self._undo: list[Any] = []
        self._stepped: set[int] = set()
        self._done_surgery = False
        self._keras = KerasTreatment(self.remedies, self.log)

    # -- install / uninstall ----------------------------------------------------------------------

    def install(self) -> "Treatment":
        from torch.nn.modules.module import register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        try:
            for r in self.remedies:
                if r["action"] == "set_optimizer":
                    self._swap_optimizer_classes(r.get("args", {}))
            if any(r["action"] in STEP_ACTIONS for r in self.remedies):
                h = register_optimizer_step_pre_hook(self._first_step)
                self._undo.append(h.remove)
            if any(r["action"] in SURGERY_ACTIONS for r in self.remedies):
                h = register_module_forward_pre_hook(self._first_forward)
                self._forward_hook = h
                self._undo.append(h.remove)
            self._undo.append(self._keras.install().uninstall)
        except BaseException:
            self.uninstall()
            raise
        return self

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> "Treatment":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    # -- optimizer classes ------------------------------------------------------------------------

    def _swap_optimizer_classes(self, args: dict[str, Any]) -> None:
        name = OPTIMIZER_NAMES.get(str(args.get("name", "Adam")).lower())
        if name is None:
            raise GradwatchError(f"set_optimizer knows {', '.join(OPTIMIZER_NAMES.values())}; got {args.get('name')!r}.")
        target: type[torch.optim.Optimizer] = getattr(torch.optim, name)
        options = {k: v for k, v in args.items() if k != "name"}
        log = self.log

        def make(original: type) -> type:
            class Swapped(target):  # type: ignore[misc, valid-type]
                def __init__(self, params: Any, *a: Any, **k: Any) -> None:
                    params = list(params)
                    if params and isinstance(params[0], dict):  # per-group options belong to the old optimizer
                        params = [{"params": g["params"]} for g in params]
                    target.__init__(self, params, **options)
                    log.append(f"{original.__name__}(...) -> {name}({', '.join(f'{k}={v}' for k, v in options.items())})")

            Swapped.__name__ = Swapped.__qualname__ = name  # the record names what really trains
            return Swapped

        for attr in dir(torch.optim):
            cls = getattr(torch.optim, attr)
            if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
                setattr(torch.optim, attr, make(cls))
                self._undo.append(lambda attr=attr, cls=cls: setattr(torch.optim, attr, cls))

    # -- first step -------------------------------------------------------------------------------

    def _first_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if id(optimizer) in self._stepped:
            return
        self._stepped.add(id(optimizer))
        for r in self.remedies:
            a, rargs = r["action"], r.get("args", {})
            if a not in STEP_ACTIONS:
                continue
            if a == "scale_lr":
                self._scale_lr(optimizer, float(rargs.get("factor", 0.1)))
            for group in optimizer.param_groups:
                if a == "weight_decay" and "weight_decay" in group:
                    group["weight_decay"] = rargs.get("l2", 1e-2)
            self.log.append(f"{describe(r)} on {type(optimizer).__name__} before its first step")

    def _scale_lr(self, optimizer: torch.optim.Optimizer, factor: float) -> None:
        """Every lr the group and its schedulers keep: a scheduler that recomputes lr from its base
        values (LambdaLR, OneCycleLR's max_lr) would otherwise undo the change at its next step."""
        seen: set[int] = set()
        for group in optimizer.param_groups:
            for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                v = group.get(key)
                if isinstance(v, torch.Tensor) and id(v) not in seen:
                    seen.add(id(v))
                    v.mul_(factor)
                elif isinstance(v, (int, float)) and not isinstance(v, bool):
                    group[key] = v * factor
        for sched in _live(torch.optim.lr_scheduler.LRScheduler):
            if getattr(sched, "optimizer", None) is optimizer and hasattr(sched, "base_lrs"):
                sched.base_lrs = [b * factor for b in sched.base_lrs]
                self.log.append(f"scale_lr also scaled {type(sched).__name__}'s base learning rates")

    # -- first forward: surgery -----------------------------------------------------------------

    def _first_forward(self, module: nn.Module, args: Any) -> None:
        if _is_keras(module):
            return  # a Keras layer on the torch backend: the Keras part operates on its model
        trainable = {id(p) for p in module.parameters() if p.requires_grad}
        if self._done_surgery or not trainable:
            return  # wait for the model (a parameter-free or frozen module may run first)
        optimizers = [o for o in _live(torch.optim.Optimizer)
                      if any(id(p) in trainable for g in o.param_groups for p in g["params"])]
        if not optimizers and _live(torch.optim.Optimizer):
            return  # this module is not what the optimizer trains (e.g. a submodule run on its own)
        self._done_surgery = True
        self._forward_hook.remove()
        example = args if isinstance(args, tuple) else (args,)
        # New modules must be ordinary trainable tensors even if this first call is a summary under
        # no_grad / inference_mode.
        with torch.inference_mode(False), torch.enable_grad():
            try:
                for r in self.remedies:
                    self._operate(module, r, example, optimizers[0] if optimizers else None)
            except GradwatchError as e:
                raise TreatmentRefused(f"{type(module).__name__}: {e}") from None

    def _operate(self, module: nn.Module, r: dict[str, Any], example: tuple, opt: torch.optim.Optimizer | None) -> None:
        a, rargs = r["action"], r.get("args", {})
        if a not in SURGERY_ACTIONS:
            return
        if a == "swap_activation":
            extra = {k: v for k, v in rargs.items() if k not in ("from", "to", "init")}
            rep = surgery.swap_activations(module, rargs.get("from", "Sigmoid"), rargs.get("to", "ReLU"),
                                           example=example, optimizer=opt, **extra)
            self.log.append(str(rep))
            if rargs.get("init"):
                self.log.append(str(surgery.reinit(module, rargs["init"])))
        elif a == "reinit":
            self.log.append(str(surgery.reinit(module, rargs.get("scheme", "glorot_uniform"), bias=rargs.get("bias", 0.0))))
        else:
            rep = surgery.insert_norm(module, rargs.get("kind", "batch"), example=example, optimizer=opt)
            self.log.append(str(rep))
        if opt is None and any(p.requires_grad for p in module.parameters()) and a != "reinit":
            self.log.append("no optimizer existed at the model's first forward: new parameters (if any) joined none")
