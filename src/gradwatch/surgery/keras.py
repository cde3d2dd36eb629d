"""Model surgery on a live Keras 3 model, any backend (see :mod:`gradwatch.surgery`).

    report = gradwatch.surgery.swap_activations(model, "sigmoid", "relu")
    report = gradwatch.surgery.reinit(model, "he_uniform", seed=7)
    report = gradwatch.surgery.insert_norm(model, "batch")

The model is changed in place (the object the script holds), its layers keep their weights, and an
optimizer already built learns the new variables (:mod:`gradwatch.surgery.keras_graph`). Call these
eagerly, between ``fit`` calls or before the first: never inside a ``tf.function`` or ``jax.jit``.

* **Activations** a layer applies itself (``Dense(activation="sigmoid")``, ``Activation("sigmoid")``)
  are changed on the layer; activation layers of their own class (``ReLU()``, ``LeakyReLU()``) and
  activations with parameters (``LeakyReLU`` with ``negative_slope=0.01``) become layers of the graph.
  The output's activation is kept unless ``keep_output=False``.
* **Initialisers** are Keras' own, by name (``he_uniform``...); ``seed=7`` draws every layer from one
  ``keras.random.SeedGenerator(7)`` in the model's layer order, so the weights are those of a fresh
  build whose layers share ``HeUniform(seed=keras.random.SeedGenerator(7))``.
* **Normalisation** goes after each hidden ``Dense``/``Conv`` and before its activation: a layer that
  applies its activation itself becomes ``layer, norm, Activation``. Sequential and functional models
  only (a subclassed model's ``call`` wires its layers).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import keras

from ..errors import GradwatchError
from ..keras import _ACTIVATION_LAYERS, _ACTIVATIONS, _TRANSPARENT_LAYERS, all_layers, effective_activations, own_activation
from . import SCHEMES, SurgeryReport
from .keras_graph import containers, model_kind, placeable, resync, rewrite, wired_by

#: Canonical activation name (as the layer table writes it) -> Keras activation function name.
_FUNCTIONS = {canon: name for name, canon in _ACTIVATIONS.items() if name != "swish"}
#: Activations that are layers with parameters of their own in Keras.
_LAYER_CLASSES = {"ReLU": "ReLU", "LeakyReLU": "LeakyReLU", "ELU": "ELU", "PReLU": "PReLU", "Softmax": "Softmax"}
_CLASSES = {"glorot_uniform": "GlorotUniform", "glorot_normal": "GlorotNormal", "he_uniform": "HeUniform",
            "he_normal": "HeNormal", "lecun_uniform": "LecunUniform", "lecun_normal": "LecunNormal",
            "orthogonal": "Orthogonal"}
#: Gain of an orthogonal initialisation for the activation after the layer (torch's calculate_gain).
_GAINS = {"ReLU": math.sqrt(2.0), "LeakyReLU": math.sqrt(2.0 / (1 + 0.01 ** 2)), "Tanh": 5.0 / 3, "SELU": 0.75}


def _check_model(model: Any) -> Any:
    if not isinstance(model, keras.Model):
        raise GradwatchError(f"Keras surgery works on a keras.Model; got {type(model).__name__}.")
    if not model.layers:
        raise GradwatchError(f"{model.name} has no layers to operate on.")
    return model


def canonical(spec: Any, what: str) -> str:
    """``"sigmoid"``, ``"Sigmoid"``, ``keras.activations.sigmoid`` or ``keras.layers.ReLU`` -> the layer
    table's name (``Sigmoid``, ``ReLU``)."""
    name = spec.__name__ if isinstance(spec, type) or callable(spec) else spec
    if isinstance(name, str):
        key = name.lower().replace("-", "_")
        for canon in set(_ACTIVATIONS.values()) | set(_LAYER_CLASSES):
            if key in (canon.lower(), _FUNCTIONS.get(canon, "")):
                return canon
        if key in _ACTIVATIONS:
            return _ACTIVATIONS[key]
    known = sorted(set(_ACTIVATIONS.values()) | set(_LAYER_CLASSES))
    raise GradwatchError(f"{what} must be an activation name ({', '.join(known)}), a keras.activations function or a "
                         f"Keras activation layer class; got {spec!r}.")


def _is_weight_layer(layer: Any) -> bool:
    return (getattr(layer, "kernel", None) is not None and (hasattr(layer, "units") or hasattr(layer, "filters"))
            and not type(layer).__name__.endswith("Cell"))


