"""Model surgery: the offline fixes of the seeds, applied to a live PyTorch model.

    report = gradwatch.surgery.reinit(model, "he_uniform")
    report = gradwatch.surgery.swap_activations(model, nn.Sigmoid, nn.ReLU)
    report = gradwatch.surgery.insert_norm(model, "batch", optimizer=optimizer)
    print(report)

Each function changes the model in place and returns a :class:`SurgeryReport` of what it changed
and what it left alone, and why. What it cannot do safely it refuses with a :class:`GradwatchError`
that says so (an activation called as a function inside ``forward`` cannot be swapped from outside).

Initialisers follow Keras, whose defaults the seeds use: ``glorot_*``, ``he_*`` and ``lecun_*``
draw from U(-limit, limit) with limit = sqrt(3 * scale / fan), or from a normal truncated at two
standard deviations, rescaled so its standard deviation is sqrt(scale / fan); biases become 0.
``orthogonal`` takes the gain of the activation that follows the layer (``calculate_gain``).
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from .errors import GradwatchError
from .probe.torch import ACTIVATION_TYPES, _following_activations

#: Layers whose weight the initialisers and the norm insertion act on.
WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: scheme -> (scale, fan mode, distribution). Variance = scale / fan.
_SCHEMES = {
    "glorot_uniform": (1.0, "avg", "uniform"),
    "glorot_normal": (1.0, "avg", "normal"),
    "he_uniform": (2.0, "in", "uniform"),
    "he_normal": (2.0, "in", "normal"),
    "lecun_uniform": (1.0, "in", "uniform"),
    "lecun_normal": (1.0, "in", "normal"),
    "orthogonal": (1.0, "", "orthogonal"),
}
SCHEMES = tuple(_SCHEMES)
#: Standard deviation of a unit normal truncated to [-2, 2] (Keras divides by it).
_TRUNC_STD = 0.87962566103423978

#: Activation names the seeds use, as modules.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "leaky_relu": nn.LeakyReLU, "rrelu": nn.RReLU, "prelu": nn.PReLU,
    "elu": nn.ELU, "selu": nn.SELU, "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid, "softplus": nn.Softplus, "mish": nn.Mish,
}
_GAIN_NAMES = {"ReLU": "relu", "LeakyReLU": "leaky_relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "SELU": "selu"}


@dataclass
class SurgeryReport:
    """What a surgery changed (``changed``), what it left alone and why (``skipped``), and the
    parameters it created (``new_parameters``: they must join an optimizer to be trained)."""

    action: str
    changed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    new_parameters: list[nn.Parameter] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.action}: changed {len(self.changed)}"]
        lines += [f"  changed  {c}" for c in self.changed]
        lines += [f"  skipped  {s}" for s in self.skipped]
        return "\n".join(lines)


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise GradwatchError(f"surgery works on a torch.nn.Module; got {type(model).__name__}.")
    return model


def _fans(w: torch.Tensor) -> tuple[int, int]:
    receptive = math.prod(w.shape[2:]) if w.dim() > 2 else 1
    return w.shape[1] * receptive, w.shape[0] * receptive


# ------------------------------------------------------------------------------------------ reinit


def reinit(
    model: nn.Module,
    scheme: str = "glorot_uniform",
    *,
    bias: float = 0.0,
    seed: int | None = None,
    layers: Iterable[str] | None = None,
) -> SurgeryReport:
    """Re-initialise the weights of every Linear and Conv layer (or those named in ``layers``).

    Args:
        scheme: one of :data:`SCHEMES`.
        bias: the value biases are set to.
        seed: draw from a generator seeded with this (default: torch's global generator).
        layers: module paths to act on (default: all weight layers).
    """
    _check_model(model)
    if scheme not in _SCHEMES:
        raise GradwatchError(f"unknown initialisation scheme {scheme!r}; known: {', '.join(SCHEMES)}.")
    scale, mode, dist = _SCHEMES[scheme]
    wanted = set(layers) if layers is not None else None
    acts = _following_activations(model)
    report = SurgeryReport(f"reinit({scheme})")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    found = set()
    for path, m in model.named_modules():
        if wanted is not None and path not in wanted:
            continue
        found.add(path)
        if not isinstance(m, WEIGHT_LAYERS):
            if wanted is not None or (any(True for _ in m.parameters(recurse=False)) and not isinstance(m, ACTIVATION_TYPES)):
                report.skipped.append(f"{path or '(model)'} ({type(m).__name__}): not a Linear/Conv layer, left as it is")
            continue
        w = m.weight
        with torch.no_grad():
            if dist == "orthogonal":
                act = acts.get(path)
                gain = nn.init.calculate_gain(_GAIN_NAMES.get(act or "", "linear"))  # LeakyReLU: slope 0.01
                nn.init.orthogonal_(w, gain=gain, generator=gen)
                how = f"orthogonal, gain {gain:.3g} ({act or 'no activation'})"
            else:
                fan_in, fan_out = _fans(w)
                fan = {"in": fan_in, "avg": (fan_in + fan_out) / 2}[mode]
                if dist == "uniform":
                    limit = math.sqrt(3.0 * scale / fan)
                    nn.init.uniform_(w, -limit, limit, generator=gen)
                    how = f"U(-{limit:.3g}, {limit:.3g})"
                else:
                    std = math.sqrt(scale / fan) / _TRUNC_STD
                    nn.init.trunc_normal_(w, 0.0, std, -2 * std, 2 * std, generator=gen)
                    how = f"truncated N(0, {std * _TRUNC_STD:.3g}²)"
            if getattr(m, "bias", None) is not None:
                m.bias.fill_(bias)
        report.changed.append(f"{path} ({type(m).__name__} {tuple(w.shape)}): {how}" + (f", bias {bias:g}" if m.bias is not None else ""))
    if wanted is not None and wanted - found:
        raise GradwatchError(f"no module named {sorted(wanted - found)[0]!r} in the model; module paths are like "
                             f"{[p for p, _ in model.named_modules()][1:4]}.")
    if not report.changed:
        raise GradwatchError("reinit found no Linear or Conv layer to initialise in this model.")
    return report


# ------------------------------------------------------------------------------- swap_activations


def _activation_class(spec: Any, what: str) -> type[nn.Module]:
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        cls = ACTIVATIONS.get(spec.lower())
        if cls is not None:
            return cls
    raise GradwatchError(
        f"{what} must be an activation module class (nn.ReLU) or one of {', '.join(sorted(set(ACTIVATIONS)))}; got {spec!r}."
    )


def _functional_calls(model: nn.Module, name: str) -> list[str]:
    """Classes whose ``forward`` calls the activation as a function (``torch.sigmoid(x)``, ``F.relu``)."""
    pattern = re.compile(rf"(?<![\w.])(?:torch\.|F\.|nn\.functional\.|torch\.nn\.functional\.)?{name}\(|\.{name}\(\)")
    hits = []
    seen: set[type] = set()
    for m in model.modules():
        cls = type(m)
        if cls in seen or cls.__module__.startswith("torch."):
            continue
        seen.add(cls)
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            continue
        code = "\n".join(line.split("#", 1)[0] for line in src.splitlines()[1:])  # no signature, no comments
        if pattern.search(code):
            hits.append(cls.__name__)
    return hits


def _output_activations(model: nn.Module) -> set[str]:
    """Activation modules after the model's last weight layer (in module order): they shape the
    output the loss reads (a sigmoid before BCE), not the gradient flow between layers."""
    order = list(model.named_modules())
    last = max((i for i, (_, m) in enumerate(order) if isinstance(m, WEIGHT_LAYERS)), default=-1)
    return {p for i, (p, m) in enumerate(order) if i > last and isinstance(m, ACTIVATION_TYPES)}


def swap_activations(
    model: nn.Module, old: Any = nn.Sigmoid, new: Any = nn.ReLU, *, keep_output: bool = True, **kwargs: Any
) -> SurgeryReport:
    """Replace every activation module of type ``old`` with a fresh ``new(**kwargs)``.

    The output activation (after the last Linear/Conv) is kept unless ``keep_output=False``: it
    maps the output to what the loss expects. ``skip=["path"]`` keeps others. Refuses when the
    model applies ``old`` as a function inside ``forward`` (it cannot be reached from outside:
    change the code, or make the activation a module).
    """
    _check_model(model)
    skip = set(kwargs.pop("skip", []))
    outputs = _output_activations(model) if keep_output else set()
    old_cls, new_cls = _activation_class(old, "old"), _activation_class(new, "new")
    try:
        new_cls(**kwargs)
    except TypeError as e:
        raise GradwatchError(f"cannot make {new_cls.__name__}(**{kwargs}): {e}.") from None
    report = SurgeryReport(f"swap_activations({old_cls.__name__} -> {new_cls.__name__})")
    targets = [(p, m) for p, m in model.named_modules() if type(m) is old_cls]
    functional = _functional_calls(model, old_cls.__name__.lower())
    if not targets and functional:
        raise GradwatchError(
            f"{', '.join(functional)}.forward calls {old_cls.__name__.lower()} as a function, which cannot be swapped "
            f"from outside; make it a module (self.act = nn.{old_cls.__name__}()) or change the call."
        )
    if not targets:
        raise GradwatchError(f"the model has no {old_cls.__name__} module to replace.")
    for path, _ in targets:
        if path in skip:
            report.skipped.append(f"{path}: kept, as asked")
            continue
        if path in outputs:
            report.skipped.append(f"{path}: the output activation, kept (keep_output=False swaps it too)")
            continue
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        replacement = new_cls(**kwargs)
        ref = next(model.parameters(), None)
        if ref is not None:
            replacement.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        setattr(parent, attr, replacement)
        report.changed.append(f"{path}: {old_cls.__name__} -> {new_cls.__name__}")
        report.new_parameters += list(replacement.parameters())
    if functional:
        report.skipped.append(f"{', '.join(functional)}.forward also calls {old_cls.__name__.lower()} as a function: not swapped")
    return report


# -------------------------------------------------------------------------------------- insert_norm


class FeatureBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last dimension of an input of any rank (a Linear's features), so it can
    follow a Linear that sees (batch, features) or (batch, tokens, features) alike."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return super().forward(x)
        shape = x.shape
        return super().forward(x.reshape(-1, shape[-1])).reshape(shape)


def _norm_for(m: nn.Module, kind: str) -> nn.Module:
    w = m.weight
    opts = {"device": w.device, "dtype": w.dtype}
    if isinstance(m, nn.Linear):
        return FeatureBatchNorm(m.out_features, **opts) if kind == "batch" else nn.LayerNorm(m.out_features, **opts)
    if kind == "batch":
        cls = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}[type(m)]
        return cls(m.out_channels, **opts)
    return nn.GroupNorm(1, m.out_channels, **opts)  # LayerNorm over channels and positions


def insert_norm(
    model: nn.Module,
    kind: str = "batch",
    *,
    optimizer: torch.optim.Optimizer | None = None,
    include_output: bool = False,
) -> SurgeryReport:
    """Put a normalisation right after every Linear/Conv layer (before its activation).

    Each layer is replaced, where it sits, by ``Sequential(layer, norm)``: parameter names move
    from ``fc.weight`` to ``fc.0.weight``. The model's last weight layer (its output) is left alone
    unless ``include_output``. Refuses a layer whose module object is used in two places (tied).

    Args:
        kind: ``"batch"`` (BatchNorm; for Linear over the last dimension) or ``"layer"``
            (LayerNorm for Linear, GroupNorm(1) for Conv).
        optimizer: if given, the new parameters join it as a param group (with its first group's
            settings); otherwise they are in ``report.new_parameters`` for you to add.
    """
    _check_model(model)
    if kind not in ("batch", "layer"):
        raise GradwatchError(f"kind must be 'batch' or 'layer'; got {kind!r}.")
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS) and p]
    if not layers:
        raise GradwatchError("insert_norm found no Linear or Conv layer (inside the model) to follow with a norm.")
    report = SurgeryReport(f"insert_norm({kind})")
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    output = layers[-1][0]
    for path, m in layers:
        if path == output and not include_output:
            report.skipped.append(f"{path}: the output layer, left as it is")
            continue
        if uses.get(id(m), 0) > 1:
            report.skipped.append(f"{path}: the same module is used in several places; wrapping it would change all of them")
            continue
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        norm = _norm_for(m, kind)
        norm.train(m.training)
        setattr(parent, attr, nn.Sequential(m, norm))
        report.changed.append(f"{path}: {type(m).__name__} -> Sequential({type(m).__name__}, {type(norm).__name__})")
        report.new_parameters += list(norm.parameters())
    if not report.changed:
        raise GradwatchError("insert_norm changed nothing: " + "; ".join(report.skipped) + ".")
    if optimizer is not None and report.new_parameters:
        group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        optimizer.add_param_group({**group, "params": report.new_parameters})
        report.changed.append(f"(optimizer) {len(report.new_parameters)} new parameters joined {type(optimizer).__name__} as a param group")
    return report
