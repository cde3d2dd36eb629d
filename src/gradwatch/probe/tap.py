"""The activation tap: forward hooks that read what the watched layers hand on to their activations
(dead, saturated and constant units), on sampled steps only.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

#: Pre-activation |x| beyond which the activation is saturated: sigmoid(4.6) > 0.99 and
#: sigmoid(-4.6) < 0.01; tanh(2.65) > 0.99 (a unit is saturated when its output is within 0.01 of a bound).
SATURATION_THRESHOLD = {
    "Sigmoid": 4.595, "LogSigmoid": 4.595, "Hardsigmoid": 3.0,
    "Tanh": 2.647, "Hardtanh": 1.0, "Softsign": 99.0,
}
#: The same points seen from the activation's output (a Keras ``Dense(activation=...)`` hands on
#: the activated values): sigmoid beyond 0.01 / 0.99, tanh and softsign beyond +-0.99.
_OUTPUT_BOUND = {"Sigmoid": (0.5, 0.49), "Hardsigmoid": (0.5, 0.49), "Tanh": (0.0, 0.99),
                 "Softsign": (0.0, 0.99), "Hardtanh": (0.0, 0.99)}
#: A softmax row is saturated when its largest probability is above this: its Jacobian is ~0.
SOFTMAX_SATURATED = 0.99
_PREACTIVATION_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class TapTarget:
    """A module whose forward output the activation tap reads.

    Attributes:
        module: the module (a ``torch.nn.Module``; a Keras layer on the torch backend is one).
        layer: index, in the probe's layer table, of the weight whose units the output has.
        activation: the activation applied to those units (layer-table name, e.g. ``"Tanh"``).
        space: ``"pre"`` when the output is the pre-activation (an ``nn.Linear`` followed by an
            activation), ``"post"`` when the module applied the activation itself (Keras ``Dense``).
        unit_axis: the axis of the output that indexes units; None: the last for a matrix weight,
            the channel axis for a convolution (torch's layouts).
    """

    module: nn.Module
    layer: int
    activation: str | None
    space: str = "pre"
    unit_axis: int | None = None


def torch_tap_targets(model: nn.Module, layer_of: dict[int, int], activations: dict[int, str | None]) -> list[TapTarget]:
    """Linear and convolution modules whose weight is watched: their output is the pre-activation."""
    out = []
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, _PREACTIVATION_TYPES) and w is not None and id(w) in layer_of:
            i = layer_of[id(w)]
            out.append(TapTarget(module, i, activations.get(i)))
    return out


def _has_flat_part(activation: str | None, space: str) -> bool:
    """Whether :func:`_flat_share` measures anything for this activation, read from this side of it."""
    return activation == "Softmax" or (activation or "") in (SATURATION_THRESHOLD if space == "pre" else _OUTPUT_BOUND)


def _flat_share(x: torch.Tensor, activation: str | None, space: str, unit_dim: int) -> tuple[torch.Tensor, int] | None:
    """(count, total) of the values that sit where the activation is flat, or None when it has no
    flat part (ReLU's is judged per unit, as dead units)."""
    if activation == "Softmax":
        p = x if space == "post" else x.to(torch.float32).softmax(dim=unit_dim)
        top = p.amax(dim=unit_dim)
        return (top > SOFTMAX_SATURATED).sum(), top.numel()
    if space == "pre":
        t = SATURATION_THRESHOLD.get(activation or "")
        return None if t is None else ((x.abs() > t).sum(), x.numel())
    bound = _OUTPUT_BOUND.get(activation or "")
    return None if bound is None else (((x - bound[0]).abs() > bound[1]).sum(), x.numel())


class ActivationTap:
    """Forward hooks on the layers that produce pre-activations, attached only for the forward pass
    of a sampled step.

    For torch models the targets are Linear/Conv modules, whose output is the pre-activation, so no
    ``nn.ReLU`` module is assumed: a ``F.relu`` or ``torch.sigmoid`` in ``forward`` is judged by the
    sign and size of what it gets. Keras layers apply their activation themselves and are read after
    it (``TapTarget.space``). Per unit (output feature or channel): the largest and smallest value
    over the batch (a unit whose maximum is <= 0 never fires through a ReLU; one whose maximum equals
    its minimum gives every sample the same output); per layer: the share of values where the
    activation is flat, where the layer table knows it. Several forwards in one step (gradient
    accumulation) are combined. The first step whose hooks fire also records the order in which
    the layers ran: the gradient-flow profile and the output layer follow execution, not creation.

    Under ``torch.compile`` the hooks are traced into the graph. Taking them off would make dynamo
    recompile (and a graph compiled without them is reused when they come back: dynamo does not
    guard on hooks it has not seen, so they would silently stop running). So a hook that finds
    itself being compiled makes the tap *sticky*: the hooks stay on, their values are collected at
    every step and kept only on sampled ones. A model compiled before the hooks were on (a warm-up
    forward before ``watch``; ``gradwatch run``, which attaches at the first optimizer step) never
    runs them: the first step whose gradients exist without any hook having fired turns the tap off,
    with a note saying why.
    """

    def __init__(self, model: nn.Module, layer_of: dict[int, int], activations: dict[int, str | None],
                 targets: Sequence[TapTarget] | None = None):
        self.targets: list[TapTarget] = list(targets) if targets is not None else torch_tap_targets(model, layer_of, activations)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # Per target, preallocated and reset in place: the hooks only update existing tensors, so a
        # compiled graph that holds them sees the same objects at every call and never recompiles
        # (a dict that grows, or a Python counter, would be guarded on and retraced per micro-batch).
        self._acc: dict[int, _TapAccumulators] = {}
        self.sticky = False  # the hooks are part of a compiled graph: they stay on
        self.fired = False  # a hook ran since the last detach()
        self.judge = False  # attached before a whole forward: if none fires, something bypasses them
        #: Why activation statistics are off (None while they are on).
        self.off_reason: str | None = None
        #: Layer indices in the order their modules first ran (complete after the first tapped step).
        self.order: list[int] = []
        self.order_complete = False
        self._model_ref = weakref.ref(model)

    @property
    def attached(self) -> bool:
        return len(self._handles) > 0

    def attach(self, judge: bool = False) -> None:
        if self._handles or not self.targets:
            return
        self.judge = judge
        for t in self.targets:
            self._handles.append(t.module.register_forward_hook(self._hook(t)))

    def _accumulators(self, t: TapTarget, units: int, device: torch.device) -> "_TapAccumulators | None":
        acc = self._acc.get(t.layer)
        if acc is None or acc.unit_max.device != device or acc.unit_max.shape[0] != units:
            if torch.compiler.is_compiling():
                return acc  # allocated eagerly before the first trace (attach); never inside a graph
            acc = self._acc[t.layer] = _TapAccumulators(units, device)  # new, or the model moved
        return acc

    def _hook(self, t: TapTarget):  # type: ignore[no-untyped-def]
        i, activation, space = t.layer, t.activation, t.space
        w = getattr(t.module, "weight", None)
        weight_dim = w.dim() if isinstance(w, torch.Tensor) else 2
        if t.unit_axis is None and isinstance(w, torch.Tensor):
            self._accumulators(t, int(w.shape[0]), w.device)

        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if torch.compiler.is_compiling():
                self.sticky = True  # traced into a graph: removing the hook would recompile it
            elif not self.order_complete and i not in self.order:
                self.order.append(i)
            self.fired = True
            if not isinstance(output, torch.Tensor) or output.numel() == 0 or not output.is_floating_point():
                return
            with torch.no_grad():
                x = output.detach()
                if t.unit_axis is not None:
                    unit_dim = t.unit_axis % x.dim()
                else:
                    # The unit axis: the last for Linear (any leading dims), the channel axis for ConvNd,
                    # batched or not (a ConvNd weight has the input's spatial dims plus 2).
                    unit_dim = max(0, x.dim() - weight_dim + 1) if weight_dim > 2 else x.dim() - 1
                units = x.shape[unit_dim]
                acc = self._accumulators(t, units, x.device)
                if acc is None or units != acc.unit_max.shape[0] or x.device != acc.unit_max.device:
                    return  # not the layout the weight implies, or the model moved: no statistic (the next attach re-allocates)
                if x.dim() == 1:
                    lo = hi = x  # one value per unit
                else:
                    # Reduce every other axis in place with amin and amax: moving the unit axis first
                    # copies the whole output (16x slower on a 64x32x32x32 conv output), and aminmax
                    # over a leading axis is 8x slower than the two of them (torch 2.13, CPU).
                    others = tuple(d for d in range(x.dim()) if d != unit_dim)
                    lo, hi = x.amin(dim=others), x.amax(dim=others)
                torch.maximum(acc.unit_max, hi.to(acc.unit_max.dtype), out=acc.unit_max)
                torch.minimum(acc.unit_min, lo.to(acc.unit_min.dtype), out=acc.unit_min)
                acc.seen.add_(1)
                acc.rows.add_(x.numel() // units)
                share = _flat_share(x, activation, space, unit_dim)
                if share is not None:
                    acc.sat_count.add_(share[0])
                    acc.sat_total.add_(share[1])

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def turn_off(self, reason: str) -> None:
        self.remove()
        self.targets = []
        self.off_reason = reason

    def model_is_compiled(self) -> bool:
        """Whether torch.compile wraps the model or any of its modules (checked only when hooks that
        should have run did not: one scan of the live objects)."""
        from ..objects import live_instances

        model = self._model_ref()
        if model is None:
            return False
        modules = set(map(id, model.modules()))
        if any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()):
            return True
        wrapper = getattr(torch._dynamo.eval_frame, "OptimizedModule", None) if hasattr(torch, "_dynamo") else None
        return wrapper is not None and any(id(getattr(o, "_orig_mod", None)) in modules for o in live_instances(wrapper))

    def end_step(self, keep: bool, had_gradients: np.ndarray) -> dict[str, tuple[list[int], list[torch.Tensor]]]:
        """At the optimizer step: :meth:`detach` (``keep`` on sampled steps: a sticky tap collects at
        every step), and turn the tap off when hooks attached before a whole forward never fired
        though layers (``had_gradients``, per layer) got gradients and the model is compiled."""
        fired, judge = self.fired, self.judge
        blocks = self.detach(keep=keep)
        if judge and not fired and not self.sticky and had_gradients.any() and self.model_is_compiled():
            self.turn_off("the model's forward ran without gradwatch's activation hooks (a torch.compile "
                          "graph traced before they were attached); dead and saturated units are judged "
                          "from the gradients alone")
        return blocks

    def detach(self, keep: bool = True) -> dict[str, tuple[list[int], list[torch.Tensor]]]:
        """Remove the hooks (unless a compiled graph holds them); return, per ring block
        (``a_dead``, ``a_sat``, ``a_const``), the layers and their fractions over the forwards since
        the last call (NaN where none ran), or nothing when not ``keep`` (a sticky tap between
        sampled steps: only the reset is needed)."""
        if not self.sticky:
            for h in self._handles:
                h.remove()
            self._handles = []
        if self.fired and self.order:
            self.order_complete = True
        self.fired = False
        out: dict[str, tuple[list[int], list[torch.Tensor]]] = {"a_dead": ([], []), "a_sat": ([], []), "a_const": ([], [])}
        for t in self.targets if keep else ():
            acc = self._acc.get(t.layer)
            if acc is None:
                continue
            seen = acc.seen > 0
            out["a_dead"][0].append(t.layer)
            out["a_dead"][1].append(torch.where(seen, (acc.unit_max <= 0).to(torch.float32).mean(), math.nan))
            # A unit is constant when every sample gave it the same value; one row per unit says nothing.
            const = (acc.unit_max == acc.unit_min).to(torch.float32).mean()
            out["a_const"][0].append(t.layer)
            out["a_const"][1].append(torch.where(seen & (acc.rows > 1), const, math.nan))
            if _has_flat_part(t.activation, t.space):
                out["a_sat"][0].append(t.layer)
                out["a_sat"][1].append(
                    torch.where(acc.sat_total > 0, acc.sat_count.to(torch.float32) / acc.sat_total.clamp(min=1), math.nan))
        for acc in self._acc.values():
            acc.reset()
        return out


class _TapAccumulators:
    """One target's running values over the forwards of a step, on the device."""

    def __init__(self, units: int, device: torch.device):
        self.unit_max = torch.full((units,), -math.inf, dtype=torch.float32, device=device)
        self.unit_min = torch.full((units,), math.inf, dtype=torch.float32, device=device)
        self.seen = torch.zeros((), dtype=torch.int64, device=device)
        self.rows = torch.zeros((), dtype=torch.int64, device=device)
        self.sat_count = torch.zeros((), dtype=torch.int64, device=device)
        self.sat_total = torch.zeros((), dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.unit_max.fill_(-math.inf)
        self.unit_min.fill_(math.inf)
        self.seen.zero_()
        self.rows.zero_()
        self.sat_count.zero_()
        self.sat_total.zero_()
