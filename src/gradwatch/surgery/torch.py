"""Model surgery on a live PyTorch model (see :mod:`gradwatch.surgery`).

    report = gradwatch.surgery.reinit(model, "he_uniform")
    report = gradwatch.surgery.swap_activations(model, nn.Sigmoid, nn.ReLU)
    report = gradwatch.surgery.insert_norm(model, "batch", optimizer=optimizer)

What it cannot do safely it refuses with a :class:`GradwatchError` that says so (an activation
called as a function inside ``forward`` cannot be swapped from outside).

Initialisers follow Keras, whose defaults the seeds use: ``glorot_*``, ``he_*`` and ``lecun_*``
draw from U(-limit, limit) with limit = sqrt(3 * scale / fan), or from a normal truncated at two
standard deviations, rescaled so its standard deviation is sqrt(scale / fan); biases become 0.
``orthogonal`` takes the gain of the activation that follows the layer (``calculate_gain``).
"""

from __future__ import annotations

import inspect
import io
import math
import re
import textwrap
import tokenize
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import GradwatchError
from ..probe.torch import ACTIVATION_TYPES, following_activations
from . import SCHEMES as _SCHEME_NAMES
from . import SurgeryReport

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
SCHEMES = _SCHEME_NAMES
#: Standard deviation of a unit normal truncated to [-2, 2] (Keras divides by it).
_TRUNC_STD = 0.87962566103423978

#: Activation names the seeds use, as modules.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "leaky_relu": nn.LeakyReLU, "rrelu": nn.RReLU, "prelu": nn.PReLU,
    "elu": nn.ELU, "selu": nn.SELU, "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid, "softplus": nn.Softplus, "mish": nn.Mish,
}
_GAIN_NAMES = {"ReLU": "relu", "LeakyReLU": "leaky_relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "SELU": "selu"}


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
    acts = following_activations(model)
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
        if isinstance(w, nn.parameter.UninitializedParameter):
            report.skipped.append(f"{path} ({type(m).__name__}): not materialised yet (run one forward pass first)")
            continue
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
        report.changed.append(f"{path} ({type(m).__name__} {tuple(w.shape)}): {how}"
                              + (f", bias {bias:g}" if m.bias is not None else ""))
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


def _functional_names(cls: type[nn.Module]) -> set[str]:
    """What the activation is called as a function: ``LeakyReLU`` -> ``leaky_relu``, ``SiLU`` -> ``silu``."""
    name = cls.__name__
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()  # LeakyReLU -> leaky_re_lu
    names = {name.lower(), snake, snake.replace("re_lu", "relu").replace("si_lu", "silu").replace("ge_lu", "gelu")}
    return names | {n + "_" for n in names}  # in-place variants: relu_, F.relu_


def _code_without_strings(src: str) -> str:
    """Source with comments, strings and docstrings removed (tokenize knows where they are);
    tokens are joined by single spaces."""
    out = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(textwrap.dedent(src)).readline):
            if tok.type not in (tokenize.COMMENT, tokenize.STRING, tokenize.NL, tokenize.NEWLINE,
                                tokenize.INDENT, tokenize.DEDENT):
                out.append(tok.string)
    except (tokenize.TokenError, IndentationError):
        return src
    return " ".join(out)


def _functional_calls(model: nn.Module, cls_: type[nn.Module]) -> list[str]:
    """Classes whose ``forward`` calls the activation as a function (``torch.sigmoid(x)``,
    ``F.leaky_relu``, ``x.relu_()``)."""
    alternatives = "|".join(sorted(map(re.escape, _functional_names(cls_)), key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w])(?:{alternatives}) \(")
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
        code = _code_without_strings(src)
        code = code.split(") :", 1)[1] if ") :" in code else code  # drop the signature
        if pattern.search(code):
            hits.append(cls.__name__)
    return hits


def execution_order(model: nn.Module, example: Any) -> list[str]:
    """Module paths in the order a forward pass on ``example`` runs them (eval mode, no grad, so
    neither BatchNorm statistics nor dropout randomness change; training flags are restored)."""
    order: list[str] = []
    paths: dict[int, list[str]] = {}
    for p, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(p)
    seen_count: dict[int, int] = {}

    def pre(mod: nn.Module, _args: Any) -> None:
        k = seen_count.get(id(mod), 0)
        ps = paths.get(id(mod), [""])
        order.append(ps[min(k, len(ps) - 1)])
        seen_count[id(mod)] = k + 1

    handles = [m.register_forward_pre_hook(pre) for m in {id(m): m for m in model.modules()}.values()]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*(example if isinstance(example, tuple) else (example,)))
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    return order


