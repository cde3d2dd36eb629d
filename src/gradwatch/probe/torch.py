"""Per-layer gradient and weight statistics from PyTorch, computed on the device without host syncs.

The probe is driven from two points of an optimizer step (Lightning's naming: the hook name says
when it runs):

* :meth:`TorchProbe.on_before_optimizer_step` — gradients are final (after backward, AMP unscaling
  and the data-parallel all-reduce); reductions are queued on the device and their results written
  into a preallocated device ring buffer, one row per step.
* :meth:`TorchProbe.on_after_optimizer_step` — on sampled steps, the norm of the actual update.

Nothing in these two calls reads a device value on the host: no scalar reads (``item``, ``tolist``,
a Python ``float`` or ``if`` of a tensor). Every ``flush_every`` steps the used part of the buffer crosses to the
host in a single copy; everything derived (RMS, mean, std, ratios, the global norm) is computed there
in float64, from raw sums that the device produced.

Raw quantities per layer (a parameter tensor):

* every step: ``‖g‖₂``, one ``_foreach_norm`` per (device, dtype) group — the one pass over the
  gradients that every step pays for (RMS, the non-finite flag and the global norm derive from it);
* sampled steps (every ``sample_every``, denser at the start): ``Σg`` in float64 and the centred
  norm ``‖g − ḡ‖₂`` (exact mean and std), ``min g`` and ``max g`` (one ``aminmax``; ``abs().amax()``
  and ``_foreach_norm(ord=inf)`` were ~10x slower on the 2-core development CPU), a log2 histogram
  of ``|g|`` read from the float32 exponent bits (there ~5x cheaper than ``histc`` of ``log10``; its
  zero bin gives the zero fraction), the same moments of the weights, and ``‖Δw‖₂`` of the real
  update.
"""

from __future__ import annotations

import math
import sys
import time
import weakref
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import GradwatchError
from ..store import HIST_BINS, HIST_EXP_MAX, HIST_EXP_MIN, LAYER_METRICS, STEP_METRICS, Chunk, LayerInfo
from .distributed import WindowReducer, is_dtensor, local_tensor, world

# ------------------------------------------------------------------------------------ layer table

#: Modules that are activation functions (seed 002's list, and the usual others).
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.RReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
    nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Threshold,
)

#: Output activations: they follow a layer as the others do (the diagnosis reads the output layer's),
#: but surgery never swaps them.
OUTPUT_ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (nn.Softmax, nn.LogSoftmax, nn.Softmin)

#: Modules that may stand between a layer and its activation without changing which one it is.
_TRANSPARENT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
)


def _activation_name(obj: object) -> str | None:
    if isinstance(obj, ACTIVATION_TYPES):
        return type(obj).__name__
    if callable(obj) and getattr(obj, "__module__", "").startswith("torch"):
        name = getattr(obj, "__name__", "")
        known = {"relu": "ReLU", "gelu": "GELU", "sigmoid": "Sigmoid", "tanh": "Tanh", "silu": "SiLU",
                 "elu": "ELU", "selu": "SELU", "leaky_relu": "LeakyReLU", "mish": "Mish", "softmax": "Softmax"}
        return known.get(name)
    return None


def following_activations(model: nn.Module) -> dict[str, str]:
    """Module path -> name of the activation that follows it, where the structure tells.

    Two sources: an ordered container whose next non-transparent child is an activation
    (``Sequential(Linear, BatchNorm1d, ReLU)``), and a module's own ``activation`` attribute
    (``TransformerEncoderLayer``, Keras ``Dense``). Functional calls inside ``forward`` cannot be seen
    statically; activation hooks (sampled) cover those.
    """
    found: dict[str, str] = {}
    for path, module in model.named_modules():
        own = _activation_name(getattr(module, "activation", None))
        if own and not isinstance(module, ACTIVATION_TYPES):
            if any(True for _ in module.parameters(recurse=False)):
                found[path] = own  # a Keras-style Dense: the activation follows its own kernel
            else:
                # A block such as TransformerEncoderLayer: the activation follows its first Linear.
                first = next((n for n, c in module.named_children() if isinstance(c, nn.Linear)), None)
                if first is not None:
                    found[f"{path}.{first}" if path else first] = own
        children = list(module.named_children())
        for i, (name, child) in enumerate(children):
            if isinstance(child, ACTIVATION_TYPES) or not any(True for _ in child.parameters(recurse=False)):
                continue
            for _, nxt in children[i + 1 :]:
                if isinstance(nxt, ACTIVATION_TYPES + OUTPUT_ACTIVATION_TYPES):
                    found.setdefault(f"{path}.{name}" if path else name, type(nxt).__name__)
                    break
                if not isinstance(nxt, _TRANSPARENT_TYPES):
                    break
    return found