def _is_activation_layer(layer: Any) -> bool:
    return type(layer).__name__ in _ACTIVATION_LAYERS or type(layer).__name__ == "Activation"


def _unique(model: Any, base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


# ----------------------------------------------------------------------------------- the output


def output_layers(model: Any) -> tuple[set[int], str]:
    """The layers that make the model's output what the loss expects: for each output, the layer
    that produces it and, back through activation and dropout-like layers, the last weight layer."""
    if model_kind(model) == "subclassed" or not getattr(model, "outputs", None):
        order = all_layers(model)
        last = max((i for i, layer in enumerate(order) if _is_weight_layer(layer)), default=-1)
        return ({id(layer) for layer in order[last:]} if last >= 0 else set()), "in attribute order"
    found: set[int] = set()
    todo = [t._keras_history[0] for t in model.outputs]
    while todo:
        op = todo.pop()
        found.add(id(op))
        if isinstance(op, keras.Model):
            todo += [t._keras_history[0] for t in op.outputs]
            continue
        if _is_weight_layer(op):
            continue
        if _is_activation_layer(op) or type(op).__name__ in _TRANSPARENT_LAYERS:
            for node in op._inbound_nodes:
                todo += [t._keras_history[0] for t in node.input_tensors if id(t._keras_history[0]) not in found]
    return found, "in the graph"


# --------------------------------------------------------------------------------------- reinit


def _initializer(scheme: str, gain: float, seed: Any) -> Any:
    cls = getattr(keras.initializers, _CLASSES[scheme])
    return cls(gain=gain, seed=seed) if scheme == "orthogonal" else cls(seed=seed)


def _formula(init: Any, kernel: Any) -> str:
    """What a variance-scaling initialiser drew from, as the PyTorch side says it."""
    from keras.src.initializers.random_initializers import compute_fans

    fan_in, fan_out = compute_fans(tuple(kernel.shape))
    fan = {"fan_in": fan_in, "fan_out": fan_out}.get(init.mode, (fan_in + fan_out) / 2)
    if init.distribution == "uniform":
        limit = math.sqrt(3.0 * init.scale / fan)
        return f"U(-{limit:.3g}, {limit:.3g})"
    return f"truncated N(0, {math.sqrt(init.scale / fan):.3g}²)"


def reinit(model: Any, scheme: str = "glorot_uniform", *, bias: float = 0.0, seed: int | None = None,
           layers: Iterable[str] | None = None) -> SurgeryReport:
    """Draw every ``Dense``/``Conv`` kernel anew with Keras' ``scheme`` initialiser (``orthogonal``
    with the gain of the layer's activation) and set biases to ``bias``; ``layers`` names the layers
    to act on (default: all). The layers' ``kernel_initializer`` says the new scheme, so a saved
    model's config does too."""
    _check_model(model)
    if scheme not in SCHEMES:
        raise GradwatchError(f"unknown initialisation scheme {scheme!r}; known: {', '.join(SCHEMES)}.")
    wanted = set(layers) if layers is not None else None
    gen = keras.random.SeedGenerator(seed) if seed is not None else None
    acts = effective_activations(model)
    report = SurgeryReport(f"reinit({scheme})")
    found = set()
    for layer in all_layers(model):
        if wanted is not None and layer.name not in wanted:
            continue
        found.add(layer.name)
        if not _is_weight_layer(layer):
            if wanted is not None or (layer.weights and not isinstance(layer, keras.Model)):
                report.skipped.append(f"{layer.name} ({type(layer).__name__}): not a Dense/Conv layer, left as it is")
            continue
        if not layer.built:
            report.skipped.append(f"{layer.name} ({type(layer).__name__}): not built yet (build the model first)")
            continue
        act = acts.get(id(layer))
        gain = _GAINS.get(act or "", 1.0)
        init = _initializer(scheme, gain, gen)
        kernel = layer.kernel
        kernel.assign(init(tuple(kernel.shape), dtype=kernel.dtype))
        layer.kernel_initializer = _initializer(scheme, gain, None)
        how = f"orthogonal, gain {gain:.3g} ({act or 'no activation'})" if scheme == "orthogonal" else _formula(init, kernel)
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(keras.ops.full(tuple(layer.bias.shape), bias, dtype=layer.bias.dtype))
            layer.bias_initializer = keras.initializers.Constant(bias)
            how += f", bias {bias:g}"
        report.changed.append(f"{layer.name} ({type(layer).__name__} {tuple(kernel.shape)}): {how}")
    if wanted is not None and wanted - found:
        names = [layer.name for layer in all_layers(model)][:4]
        raise GradwatchError(f"no layer named {sorted(wanted - found)[0]!r} in {model.name}; its layers are named "
                             f"like {names}.")
    if not report.changed:
        raise GradwatchError(f"reinit found no Dense or Conv layer to initialise in {model.name}.")
    return report


# ----------------------------------------------------------------------------- swap_activations


def _activation_layer(canon: str, kwargs: dict[str, Any], name: str, dtype: Any) -> Any:
    if canon in _LAYER_CLASSES and (kwargs or canon == "PReLU"):
        cls = getattr(keras.layers, _LAYER_CLASSES[canon])
        try:
            return cls(**kwargs, name=name, dtype=dtype)
        except (TypeError, ValueError) as e:
            raise GradwatchError(f"cannot make keras.layers.{cls.__name__}(**{kwargs}): {e}.") from None
    if kwargs:
        raise GradwatchError(f"{canon} takes no options in Keras; got {kwargs}.")
    return keras.layers.Activation(_FUNCTIONS[canon], name=name, dtype=dtype)


def swap_activations(model: Any, old: Any = "sigmoid", new: Any = "relu", *, keep_output: bool = True,
                     skip: Iterable[str] = (), optimizer: Any = None, **kwargs: Any) -> SurgeryReport:
    """Replace the activation ``old`` with ``new`` (``kwargs`` are the new activation layer's, e.g.
    ``negative_slope=0.01``) in every layer that applies it; the output's is kept unless
    ``keep_output=False``; layers named in ``skip`` are kept too."""
    _check_model(model)
    old_c, new_c = canonical(old, "old"), canonical(new, "new")
    if new_c not in _FUNCTIONS and new_c not in _LAYER_CLASSES:
        raise GradwatchError(f"{new_c} is not an activation Keras can apply.")
    _activation_layer(new_c, kwargs, "gradwatch_check", None)  # bad options: one sentence, before any change
    skip = set(skip)
    outputs, how = output_layers(model) if keep_output else (set(), "")
    report = SurgeryReport(f"swap_activations({old_c} -> {new_c})")
    taken = {layer.name for layer in all_layers(model)}
    graph = placeable(model)
    plan: dict[int, list[Any]] = {}
    edits: list[tuple[Any, Any]] = []  # (layer, its new activation function): made once nothing refused
    in_place = new_c in _FUNCTIONS and not kwargs and new_c != "PReLU"
    for layer in all_layers(model):
        if own_activation(layer) != old_c or isinstance(layer, keras.Model):
            continue
        kind = type(layer).__name__
        if layer.name in skip:
            report.skipped.append(f"{layer.name} ({kind}): kept, as asked")
            continue
        if id(layer) in outputs:
            report.skipped.append(f"{layer.name} ({kind}): the output activation ({how}), kept (keep_output=False "
                                  "swaps it too)")
            continue
        if in_place and hasattr(layer, "activation") and not _is_layer_class(layer):
            edits.append((layer, keras.activations.get(_FUNCTIONS[new_c])))
            report.changed.append(f"{layer.name} ({kind}): {old_c} -> {new_c}")
            continue
        if id(layer) not in graph:
            report.skipped.append(f"{layer.name} ({kind}): not swapped, {wired_by(model, layer)}; "
                                  f"a {new_c} with these options needs a layer of its own there")
            continue
        act = _activation_layer(new_c, kwargs, _unique(model, f"{layer.name}_{new_c.lower()}", taken), layer.dtype_policy)
        if _is_layer_class(layer) or kind == "Activation":
            plan[id(layer)] = [act]
            report.changed.append(f"{layer.name} ({kind}) -> {act.name} ({_describe(act)})")
        else:
            edits.append((layer, keras.activations.get("linear")))
            plan[id(layer)] = [layer, act]
            report.changed.append(f"{layer.name} ({kind}): {old_c} -> linear, then {act.name} ({_describe(act)})")
    if not report.changed:
        if report.skipped:
            raise GradwatchError("swap_activations changed nothing: " + "; ".join(report.skipped) + ".")
        raise GradwatchError(f"{model.name} has no layer whose activation is {old_c}.")
    for layer, fn in edits:
        layer.activation = fn
    _apply(model, plan, report, optimizer)
    return report


def _is_layer_class(layer: Any) -> bool:
    return type(layer).__name__ in _ACTIVATION_LAYERS


def _describe(layer: Any) -> str:
    if type(layer).__name__ == "Activation":
        return f"Activation('{keras.activations.serialize(layer.activation)}')"
    options = {k: v for k, v in layer.get_config().items() if k in ("negative_slope", "alpha", "max_value", "axis")}
    return f"{type(layer).__name__}({', '.join(f'{k}={v}' for k, v in options.items())})"


def _apply(model: Any, plan: dict[int, list[Any]], report: SurgeryReport, optimizer: Any) -> None:
    before = {id(v) for v in model.variables}
    if plan:
        rewrite(model, plan)
    report.new_parameters += [v for v in model.variables if id(v) not in before]
    report.changed += resync(model, optimizer)


# ---------------------------------------------------------------------------------- insert_norm


def _norm_layer(layer: Any, kind: str, name: str) -> Any:
    axis = 1 if getattr(layer, "data_format", "channels_last") == "channels_first" else -1
    if kind == "batch":
        return keras.layers.BatchNormalization(axis=axis, name=name, dtype=layer.dtype_policy)
    if hasattr(layer, "filters"):  # over channels and positions, as torch's GroupNorm(1)
        return keras.layers.GroupNormalization(groups=1, axis=axis, name=name, dtype=layer.dtype_policy)
    return keras.layers.LayerNormalization(axis=axis, name=name, dtype=layer.dtype_policy)


def _followed_by_norm(model: Any, layer: Any) -> bool:
    for container in containers(model):
        seq = list(container.layers)
        for a, b in zip(seq, seq[1:]):
            if a is layer and "Normalization" in type(b).__name__:
                return True
    return False


def insert_norm(model: Any, kind: str = "batch", *, include_output: bool = False, optimizer: Any = None) -> SurgeryReport:
    """Put ``BatchNormalization`` (``kind="batch"``) or ``LayerNormalization`` (``"layer"``; for Conv a
    ``GroupNormalization(groups=1)``) after every hidden ``Dense``/``Conv``, before its activation.
    The output layer is left alone unless ``include_output``; so is a layer already followed by a
    norm. The model keeps its weights and trains on; ``.keras`` saving works as for any model."""
    _check_model(model)
    if kind not in ("batch", "layer"):
        raise GradwatchError(f"kind must be 'batch' or 'layer'; got {kind!r}.")
    outputs, how = output_layers(model)
    report = SurgeryReport(f"insert_norm({kind})")
    taken = {layer.name for layer in all_layers(model)}
    graph = placeable(model)
    plan: dict[int, list[Any]] = {}
    for layer in all_layers(model):
        if not _is_weight_layer(layer):
            continue
        if id(layer) in outputs and not include_output:
            report.skipped.append(f"{layer.name}: the output layer ({how}), left as it is")
            continue
        if id(layer) not in graph:
            report.skipped.append(f"{layer.name}: left as it is, {wired_by(model, layer)}; add the norm there")
            continue
        if _followed_by_norm(model, layer):
            report.skipped.append(f"{layer.name}: already followed by a norm")
            continue
        norm = _norm_layer(layer, kind, _unique(model, f"{layer.name}_norm", taken))
        fn = getattr(layer, "activation", None)
        act = own_activation(layer) or getattr(fn, "__name__", None)
        if fn is not None and act not in (None, "linear"):
            after = keras.layers.Activation(layer.activation, name=_unique(model, f"{layer.name}_act", taken),
                                            dtype=layer.dtype_policy)
            plan[id(layer)] = [layer, norm, after]
            report.changed.append(f"{layer.name}: {type(layer).__name__}({act}) -> {type(layer).__name__}, "
                                  f"{type(norm).__name__}, Activation({act})")
        else:
            plan[id(layer)] = [layer, norm]
            report.changed.append(f"{layer.name}: {type(layer).__name__} -> {type(layer).__name__}, {type(norm).__name__}")
    if not plan:
        raise GradwatchError("insert_norm changed nothing: " + ("; ".join(report.skipped) or
                                                                 f"{model.name} has no Dense or Conv layer") + ".")
    for chain in plan.values():
        if len(chain) == 3:
            chain[0].activation = keras.activations.get("linear")
    _apply(model, plan, report, optimizer)
    return report