def _output_paths(model: nn.Module, kinds: tuple[type, ...], example: Any) -> tuple[set[str], str]:
    """Paths of the output modules: for weight layers the last one to run, for activations those
    that run after it. From a forward pass on ``example`` if given, else the registration order."""
    if example is not None:
        order = execution_order(model, example)
        how = "in execution order"
    else:
        order = [p for p, _ in model.named_modules(remove_duplicate=False)]
        how = "in registration order; pass example= for the execution order"
    mods = dict(model.named_modules(remove_duplicate=False))
    weight_idx = [i for i, p in enumerate(order) if isinstance(mods.get(p), WEIGHT_LAYERS)]
    last = weight_idx[-1] if weight_idx else -1
    if kinds == WEIGHT_LAYERS:
        return ({order[last]} if last >= 0 else set()), how
    return {p for i, p in enumerate(order) if i > last and isinstance(mods.get(p), kinds)}, how


def swap_activations(
    model: nn.Module,
    old: Any = nn.Sigmoid,
    new: Any = nn.ReLU,
    *,
    keep_output: bool = True,
    example: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    **kwargs: Any,
) -> SurgeryReport:
    """Replace every activation module of type ``old`` with a fresh ``new(**kwargs)``.

    The output activation (the one that runs after the last Linear/Conv) is kept unless
    ``keep_output=False``: it maps the output to what the loss expects. Which one that is comes
    from a forward pass on ``example`` when given, else from the order modules were registered.
    ``skip=["path"]`` keeps others. A module used in several places is replaced everywhere by one
    new module. Refuses when ``forward`` applies ``old`` as a function (``torch.sigmoid(x)``): that
    cannot be reached from outside. New parameters (PReLU's) join ``optimizer`` if given.
    """
    _check_model(model)
    skip = set(kwargs.pop("skip", []))
    outputs, how = _output_paths(model, ACTIVATION_TYPES, example) if keep_output else (set(), "")
    old_cls, new_cls = _activation_class(old, "old"), _activation_class(new, "new")
    try:
        new_cls(**kwargs)
    except TypeError as e:
        raise GradwatchError(f"cannot make {new_cls.__name__}(**{kwargs}): {e}.") from None
    report = SurgeryReport(f"swap_activations({old_cls.__name__} -> {new_cls.__name__})")
    targets = [(p, m) for p, m in model.named_modules(remove_duplicate=False) if type(m) is old_cls]
    functional = _functional_calls(model, old_cls)
    if not targets and functional:
        raise GradwatchError(
            f"{', '.join(functional)}.forward calls {old_cls.__name__.lower()} as a function, which cannot be swapped "
            f"from outside; make it a module (self.act = nn.{old_cls.__name__}()) or change the call."
        )
    if not targets:
        raise GradwatchError(f"the model has no {old_cls.__name__} module to replace.")
    # A module object at several paths is either kept everywhere or replaced everywhere by one module.
    paths_of: dict[int, list[str]] = {}
    for path, m in targets:
        paths_of.setdefault(id(m), []).append(path)
    ref = next(model.parameters(), None)
    for paths in paths_of.values():
        if any(p in skip for p in paths):
            report.skipped.append(f"{', '.join(paths)}: kept, as asked")
            continue
        if any(p in outputs for p in paths):
            report.skipped.append(f"{', '.join(paths)}: the output activation ({how}), kept (keep_output=False swaps it too)")
            continue
        replacement = new_cls(**kwargs)
        if ref is not None:
            replacement.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        for path in paths:
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, attr, replacement)
            report.changed.append(f"{path}: {old_cls.__name__} -> {new_cls.__name__}")
        report.new_parameters += list(replacement.parameters())
    if functional:
        report.skipped.append(f"{', '.join(functional)}.forward also calls {old_cls.__name__.lower()} as a function: not swapped")
    if optimizer is not None:
        join_optimizer(optimizer, report)
    return report