def build_layer_table(
    model: nn.Module | None, params: Sequence[torch.Tensor]
) -> tuple[list[LayerInfo], list[torch.Tensor]]:
    """Name each parameter by its owning module path; tied parameters appear once.

    Args:
        model: the module that owns ``params`` (may be None: parameters are then named by position).
        params: the parameters to watch, in the optimizer's order.
    Returns:
        the layer table and the parameters in the same order (duplicates removed).
    """
    owner: dict[int, tuple[str, nn.Module]] = {}
    activations: dict[str, str] = {}
    if model is not None:
        for mpath, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                owner.setdefault(id(p), (f"{mpath}.{pname}" if mpath else pname, module))
        activations = following_activations(model)
    layers: list[LayerInfo] = []
    kept: list[torch.Tensor] = []
    seen: set[int] = set()
    for i, p in enumerate(params):
        if id(p) in seen:
            continue
        seen.add(id(p))
        name, module = owner.get(id(p), (f"param.{i}", None))
        mpath = name.rpartition(".")[0]
        layers.append(
            LayerInfo(
                name=name,
                shape=tuple(p.shape),
                numel=p.numel(),
                module_type=type(module).__name__ if module is not None else "?",
                activation=activations.get(mpath),
                dtype=str(p.dtype).replace("torch.", ""),
                trainable=p.requires_grad,
            )
        )
        kept.append(p)
    return layers, kept


# ------------------------------------------------------------------------------------ the probe


#: Steps at the start of a run that are sampled every other step: many real runs are 20-60 steps
#: long, and each rule needs a few sampled values (dead units: three) to decide.
SHORT_RUN_STEPS = 10


@dataclass(frozen=True)
class StepInputs:
    """What the guards judge a step by, as the probe computed it: the layers that have a gradient,
    their parameters and gradients, and the gradients' norms (one device tensor, summed over the
    data-parallel ranks), in the same order."""

    ids: list[int]
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    norms: torch.Tensor | None

    def unscaled(self, scale: torch.Tensor) -> "StepInputs":
        """The same step with its norms divided by a loss scale still carried by the gradients."""
        return self if self.norms is None else replace(self, norms=self.norms / scale)


