"""The layer table of a JAX parameter tree (for :mod:`gradwatch.optax`): names from pytree key paths,
layer types from Flax's names or NNX's modules, the activations the user names, in model order."""

from __future__ import annotations

import collections.abc
import math
import re
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .errors import GradwatchError
from .optax_guards import path_name
from .store import LayerInfo

#: Activation names (lowercase, as jax.nn and flax name them) -> the layer table's names.
_ACTIVATIONS = {"relu": "ReLU", "sigmoid": "Sigmoid", "tanh": "Tanh", "elu": "ELU", "selu": "SELU", "gelu": "GELU",
                "silu": "SiLU", "swish": "SiLU", "leaky_relu": "LeakyReLU", "softplus": "Softplus", "soft_sign": "Softsign",
                "softsign": "Softsign", "hard_sigmoid": "Hardsigmoid", "hard_tanh": "Hardtanh", "mish": "Mish",
                "softmax": "Softmax", "relu6": "ReLU6", "log_softmax": "LogSoftmax", "log_sigmoid": "LogSigmoid",
                "celu": "CELU", "glu": "GLU", "linear": None, "identity": None}
#: A Linen auto-name: ``Dense_0`` -> ``Dense``.
_LINEN_NAME = re.compile(r"^([A-Z][A-Za-z0-9]*)_\d+$")




def _activation_name(value: Any) -> str | None:
    raw = value if isinstance(value, str) else getattr(value, "__name__", None)
    if raw is None:
        raise GradwatchError(f"activations takes names like 'sigmoid', 'tanh' or 'relu' (or jax.nn functions); got {value!r}.")
    key = raw.lower()
    if key in _ACTIVATIONS:
        return _ACTIVATIONS[key]
    if raw in _ACTIVATIONS.values():
        return raw
    known = ", ".join(sorted(k for k, v in _ACTIVATIONS.items() if v))
    raise GradwatchError(f"activations: {raw!r} is not an activation gradwatch knows; known: {known}.")


def check_activations(given: Any) -> dict[str, str | None]:
    if given is None:
        return {}
    if not isinstance(given, collections.abc.Mapping) or not all(isinstance(k, str) for k in given):
        raise GradwatchError("activations takes a mapping of layer-name prefix to activation, "
                             "e.g. {'params/Dense_0': 'sigmoid'} ('*' for every layer).")
    return {k.strip("/"): _activation_name(v) for k, v in given.items()}


def _activation_for(name: str, table: dict[str, str | None]) -> str | None:
    """The activation of the longest prefix (whole path components) of ``name`` in ``table``; a
    Linen ``params/`` root may be left out of the prefix."""
    best, best_len = table.get("*"), -1
    for candidate in (name, name[len("params/"):] if name.startswith("params/") else None):
        if candidate is None:
            continue
        for prefix, act in table.items():
            if (candidate == prefix or candidate.startswith(prefix + "/")) and len(prefix) > best_len:
                best, best_len = act, len(prefix)
    return best


def _nnx_owners(variables: list[Any], model: Any) -> tuple[dict[int, str], dict[int, int]]:
    """NNX: Variable id -> the type name of the module that holds it, and -> its rank in the order
    the model defined its attributes (its creation order), from ``model`` or the live modules."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None or not variables:
        return {}, {}
    wanted = {id(v) for v in variables}
    if model is not None:
        roots = [model]
    else:
        from .objects import live_instances

        modules = live_instances(nnx.Module)
        children = {id(c) for m in modules for c in vars(m).values() if isinstance(c, nnx.Module)}
        roots = [m for m in modules if id(m) not in children]
    owner: dict[int, str] = {}
    best: dict[int, int] = {}
    for root in roots:
        rank: dict[int, int] = {}
        seen: set[int] = set()

        def walk(node: Any, holder: Any) -> None:
            if id(node) in seen:
                return
            seen.add(id(node))
            if isinstance(node, nnx.Variable):
                if id(node) in wanted:
                    rank.setdefault(id(node), len(rank))
                    owner.setdefault(id(node), type(holder).__name__)
                return
            if isinstance(node, nnx.Module):
                for value in vars(node).values():
                    walk(value, node)
            elif isinstance(node, (list, tuple)):
                for value in node:
                    walk(value, holder)
            elif isinstance(node, dict):
                for value in node.values():
                    walk(value, holder)

        walk(root, root)
        if len(rank) > len(best):
            best = rank
    return owner, best


def _natural(key: Any) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(key))]


def _container_order(tree: Any) -> dict[str, int]:
    """Names of the leaves of ``tree`` (and of the nodes below mappings and sequences) in the
    containers' own order: a dict's insertion order (where ``jax.tree`` sorts the keys), or, for a
    dict whose keys are already sorted, their natural order (``Dense_2`` before ``Dense_10``)."""
    order: dict[str, int] = {}

    def walk(node: Any, name: str) -> None:
        if isinstance(node, collections.abc.Mapping):
            keys = list(node.keys())
            if keys == sorted(keys, key=str):  # sorted, as jax rebuilds dicts: Dense_2 before Dense_10
                keys.sort(key=_natural)
            for k in keys:
                walk(node[k], f"{name}/{k}" if name else str(k))
        elif isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
            for i, v in enumerate(node):
                walk(v, f"{name}/{i}" if name else str(i))
        else:
            order.setdefault(name, len(order))

    try:
        walk(tree, "")
    except Exception:  # an unusual container: the pytree order stands
        return {}
    return order


def _module_type(name: str) -> str:
    parts = name.split("/")[:-1]
    for part in reversed(parts):
        m = _LINEN_NAME.match(part)
        if m:
            return m.group(1)
    return "?"


class Table(NamedTuple):
    layers: list[LayerInfo]
    order: list[int]  # leaf index of each layer, in layer-table order
    leaves: int  # arrays in the parameter tree
    signature: tuple[Any, ...]


def layer_table(params: Any, activations: dict[str, str | None], model: Any) -> Table:
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None)[0]
    entries = []
    for i, (path, leaf) in enumerate(flat):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
            entries.append((i, path_name(path), tuple(int(d) for d in leaf.shape), str(dtype)))
    if not entries:
        raise GradwatchError("the parameters given to tx.init hold no floating-point arrays; there is nothing to watch.")
    nnx = sys.modules.get("flax.nnx")
    variables = []
    if nnx is not None:
        variables = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable) or x is None)
        if len(variables) != len(flat) or not all(isinstance(v, nnx.Variable) for v in variables):
            variables = []
    owners, ranks = _nnx_owners(variables, model) if variables else ({}, {})
    if variables and not all(id(variables[e[0]]) in ranks for e in entries):
        ranks = {}  # the model holds only some of them: the containers' order for all
    in_order = _container_order(params)

    def rank(entry: tuple[int, str, tuple[int, ...], str]) -> tuple[float, int]:
        i, name = entry[0], entry[1]
        if ranks:
            return ranks[id(variables[i])], i
        while name:
            if name in in_order:
                return in_order[name], i
            name = name.rpartition("/")[0]
        return math.inf, i

    entries.sort(key=rank)
    layers = []
    for i, name, shape, dtype in entries:
        kind = owners.get(id(variables[i])) if variables else None
        layers.append(LayerInfo(name=name, shape=shape, numel=math.prod(shape), module_type=kind or _module_type(name),
                                activation=_activation_for(name, activations), dtype=dtype))
    signature = (len(flat), tuple((li.name, li.shape) for li in layers))
    return Table(layers, [e[0] for e in entries], len(flat), signature)