def join_optimizer(optimizer: torch.optim.Optimizer, report: SurgeryReport) -> None:
    """Put a surgery's new parameters into the optimizer's first param group (not a new group: LR
    schedulers keep one entry per group and would break on an extra one)."""
    have = {id(p) for g in optimizer.param_groups for p in g["params"]}
    new = [p for p in report.new_parameters if p.requires_grad and id(p) not in have]
    if not new:
        return
    optimizer.param_groups[0]["params"].extend(new)
    report.changed.append(f"(optimizer) {len(new)} new parameters joined {type(optimizer).__name__}'s first param group")


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


def _how_parent_uses(parent: nn.Module, attr: str) -> str | None:
    """None if wrapping ``parent.attr`` in a Sequential is safe (the parent only calls it); else why not."""
    if isinstance(parent, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return None
    try:
        code = _code_without_strings(inspect.getsource(type(parent).forward))
    except (OSError, TypeError):
        return f"how {type(parent).__name__} uses it cannot be read"
    if re.search(rf"self \. {re.escape(attr)} \. ", code):
        return f"{type(parent).__name__}.forward reads self.{attr}'s attributes (its .weight), not just its output"
    if re.search(rf"self \. {re.escape(attr)} \(", code):
        return None
    return f"{type(parent).__name__}.forward does not call self.{attr} directly"


def _already_normed(model: nn.Module, path: str) -> bool:
    parent_path = path.rpartition(".")[0]
    if not parent_path:
        return False
    parent = model.get_submodule(parent_path)
    return isinstance(parent, nn.Sequential) and len(parent) == 2 and isinstance(
        parent[1], (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))


def insert_norm(
    model: nn.Module,
    kind: str = "batch",
    *,
    optimizer: torch.optim.Optimizer | None = None,
    include_output: bool = False,
    example: Any = None,
) -> SurgeryReport:
    """Put a normalisation right after every Linear/Conv layer (before its activation).

    Each layer is replaced, where it sits, by ``Sequential(layer, norm)``: parameter names move
    from ``fc.weight`` to ``fc.0.weight``. The model's output layer (the last weight layer to run:
    from a forward pass on ``example`` when given, else the last registered) is left alone unless
    ``include_output``. Left alone too: a layer used in two places, a layer already followed by a
    norm, and a layer whose parent reads its attributes (``self.fc.weight``) instead of calling it.

    Args:
        kind: ``"batch"`` (BatchNorm; for Linear over the last dimension) or ``"layer"``
            (LayerNorm for Linear, GroupNorm(1) for Conv).
        optimizer: if given, the new parameters join its first param group; otherwise they are in
            ``report.new_parameters`` for you to add.
    """
    _check_model(model)
    if kind not in ("batch", "layer"):
        raise GradwatchError(f"kind must be 'batch' or 'layer'; got {kind!r}.")
    layers = [(p, m) for p, m in model.named_modules() if type(m) in WEIGHT_LAYERS and p]
    if not layers:
        raise GradwatchError("insert_norm found no Linear or Conv layer (inside the model) to follow with a norm.")
    report = SurgeryReport(f"insert_norm({kind})")
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    outputs, how = _output_paths(model, WEIGHT_LAYERS, example)
    for path, m in layers:
        if path in outputs and not include_output:
            report.skipped.append(f"{path}: the output layer ({how}), left as it is")
            continue
        if uses.get(id(m), 0) > 1:
            report.skipped.append(f"{path}: the same module is used in several places; wrapping it would change all of them")
            continue
        if _already_normed(model, path):
            report.skipped.append(f"{path}: already followed by a norm")
            continue
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        why = _how_parent_uses(parent, attr)
        if why is not None:
            report.skipped.append(f"{path}: left as it is, {why}")
            continue
        norm = _norm_for(m, kind)
        norm.train(m.training)
        setattr(parent, attr, nn.Sequential(m, norm))
        report.changed.append(f"{path}: {type(m).__name__} -> Sequential({type(m).__name__}, {type(norm).__name__})")
        report.new_parameters += list(norm.parameters())
    if not report.changed:
        raise GradwatchError("insert_norm changed nothing: " + "; ".join(report.skipped) + ".")
    if optimizer is not None:
        join_optimizer(optimizer, report)
    return report
