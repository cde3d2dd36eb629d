"""Changing a live Keras model's layer graph in place, with its weights, and telling its optimizer.

A *plan* maps a layer to the chain of layers that takes its place where it sits: ``[dense, norm,
act]`` puts two layers after ``dense``, ``[leaky]`` replaces a ``ReLU`` layer. The model object
stays the one the script holds, its layers keep their variables, and the new layers are built on
the shapes they receive:

* a ``Sequential`` gets the new layer list through its own ``pop``/``add``;
* a functional model is traced again from its own inputs through the same layer objects, and takes
  the new graph (nodes, operations, outputs) of a functional model built on that trace;
* a subclassed model's ``call`` wires its layers itself: a plan for it is refused.

Afterwards an optimizer that was already built learns the new variable list (its per-variable state
is kept for the variables it had; new ones start from zero), and a compiled model's cached train,
test and predict functions are dropped so that the next ``fit`` traces the new graph. These are
Keras 3 internals (checked with Keras 3.15); where they differ, one sentence says so.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from ..errors import GradwatchError

#: The attributes Functional's constructor derives from the graph (Keras 3's ops.function.Function).
_GRAPH_ATTRS = ("_inputs_struct", "_outputs_struct", "_inputs", "_outputs", "_nodes", "_nodes_by_depth",
                "_operations", "_operations_by_depth", "output_names")


def model_kind(model: Any) -> str:
    """``"sequential"``, ``"functional"`` (a graph of layers) or ``"subclassed"`` (its own ``call``)."""
    from keras.src.models.functional import Functional

    if isinstance(model, keras.Sequential):
        return "sequential"
    if isinstance(model, Functional):
        return "functional"
    return "subclassed"


def containers(model: Any) -> list[Any]:
    """The model and every model nested in it (a Sequential used as a layer of a functional model)."""
    out, todo = [], [model]
    while todo:
        m = todo.pop(0)
        if any(m is o for o in out):
            continue
        out.append(m)
        todo += [layer for layer in m.layers if isinstance(layer, keras.Model)]
    return out


def placeable(model: Any) -> dict[int, Any]:
    """Layer id -> the Sequential or functional model whose graph holds it: the layers a plan can
    act on (not those inside a subclassed model or a custom layer, whose ``call`` wires them)."""
    return {id(layer): c for c in containers(model) if model_kind(c) != "subclassed" for layer in c.layers}


def wired_by(model: Any, layer: Any) -> str:
    """Why ``layer`` cannot be moved in the graph: the subclassed model or custom layer that calls it."""
    for c in [model, *[x for x in _all(model) if x is not layer]]:
        if any(sub is layer for sub in getattr(c, "_layers", [])):
            what = "subclassed model" if isinstance(c, keras.Model) else "custom layer"
            return f"{c.name} ({type(c).__name__}, a {what}) calls it in its call()"
    return "no Sequential or functional graph holds it"


def _all(model: Any) -> list[Any]:
    return list(model._flatten_layers(include_self=False, recursive=True))


def rewrite(model: Any, plan: dict[int, list[Any]]) -> None:
    """Replace each layer whose ``id`` is in ``plan`` by its chain, in ``model`` and its nested models."""
    for container in containers(model):
        own = {id(layer) for layer in container.layers}
        sub = {k: v for k, v in plan.items() if k in own}
        if not sub:
            continue
        kind = model_kind(container)
        if kind == "subclassed":
            raise GradwatchError(f"{container.name} is a subclassed model: its call() wires its layers, so layers cannot "
                                 "be added or replaced from outside; change them in its __init__ and call().")
        try:
            (_rewrite_sequential if kind == "sequential" else _rewrite_functional)(container, sub)
        except GradwatchError:
            raise
        except Exception as e:  # Keras internals this module relies on have moved
            raise GradwatchError(f"could not rebuild {container.name}'s graph ({type(e).__name__}: {e}); this Keras "
                                 f"version ({keras.__version__}) differs from the 3.x gradwatch knows.") from e


def _rewrite_sequential(model: Any, plan: dict[int, list[Any]]) -> None:
    layers = [new for layer in model.layers for new in plan.get(id(layer), [layer])]
    while model.layers:
        model.pop(rebuild=False)
    for i, layer in enumerate(layers):
        model.add(layer, rebuild=i == len(layers) - 1)


def _rewrite_functional(model: Any, plan: dict[int, list[Any]]) -> None:
    def operation_fn(op: Any) -> Any:
        chain = plan.get(id(op))
        if chain is None:
            return op

        def call(*args: Any, **kwargs: Any) -> Any:
            x = op(*args, **kwargs) if chain[0] is op else chain[0](args[0])
            for layer in chain[1:]:
                x = layer(x)
            return x

        return call

    outputs = model._run_through_graph(model.inputs, operation_fn=operation_fn)
    graph = keras.Model(model._inputs_struct, outputs)
    old = {id(layer) for layer in model.layers}
    for attr in _GRAPH_ATTRS:
        object.__setattr__(model, attr, getattr(graph, attr))
    now = {id(layer) for layer in model.layers}
    for layer in model.layers:
        if id(layer) not in old:
            model._tracker.track(layer)
    # The graph's order, as a model built from its config has it: an optimizer's state is saved in
    # the order of the model's variables, and loading a .keras file expects that order.
    graph_layers = list(model.layers)
    rest = [layer for layer in model._layers if id(layer) not in now and id(layer) not in old]
    model._layers[:] = graph_layers + rest  # layers replaced by the plan are no longer the model's


# ------------------------------------------------------------------------------------ optimizer


def _slot_lists(opt: Any, count: int) -> dict[str, list[Any]]:
    """The optimizer's per-variable state: its lists of variables aligned with the trained ones
    (``momentums``, ``_velocities``, ...)."""
    out = {}
    for name, value in vars(opt).items():
        if name in ("_trainable_variables", "_variables") or not isinstance(value, (list, tuple)):
            continue
        if len(value) == count and count and all(isinstance(v, keras.Variable) for v in value):
            out[name] = list(value)
    return out


def resync(model: Any, optimizer: Any = None) -> list[str]:
    """After a surgery: the built optimizer learns the model's new variable list, keeping the state
    of the variables it had; the compiled model's traced functions are dropped. Returns what it did."""
    said = []
    opt = optimizer if optimizer is not None else getattr(model, "optimizer", None)
    if opt is not None and getattr(opt, "built", False):
        old = list(opt._trainable_variables)
        new = list(model.trainable_variables)
        if [id(v) for v in old] != [id(v) for v in new]:
            slots = _slot_lists(opt, len(old))
            saved = {name: {id(v): np.asarray(keras.ops.convert_to_numpy(s)) for v, s in zip(old, lst)}
                     for name, lst in slots.items()}
            drop = {id(s) for lst in slots.values() for s in lst}
            opt._variables[:] = [v for v in opt._variables if id(v) not in drop]
            opt._trainable_variables_indices.clear()
            opt.built = False
            opt.build(new)
            for name, values in saved.items():
                for v, s in zip(new, _slot_lists(opt, len(new)).get(name, [])):
                    if id(v) in values:
                        s.assign(values[id(v)])
            said.append(f"(optimizer) {type(opt).__name__} rebuilt for {len(new)} variables (was {len(old)}); "
                        f"its state kept for the {len(set(map(id, old)) & set(map(id, new)))} it had")
    for attr in ("train_function", "test_function", "predict_function"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    return said
