"""The layer table: each watched parameter named by its owning module, with the activation that
follows it where the model's structure tells.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..store import LayerInfo

#: Modules that are activation functions.
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


def in_model_order(params: Sequence[torch.Tensor], model: nn.Module, with_frozen: bool) -> list[torch.Tensor]:
    """An optimizer's parameters in the model's order (input side first, as the gradient-flow profile
    reads); ``with_frozen``: the model's frozen parameters (in no optimizer) ride along; parameters
    the model does not own come last."""
    in_opt = {id(p) for p in params}
    ordered = [p for p in model.parameters() if id(p) in in_opt or (with_frozen and not p.requires_grad)]
    owned = {id(p) for p in ordered}
    return ordered + [p for p in params if id(p) not in owned]


def unwrap_model(model: nn.Module | None) -> nn.Module | None:
    """The user's module inside DistributedDataParallel / torch.compile wrappers (same parameters),
    so layers keep their own module paths (``0.weight``, not ``module.0.weight`` or ``_orig_mod.0.weight``)."""
    seen = 0
    while model is not None and seen < 8:
        seen += 1
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, nn.parallel.DistributedDataParallel) or isinstance(model, nn.DataParallel):
            model = model.module
            continue
        break
    return model
