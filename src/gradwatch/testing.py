"""Fault injection: put NaN, ±Inf or a huge value into chosen gradients or the loss at chosen steps.

For testing what a training loop (and gradwatch's guards) do when numbers break::

    from gradwatch.testing import FaultInjector
    inj = FaultInjector(model, optimizer, {3: "nan", 10: "inf", 20: 1e30})         # gradients
    inj = FaultInjector(model, optimizer, {50: 1e30}, target="loss")              # the loss
    ...
    loss = inj.loss(loss_fn(model(x), y))    # only needed for target="loss"
    loss.backward(); optimizer.step()
    inj.remove()                              # or use it as a context manager

Steps are counted as the optimizer's ``step()`` calls since the injector was made (its own post
hook), so a fault at step ``s`` lands in the gradients that the ``s``-th ``step()`` consumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .errors import GradwatchError

_NAMED = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf}


@dataclass(frozen=True)
class Fault:
    """One injected fault: the step, where it went (a parameter name or ``"loss"``), the value."""

    step: int
    where: str
    value: float


def _value(v: Any) -> float:
    if isinstance(v, str):
        if v.lower() not in _NAMED:
            raise GradwatchError(f"a fault value is a number or one of {', '.join(_NAMED)}; got {v!r}.")
        return _NAMED[v.lower()]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise GradwatchError(f"a fault value is a number or one of {', '.join(_NAMED)}; got {v!r}.")
    return float(v)


class FaultInjector:
    """Inject faults into gradients (one element of one parameter's gradient) or into the loss.

    Args:
        model: the module whose parameters may receive gradient faults (names come from it).
        optimizer: the optimizer whose ``step()`` calls count the steps.
        faults: step -> value (a number, ``"nan"``, ``"inf"``, ``"-inf"``).
        target: ``"grad"`` (default) writes the value into one gradient element; ``"loss"``
            multiplies the loss by it in :meth:`loss` (so 1e30 makes every gradient 1e30 times larger,
            NaN makes them all NaN).
        layers: parameter names that may be hit (default: any); one is drawn per fault.
        seed: draws the parameter and the element, reproducibly.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        faults: Mapping[int, Any],
        *,
        target: str = "grad",
        layers: Sequence[str] | None = None,
        seed: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise GradwatchError(f"FaultInjector needs the model (a torch.nn.Module); got {type(model).__name__}.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise GradwatchError(f"FaultInjector needs the optimizer whose steps it counts; got {type(optimizer).__name__}.")
        if not isinstance(faults, Mapping):
            raise GradwatchError(f"faults maps step -> value, e.g. {{3: 'nan', 10: 1e30}}; got {type(faults).__name__}.")
        for s in faults:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise GradwatchError(f"fault steps are non-negative integers (optimizer steps); got {s!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise GradwatchError(f"seed must be an integer; got {seed!r}.")
        if isinstance(layers, str):
            layers = [layers]
        if target not in ("grad", "loss"):
            raise GradwatchError(f"target must be 'grad' or 'loss'; got {target!r}.")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.numel()]
        if layers is not None:
            missing = sorted(set(layers) - {n for n, _ in named})
            if missing:
                raise GradwatchError(f"no trainable parameter named {missing[0]!r}; names are: {[n for n, _ in named]}.")
            named = [(n, p) for n, p in named if n in set(layers)]
        if not named:
            raise GradwatchError("the model has no trainable parameters to inject faults into.")
        self.target = target
        self.faults = {int(s): _value(v) for s, v in faults.items()}
        self.step = 0
        #: The faults actually injected, in order.
        self.injected: list[Fault] = []
        gen = torch.Generator().manual_seed(seed)
        self._plan: dict[int, tuple[str, tuple[int, ...]]] = {}
        for s in sorted(self.faults):
            name, p = named[int(torch.randint(len(named), (1,), generator=gen))]
            flat = int(torch.randint(p.numel(), (1,), generator=gen))
            self._plan[s] = (name, tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), p.shape)))
        self._handles = [optimizer.register_step_post_hook(self._count)]
        if target == "grad":
            for name, p in named:
                self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(name)))

    def _count(self, *_: Any) -> None:
        self.step += 1

    def _grad_hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(p: torch.Tensor) -> None:
            plan = self._plan.get(self.step)
            if plan is None or plan[0] != name or p.grad is None:
                return
            value = self.faults[self.step]
            with torch.no_grad():
                p.grad[plan[1]] = value
            if not self.injected or self.injected[-1].step != self.step:
                self.injected.append(Fault(self.step, name, value))

        return hook

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss, multiplied by the fault value at a faulty step (target="loss"); else unchanged."""
        if self.target != "loss" or self.step not in self.faults:
            return loss
        value = self.faults[self.step]
        if not self.injected or self.injected[-1].step != self.step:
            self.injected.append(Fault(self.step, "loss", value))
        return loss * value

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "FaultInjector":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