@dataclass(frozen=True)
class ProbeConfig:
    """How often each tier of statistics is computed and the buffer crosses to the host.

    Args:
        flush_every: steps per device->host copy (and per store append).
        sample_every: steps between full statistics (everything but the gradient norm). The first
            ``2 * sample_every`` steps are sampled five times as densely, and the first
            SHORT_RUN_STEPS every other step: problems show early, and a run of 20 steps still
            holds enough sampled steps to be diagnosed.
    """

    flush_every: int = 50
    sample_every: int = 50

    def __post_init__(self) -> None:
        for name in ("flush_every", "sample_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise GradwatchError(f"{name} must be a positive integer; got {v!r}.")

    def is_sampled(self, step: int) -> bool:
        if step % self.sample_every == 0:
            return True
        if step < SHORT_RUN_STEPS:
            return step % 2 == 0
        dense = max(1, self.sample_every // 5)
        return step < 2 * self.sample_every and step % dense == 0


# Raw slots of a ring row: two step slots, then blocks of one value per layer.
_BLOCKS = ("g_norm", "g_sum", "g_cnorm", "g_min", "g_max", "w_norm", "w_sum", "w_cnorm", "dw_norm", "a_dead", "a_sat", "a_const")
# Step slots: the loss and lr, what guards did (written by record_guards), the AMP loss scale and
# whether GradScaler skipped the step (record_amp).
_LOSS, _LR, _NORM_AFTER, _COEF, _THRESHOLD, _SKIPPED, _AMP_SCALE, _AMP_SKIPPED = range(8)
_STEP_SLOTS = 8
#: Ring blocks that scale with the gradients (divided by the loss scale where they carried it).
_GRAD_BLOCKS = ("g_norm", "g_sum", "g_cnorm", "g_min", "g_max")
_EXP_BINS = 256  # every value of a float32's 8-bit exponent field
_CHUNK = 1 << 22  # elements per scratch pass: bounds a group's scratch at 48 MiB


class _Group:
    """Layers whose parameters share a device and dtype: one foreach launch each."""

    def __init__(self, layer_ids: list[int], params: list[torch.Tensor]):
        self.layer_ids = layer_ids
        self.params = params
        # FSDP2 parameters are DTensors: statistics are of this rank's shard (a local view, taken
        # afresh at each use because FSDP may re-point it), combined over the ranks at the flush.
        self._sharded = any(is_dtensor(p) for p in params)
        self._weights = [p.detach() for p in params]
        self.device = params[0].device
        size = min(max(local_tensor(p).numel() for p in params), _CHUNK)
        self.scratch = torch.empty(size, dtype=torch.float32, device=self.device)
        self.scratch64 = torch.empty(size, dtype=torch.float64, device=self.device)
        # The pre-step copy of the weights for ‖Δw‖. On CPU it is kept between sampled steps:
        # a fresh model-sized allocation there costs page faults that dwarf the copy itself. On
        # accelerators the caching allocator reuses memory, so the copy lives only for one step.
        self.keep_snapshot = self.device.type == "cpu"
        self.snapshot: list[torch.Tensor] | None = None

    @property
    def weights(self) -> list[torch.Tensor]:
        if self._sharded:
            return [local_tensor(p.detach()) for p in self.params]
        return self._weights

    def take_snapshot(self) -> list[torch.Tensor]:
        if not self.keep_snapshot:
            return torch._foreach_mul(self.weights, 1.0)
        if self.snapshot is None:
            self.snapshot = [torch.empty_like(w) for w in self.weights]
        torch._foreach_copy_(self.snapshot, self.weights)
        return self.snapshot


def l2_norms(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """L2 norm of each tensor (one foreach launch; all share a device and dtype): accumulated in
    float32 for float32 and narrower types, in float64 for float64 (which cannot be narrowed in
    ``_foreach_norm``)."""
    if tensors and tensors[0].dtype == torch.float64:
        return torch._foreach_norm(tensors, 2)
    return torch._foreach_norm(tensors, 2, dtype=torch.float32)


def global_norm(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """The L2 norm of all ``tensors`` together (as ``clip_grad_norm_`` defines it), a float32 scalar
    on ``device``: one foreach launch per (device, dtype), no host read. None for no tensors."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    norms = [n.to(device=device, dtype=torch.float32) for group in groups.values() for n in l2_norms(group)]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else None


def per_tensor_norms(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The L2 norm of each tensor, in order, stacked as float32 on ``device`` (one foreach launch per
    (device, dtype) group; no host read)."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    for ids in groups.values():
        for i, n in zip(ids, l2_norms([tensors[i] for i in ids])):
            out[i] = n.to(device=device, dtype=torch.float32)
    return torch.stack(out)  # type: ignore[arg-type]


def _chunks(x: torch.Tensor) -> list[torch.Tensor]:
    flat = x.detach().reshape(-1)
    return [flat[i : i + _CHUNK] for i in range(0, flat.numel(), _CHUNK)]


def _exact_moments(x: torch.Tensor, scratch: torch.Tensor, scratch64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σx, ‖x − x̄‖₂)``: the sum accumulated in float64, the centred norm from a second pass over
    ``x − x̄``; both through preallocated scratch (``sum(dtype=float64)`` would allocate a float64
    copy of the whole tensor each time, and on CPU its page faults cost more than the sum).

    The float64 sum keeps a cancelling mean exact (softmax output-bias gradients sum to 0: in float32
    their mean is pure rounding noise); the second pass has none of the cancellation of
    ``E[x²] − x̄²`` (a LayerNorm weight of ones has std exactly 0).
    """
    n = x.numel()
    if n == 0:
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        return zero, zero
    chunks = _chunks(x)
    parts = [scratch64[: c.numel()].copy_(c).sum() for c in chunks]
    total = torch.stack(parts).sum() if len(parts) > 1 else parts[0]
    mean = (total / n).to(torch.float32)
    sq = [torch.linalg.vector_norm(torch.sub(c.to(torch.float32), mean, out=scratch[: c.numel()])) for c in chunks]
    return total, (torch.linalg.vector_norm(torch.stack(sq)) if len(sq) > 1 else sq[0])


def _exponent_counts(g: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Counts of the float32 exponent field of every element: a log2 histogram of |g| from the bits
    (integer shift and mask into a scratch, then bincount; no log, no float compare)."""
    bits = scratch.view(torch.int32)
    counts = None
    for c in _chunks(g):
        c32 = c if c.dtype == torch.float32 else c.to(torch.float32)
        exp = torch.bitwise_right_shift(c32.view(torch.int32), 23, out=bits[: c32.numel()]).bitwise_and_(0xFF)
        part = torch.bincount(exp, minlength=_EXP_BINS)
        counts = part if counts is None else counts + part
    return counts if counts is not None else torch.zeros(_EXP_BINS, dtype=torch.int64, device=g.device)


#: Pre-activation |x| beyond which the activation is saturated: sigmoid(4.6) > 0.99 and
#: sigmoid(-4.6) < 0.01; tanh(2.65) > 0.99 (DESIGN.md's saturation definitions).
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


class _ActivationTap:
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
        self.fired = False  # a hook ran since the last collect()
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
                flat = x.movedim(unit_dim, 0).reshape(units, -1)
                lo, hi = torch.aminmax(flat, dim=1)
                torch.maximum(acc.unit_max, hi.to(acc.unit_max.dtype), out=acc.unit_max)
                torch.minimum(acc.unit_min, lo.to(acc.unit_min.dtype), out=acc.unit_min)
                acc.seen.add_(1)
                acc.rows.add_(flat.shape[1])
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


class TorchProbe:
    """Statistics of one optimizer's parameters, kept on the device until a flush.

    Args:
        params: parameters in layer-table order.
        layers: their layer table.
        config: schedules.
        sink: receives each flushed :class:`~gradwatch.store.Chunk` on the host.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        layers: Sequence[LayerInfo],
        config: ProbeConfig,
        sink: Callable[[Chunk], None],
        model: nn.Module | None = None,
        tap_targets: Sequence[TapTarget] | None = None,
    ):
        if not params:
            raise GradwatchError("there are no parameters to watch: the model or optimizer holds none.")
        self.config = config
        self.layers = list(layers)
        self._sink = sink
        self._params = list(params)
        n = len(self._params)
        self.device = self._params[0].device
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(self._params):
            groups.setdefault((p.device, p.dtype), []).append(i)
        self._groups = [_Group(ids, [self._params[i] for i in ids]) for ids in groups.values()]
        self._numel = np.array([p.numel() for p in self._params], dtype=np.float64)

        # One device buffer holds both rings, so a flush is exactly one device->host copy.
        cap = config.flush_every
        self._width = _STEP_SLOTS + len(_BLOCKS) * n
        # Sampled steps in any window of `cap` consecutive steps (a manual flush can start one anywhere).
        horizon = 2 * config.sample_every + 2 * cap
        marks = np.array([config.is_sampled(s) for s in range(horizon)], dtype=np.int64)
        self._hist_cap = int(np.convolve(marks, np.ones(cap, np.int64), mode="valid").max())
        ring_size = cap * self._width
        total = ring_size + self._hist_cap * n * _EXP_BINS
        self._buf = torch.full((total,), math.nan, dtype=torch.float32, device=self.device)
        self._ring = self._buf[:ring_size].view(cap, self._width)
        self._hist = self._buf[ring_size:].view(self._hist_cap, n, _EXP_BINS)
        pinned = self.device.type == "cuda"
        self._staging = torch.empty((total,), dtype=torch.float32, pin_memory=pinned)

        # Host-side per-row facts: known in Python already, so they never touch the device.
        self._steps = np.zeros(cap, np.int64)
        self._lr = np.full(cap, np.nan, np.float64)
        self._time = np.zeros(cap, np.float64)
        self._sampled = np.zeros(cap, np.float64)
        self._loss_logged = np.zeros(cap, np.float64)
        self._present = np.zeros((cap, n), bool)
        self._rolled = np.zeros(cap, np.float64)
        self._grads_scaled = np.zeros(cap, bool)  # rows whose gradients still carried the AMP loss scale
        self._hist_steps: list[int] = []
        #: Whether to keep each step's gradients and norms for guards (set by a watch with guards).
        self.keep_step_inputs = False
        #: This step's gradients and their norms, for guards: (layer ids, params, grads, norms).
        self.step_inputs = StepInputs([], [], [], None)

        self._rows = 0  # rows of the ring in use
        self.step = 0  # optimizer steps seen
        self._t0 = time.perf_counter()
        self._index_cache: dict[tuple, torch.Tensor] = {}
        self._pending_loss: torch.Tensor | float | None = None
        self._snapshot: list[list[torch.Tensor]] | None = None
        self._lr_tensor = False
        #: Combines statistics over data-parallel ranks (set at the first step when a process group
        #: with several ranks is initialised by then; None in a single process).
        self._reducer: WindowReducer | None = None
        self._world_checked = False
        #: (first, last) steps of windows flushed without summing over the ranks (this rank's own numbers).
        self.local_windows: list[tuple[int, int]] = []
        #: Whether every rank runs this probe (so windows may be summed over them). Integrations that
        #: record on rank 0 only turn it off: a collective on one rank alone would wait forever.
        self.reduce_ranks = True
        self._tap: _ActivationTap | None = None
        if model is not None:
            layer_of = {id(p): i for i, p in enumerate(self._params)}
            acts = {i: layer.activation for i, layer in enumerate(self.layers)}
            self._tap = _ActivationTap(model, layer_of, acts, tap_targets)
            if config.is_sampled(0):
                self._tap.attach()  # the next forward belongs to step 0

    def _start_reducer(self) -> None:
        self._world_checked = True
        w = world() if self.reduce_ranks else None
        if w is not None:
            self._reducer = WindowReducer(self._params, w[0], w[1], _BLOCKS, _STEP_SLOTS, _LOSS, self.device)

    @property
    def reducer(self) -> WindowReducer | None:
        return self._reducer

    def reduce_step_norms(self, layer_ids: Sequence[int], norms: torch.Tensor) -> torch.Tensor:
        """Per-layer norms of this rank's gradients -> the global ones (unchanged in one process)."""
        return norms if self._reducer is None else self._reducer.reduce_norms(layer_ids, norms)

    def _slot_index(self, key: tuple, block: str, layer_ids: Sequence[int]) -> torch.Tensor:
        """Ring columns of ``block`` for ``layer_ids``, built once per pattern (no per-step H2D copy)."""
        idx = self._index_cache.get(key)
        if idx is None:
            n = len(self._params)
            start = _STEP_SLOTS + _BLOCKS.index(block) * n
            idx = self._index_cache[key] = self._to_device([start + i for i in layer_ids])
        return idx

    def _to_device(self, values: list[int]) -> torch.Tensor:
        """An index tensor on the probe's device without a blocking copy (pinned source on CUDA)."""
        host = torch.tensor(values, dtype=torch.long)
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.to(self.device)

    def _put(self, row: torch.Tensor, block: str, key: tuple, layer_ids: Sequence[int],
             values: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(values).to(device=self.device, dtype=torch.float32)
        row.index_copy_(0, self._slot_index((block, *key), block, layer_ids), stacked)
        return stacked

    # -- hook points ------------------------------------------------------------------------------

    @torch.no_grad()
    def on_before_optimizer_step(self, lr: float | torch.Tensor | None = None) -> None:
        """Queue this step's statistics; gradients must be final."""
        if not self._world_checked:
            self._start_reducer()
        if self._rows == self.config.flush_every:
            self.flush()
        row, step = self._rows, self.step
        sampled = self.config.is_sampled(step)
        self._steps[row] = step
        self._sampled[row] = sampled
        self._loss_logged[row] = 0
        self._time[row] = time.perf_counter() - self._t0
        self._lr[row] = lr if isinstance(lr, (int, float)) else math.nan
        self._present[row] = False
        self._rolled[row] = 0
        self._grads_scaled[row] = False
        ring_row = self._ring[row]  # all NaN: filled at creation and after each flush
        if isinstance(lr, torch.Tensor):
            self._lr_tensor = True
            ring_row[_LR].copy_(lr.detach(), non_blocking=True)
        if self._pending_loss is not None:
            self._write_loss(row, self._pending_loss)
            self._pending_loss = None
        hrow = len(self._hist_steps)
        snapshot: list[list[torch.Tensor]] = []
        all_ids: list[int] = []
        all_params: list[torch.Tensor] = []
        all_grads: list[torch.Tensor] = []
        all_norms: list[torch.Tensor] = []
        for gi, group in enumerate(self._groups):
            ids, grads, params = [], [], []
            for i, p in zip(group.layer_ids, group.params):
                g = p.grad
                if g is not None and not g.is_sparse:
                    ids.append(i)
                    grads.append(local_tensor(g))
                    params.append(p)
            self._present[row, ids] = True
            key = (gi, tuple(ids))
            if grads:
                norms = self._put(ring_row, "g_norm", key, ids, l2_norms(grads))
                if self.keep_step_inputs:
                    all_ids += ids
                    all_params += params
                    all_grads += grads
                    all_norms.append(norms)
                if sampled:
                    self._grad_details(ring_row, hrow, key, ids, grads)
            if sampled:
                self._weight_details(ring_row, gi, group)
                snapshot.append(group.take_snapshot())
        self._snapshot = snapshot if sampled else None
        if self.keep_step_inputs:
            norms_all = None if not all_norms else all_norms[0] if len(all_norms) == 1 else torch.cat(all_norms)
            if norms_all is not None:
                norms_all = self.reduce_step_norms(all_ids, norms_all)  # same decisions on every rank
            self.step_inputs = StepInputs(all_ids, all_params, all_grads, norms_all)
        if self._tap is not None and self._tap.attached:
            tap = self._tap
            fired, judge = tap.fired, tap.judge
            blocks = tap.detach(keep=sampled)  # a sticky tap collects at every step
            if judge and not fired and not tap.sticky and self._present[row].any() and tap.model_is_compiled():
                tap.turn_off("the model's forward ran without gradwatch's activation hooks (a torch.compile "
                             "graph traced before they were attached); dead and saturated units are judged "
                             "from the gradients alone")
            for name, (ids, values) in blocks.items():
                if values:
                    self._put(ring_row, name, (name, tuple(ids)), ids, values)
        # Commit the row last: a step that failed half-way is never flushed as if it were whole.
        self._rows = row + 1
        self.step = step + 1
        if sampled:
            self._hist_steps.append(step)

    def _grad_details(
        self, ring_row: torch.Tensor, hrow: int, key: tuple, ids: list[int], grads: list[torch.Tensor]
    ) -> None:
        group = self._groups[key[0]]
        moments = [_exact_moments(g, group.scratch, group.scratch64) for g in grads]
        self._put(ring_row, "g_sum", key, ids, [m[0] for m in moments])
        self._put(ring_row, "g_cnorm", key, ids, [m[1] for m in moments])
        # aminmax raises on empty tensors: those keep NaN for min and max.
        full = [(i, g) for i, g in zip(ids, grads) if g.numel()]
        if full:
            mm = [torch.aminmax(g) for _, g in full]
            fids = [i for i, _ in full]
            self._put(ring_row, "g_min", ("mm", *key), fids, [m.min for m in mm])
            self._put(ring_row, "g_max", ("mm", *key), fids, [m.max for m in mm])
        hidx = self._index_cache.get(("h", key))
        if hidx is None:
            hidx = self._index_cache[("h", key)] = self._to_device(ids)
        counts = torch.stack([_exponent_counts(g, group.scratch) for g in grads]).to(device=self.device, dtype=torch.float32)
        self._hist[hrow].index_copy_(0, hidx, counts)

    def _weight_details(self, ring_row: torch.Tensor, gi: int, group: _Group) -> None:
        moments = [_exact_moments(w, group.scratch, group.scratch64) for w in group.weights]
        self._put(ring_row, "w_norm", ("w", gi), group.layer_ids, l2_norms(group.weights))
        self._put(ring_row, "w_sum", ("w", gi), group.layer_ids, [m[0] for m in moments])
        self._put(ring_row, "w_cnorm", ("w", gi), group.layer_ids, [m[1] for m in moments])

    @torch.no_grad()
    def on_after_optimizer_step(self) -> None:
        """On sampled steps, record ‖Δw‖ of the update the optimizer actually made; before a sampled
        step, put the activation hooks on for its forward pass."""
        if self._tap is not None and self.config.is_sampled(self.step):
            self._tap.attach(judge=True)
        if self._snapshot is None:
            return
        ring_row = self._ring[self._rows - 1]  # the row that on_before_optimizer_step committed
        for gi, (group, before) in enumerate(zip(self._groups, self._snapshot)):
            torch._foreach_sub_(before, group.weights)
            self._put(ring_row, "dw_norm", ("dw", gi), group.layer_ids, l2_norms(before))
        self._snapshot = None

    def current_grad_norm(self) -> torch.Tensor | None:
        """The global norm of the gradients as they are now (e.g. after a framework clipped them)."""
        ids = [i for i, p in enumerate(self._params) if p.grad is not None and not p.grad.is_sparse]
        grads = [local_tensor(self._params[i].grad) for i in ids]  # type: ignore[arg-type]
        if self._reducer is None:
            return global_norm(grads, self.device)
        if not ids:
            return None
        return torch.linalg.vector_norm(self.reduce_step_norms(ids, per_tensor_norms(grads, self.device)))

    def last_global_norm(self) -> torch.Tensor:
        """The global gradient norm of the step just committed, as a device scalar (no host read)."""
        n = len(self._params)
        start = _STEP_SLOTS + _BLOCKS.index("g_norm") * n
        norms = self._ring[self._rows - 1, start : start + n]
        norms = torch.where(torch.isnan(norms), 0.0, norms)
        return torch.linalg.vector_norm(self.reduce_step_norms(range(n), norms))

    @torch.no_grad()
    def record_guards(
        self,
        norm_after: torch.Tensor,
        coef: torch.Tensor,
        threshold: torch.Tensor | None,
        skipped: torch.Tensor | bool,
        rolled_back: bool,
    ) -> None:
        """What the guards did at the step just committed (0-d device tensors; no host read)."""
        nan = torch.full((), math.nan, dtype=torch.float32, device=self.device)
        skip = skipped if isinstance(skipped, torch.Tensor) else torch.full((), 1.0 if skipped else 0.0, device=self.device)
        values = [norm_after, coef, nan if threshold is None else threshold, skip]
        row = self._ring[self._rows - 1]
        row[_NORM_AFTER : _SKIPPED + 1].copy_(torch.stack([v.to(device=self.device, dtype=torch.float32) for v in values]))
        self._rolled[self._rows - 1] = 1.0 if rolled_back else 0.0

    @torch.no_grad()
    def record_amp(self, scale: torch.Tensor | None, skipped: torch.Tensor | bool, grads_scaled: bool = False) -> None:
        """GradScaler's part in the step just committed: its loss scale (a device tensor), whether it
        skipped the step (a device flag or a host bool), and whether the gradients the statistics were
        taken from still carry the scale (fused optimizers unscale inside their kernel), in which case
        the flush divides them by it. No host read."""
        row = self._ring[self._rows - 1]
        if scale is not None:
            row[_AMP_SCALE].copy_(scale.detach().reshape(()).to(device=self.device, dtype=torch.float32), non_blocking=True)
        if isinstance(skipped, torch.Tensor):
            row[_AMP_SKIPPED].copy_((skipped.detach().reshape(()) > 0).to(device=self.device, dtype=torch.float32))
        else:
            row[_AMP_SKIPPED].fill_(1.0 if skipped else 0.0)
        self._grads_scaled[self._rows - 1] = grads_scaled and scale is not None

    @property
    def execution_order(self) -> list[int] | None:
        """Indices of the tapped layers in the order their modules ran, once a tapped forward has
        completed (None before, and without a tap)."""
        tap = self._tap
        return list(tap.order) if tap is not None and tap.order_complete else None

    @property
    def activation_note(self) -> str | None:
        """Why activation statistics are off for this stream, if they are."""
        return self._tap.off_reason if self._tap is not None else None

    def remove_hooks(self) -> None:
        """Take the activation hooks off the model (the watch is closing)."""
        if self._tap is not None:
            self._tap.remove()

    # -- loss ---------------------------------------------------------------------------------------

    def _write_loss(self, row: int, loss: torch.Tensor | float) -> None:
        self._loss_logged[row] = 1  # so a logged NaN loss is told apart from no loss at all
        if isinstance(loss, torch.Tensor):
            self._ring[row, _LOSS].copy_(loss.detach().reshape(()), non_blocking=True)
        else:
            self._ring[row, _LOSS].fill_(loss)

    @torch.no_grad()
    def log_loss(self, loss: torch.Tensor | float) -> None:
        """Attach ``loss`` to the latest optimizer step (before the first step: to the first)."""
        if self._rows:
            self._write_loss(self._rows - 1, loss)
        else:
            self._pending_loss = loss

    def stage_loss(self, loss: torch.Tensor | float) -> None:
        """Attach ``loss`` to the *next* optimizer step (the runner calls this at ``backward()``)."""
        self._pending_loss = loss

    # -- flush --------------------------------------------------------------------------------------

    def flush(self, reduce: bool = True) -> None:
        """Copy the used rows to the host (one transfer), derive the statistics, hand them to the sink.

        Under data parallelism the window is first summed over the ranks (one all_reduce), unless
        ``reduce`` is False: a flush that only this rank makes (an error, a crash, an interrupt) must
        not start a collective the others never join. Such a window holds this rank's own numbers.
        """
        n = self._rows
        n_hist = len(self._hist_steps)
        if n == 0:
            return
        used = self._ring[:n].numel() if n_hist == 0 else self._buf.numel()
        if self._reducer is not None and world() is None:
            # The process group ended before this flush (destroyed without gradwatch's wrapper):
            # there is no one left to sum with; this rank's own numbers are all there is.
            self._reducer = None
            reduce = False
            print("gradwatch: the process group ended before the last flush; its last "
                  f"{n} steps hold this rank's own statistics (close the watch before destroy_process_group()).",
                  file=sys.stderr)
        if self._reducer is not None and not reduce:
            self.local_windows.append((int(self._steps[0]), int(self._steps[n - 1])))
        if self._reducer is not None and reduce:
            # One all_reduce of the window over the ranks; its result crosses to the host once.
            sampled_rows = np.searchsorted(self._steps[:n], np.array(self._hist_steps, np.int64)).tolist()  # sync-ok: numpy
            ring, hist = self._reducer.reduce_window(self._ring[:n], self._hist[:n_hist], self._loss_logged, sampled_rows)
            chunk = self._derive(ring, n, hist)
            # Every rank has summed this window: it is done with, whatever the sink makes of it (a
            # retry would sum it again, alone, with a size the others do not have).
            self._clear(used)
            self._sink(chunk)
            return
        self._staging[:used].copy_(self._buf[:used], non_blocking=self._staging.is_pinned())
        if self._staging.is_pinned():
            torch.cuda.current_stream(self.device).synchronize()  # sync-ok: the one sync per flush
        host = self._staging.numpy()  # sync-ok: host memory, after the one copy
        ring = host[: self._ring.numel()].reshape(self._ring.shape)[:n].astype(np.float64)
        hist = host[self._ring.numel() :].reshape(self._hist.shape)[:n_hist].astype(np.float64)
        self._sink(self._derive(ring, n, hist))
        # Only once the window is stored: if the sink failed, the next flush tries it again.
        self._clear(used)

    def _clear(self, used: int) -> None:
        self._buf[:used].fill_(math.nan)  # steps write only what they compute; the rest stays NaN
        self._rows = 0
        self._hist_steps = []

    def _derive(self, ring: np.ndarray, n: int, exp_counts: np.ndarray) -> Chunk:
        """Everything stored, in float64 on the host, from the raw device sums of one window."""
        L = len(self._params)

        def block(name: str) -> np.ndarray:
            start = _STEP_SLOTS + _BLOCKS.index(name) * L
            return ring[:, start : start + L]

        numel = self._numel[None, :]
        present = self._present[:n]
        hist_rows = np.searchsorted(self._steps[:n], np.array(self._hist_steps, np.int64))
        if self._grads_scaled[:n].any():
            exp_counts = self._unscale(ring, n, exp_counts, hist_rows, block)
        zeros = np.full((n, L), np.nan)
        zeros[hist_rows] = exp_counts[:, :, 0]  # exponent 0: exact zeros (and subnormals)
        with np.errstate(divide="ignore", invalid="ignore"):
            g_norm = np.where(present, block("g_norm"), np.nan)
            w_norm, w_sum, w_cnorm = block("w_norm"), block("w_sum"), block("w_cnorm")
            layer = {
                "grad_norm": g_norm,
                "grad_rms": g_norm / np.sqrt(numel),
                "grad_mean": block("g_sum") / numel,
                "grad_std": block("g_cnorm") / np.sqrt(numel),
                "grad_maxabs": np.maximum(-block("g_min"), block("g_max")),
                "grad_nonfinite": np.where(present, ~np.isfinite(g_norm), np.nan),
                "grad_zero_frac": zeros / numel,
                "weight_norm": w_norm,
                "weight_rms": w_norm / np.sqrt(numel),
                "weight_mean": w_sum / numel,
                "weight_std": w_cnorm / np.sqrt(numel),
                "update_ratio": block("dw_norm") / w_norm,
                "act_dead_frac": block("a_dead"),
                "act_sat_frac": block("a_sat"),
                "act_const_frac": block("a_const"),
            }
            # The global norm over the layers that have a gradient, as clip_grad_norm_ defines it.
            global_norm = np.sqrt(np.sum(np.where(present, g_norm, 0.0) ** 2, axis=1))
            global_norm[~present.any(axis=1)] = np.nan
        lr = self._lr[:n].copy()
        if self._lr_tensor:
            lr = np.where(np.isnan(lr), ring[:, _LR], lr)
        steps = {
            "loss": ring[:, _LOSS],
            "grad_norm": global_norm,
            "lr": lr,
            "time": self._time[:n].copy(),
            "sampled": self._sampled[:n].copy(),  # 1 where the sampled statistics were computed
            "loss_logged": self._loss_logged[:n].copy(),  # 1 where a loss was given for the step
            "grad_norm_clipped": ring[:, _NORM_AFTER],
            "clip_coef": ring[:, _COEF],
            "clip_threshold": ring[:, _THRESHOLD],
            "skipped": np.nan_to_num(ring[:, _SKIPPED], nan=0.0),  # no guard: nothing skipped
            "rolled_back": self._rolled[:n].copy(),
            "amp_scale": ring[:, _AMP_SCALE],
            "amp_skipped": np.nan_to_num(ring[:, _AMP_SKIPPED], nan=0.0),  # no GradScaler: nothing skipped
        }
        assert set(steps) == set(STEP_METRICS) and set(layer) == set(LAYER_METRICS)
        return Chunk(
            steps=self._steps[:n].copy(),
            step_values=steps,
            layer_values=layer,
            hist_steps=np.array(self._hist_steps, np.int64),
            hist=fold_exponent_counts(exp_counts),
        )


    def _unscale(self, ring: np.ndarray, n: int, exp_counts: np.ndarray, hist_rows: np.ndarray, block) -> np.ndarray:  # type: ignore[no-untyped-def]
        """Rows whose gradients carried GradScaler's loss scale (a fused optimizer unscales inside its
        kernel, after the statistics were taken): divide the gradient sums by it and shift the log2
        histogram by log2(scale) bins (GradScaler's scales are powers of two)."""
        rows = np.flatnonzero(self._grads_scaled[:n])
        scale = ring[rows, _AMP_SCALE][:, None]
        for name in _GRAD_BLOCKS:
            b = block(name)
            b[rows] = b[rows] / scale
        counts = exp_counts.copy()
        for h, r in enumerate(hist_rows):
            if not self._grads_scaled[r] or not np.isfinite(ring[r, _AMP_SCALE]) or ring[r, _AMP_SCALE] <= 0:
                continue
            k = int(round(math.log2(ring[r, _AMP_SCALE])))
            inner = exp_counts[h, :, 1:_EXP_BINS - 1]  # exponent 0 (zeros) and 255 (inf/NaN) stay put
            shifted = np.zeros_like(inner)
            if k >= 0:
                shifted[:, : inner.shape[1] - k] = inner[:, k:]
                shifted[:, 0] += inner[:, :k].sum(axis=1)  # below the smallest normal: the lowest bin
            else:
                shifted[:, -k:] = inner[:, : inner.shape[1] + k]
            counts[h, :, 1:_EXP_BINS - 1] = shifted
        return counts


def fold_exponent_counts(counts: np.ndarray) -> np.ndarray:
    """Fold 256 float32-exponent counts into the stored bins (see :func:`gradwatch.store.hist_edges`)."""
    # Exponent field e holds |g| in [2^(e-127), 2^(e-126)); e = 0 zeros and subnormals; e = 255 inf/NaN.
    lo = HIST_EXP_MIN + 127
    hi = HIST_EXP_MAX + 127
    out = np.empty(counts.shape[:-1] + (HIST_BINS,), np.float32)
    out[..., 0] = counts[..., :lo].sum(-1)
    out[..., 1:-1] = counts[..., lo:hi]
    out[..., -1] = counts[..., hi:].sum(-1)
    return out
