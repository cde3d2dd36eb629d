"""Keras 3 on every backend: ``model.fit(..., callbacks=[gradwatch.keras.GradWatch(out="runs/k")])``.

Callbacks never see gradients, so gradwatch goes through the model's optimizer, whose ``apply``
every backend's training step calls:

* **torch** (:mod:`gradwatch.keras_torch`): a Keras model is a ``torch.nn.Module``; the optimizer's
  ``apply`` is wrapped and the PyTorch probe reads the gradients, as for any torch model.
* **tensorflow, jax** (:mod:`gradwatch.keras_compiled`): ``apply`` runs traced inside the compiled
  step, so the statistics are ops of that step, written into a ring held in optimizer variables and
  read once per flush from this callback.

Either way the layers are named by the Keras variable paths (``sequential/dense/kernel``), typed by
their Keras layer, with the activation applied to their output; Keras' ``clipnorm``,
``global_clipnorm`` and ``clipvalue`` are recorded. This module holds what every backend shares: the
layer table, the loss's name, finding the model that owns an optimizer, and the callback.
"""

from __future__ import annotations

import math
import os
from typing import Any

from .errors import GradwatchError
from .session import default_out
from .store import LayerInfo

try:
    import keras
except ImportError:  # pragma: no cover - exercised only without the extra
    raise GradwatchError("gradwatch.keras needs Keras 3; install it with `pip install gradwatch[keras]` "
                         "(or gradwatch[tensorflow], gradwatch[jax]).") from None

_ACTIVATIONS = {"relu": "ReLU", "sigmoid": "Sigmoid", "tanh": "Tanh", "elu": "ELU", "selu": "SELU", "gelu": "GELU",
                "silu": "SiLU", "swish": "SiLU", "leaky_relu": "LeakyReLU", "softplus": "Softplus", "softsign": "Softsign",
                "hard_sigmoid": "Hardsigmoid", "mish": "Mish", "softmax": "Softmax", "relu6": "ReLU6",
                "hard_tanh": "Hardtanh", "log_softmax": "LogSoftmax"}
#: Keras layers that are an activation (besides ``Activation``, which names its function).
_ACTIVATION_LAYERS = {"ReLU": "ReLU", "LeakyReLU": "LeakyReLU", "PReLU": "PReLU", "ELU": "ELU", "Softmax": "Softmax"}
#: Keras layers that may stand between a layer and its activation without changing which one it is.
_TRANSPARENT_LAYERS = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
                       "GaussianDropout", "AlphaDropout", "BatchNormalization", "LayerNormalization",
                       "GroupNormalization", "ActivityRegularization", "Identity")


def own_activation(layer: Any) -> str | None:
    """The activation a layer applies itself (``Dense(activation="tanh")``, ``Activation("relu")``,
    ``ReLU()``), as a layer-table name; None for linear or none."""
    kind = _ACTIVATION_LAYERS.get(type(layer).__name__)
    if kind is not None:
        return kind
    fn = getattr(layer, "activation", None)
    return _ACTIVATIONS.get(getattr(fn, "__name__", "") or "")


def _is_activation_layer(layer: Any) -> bool:
    return type(layer).__name__ in _ACTIVATION_LAYERS or type(layer).__name__ == "Activation"


def _consumers(model: Any, layers: list[Any]) -> dict[int, list[Any]]:
    """Layer -> the layers its output feeds, from the functional graph (Sequential models build one
    too); where no graph exists, a Sequential's list order."""
    out: dict[int, list[Any]] = {}
    for layer in layers:
        for node in getattr(layer, "_inbound_nodes", []) or []:
            for parent in getattr(node, "parent_nodes", []) or []:
                op = getattr(parent, "operation", None)
                if op is not None and op is not layer:
                    users = out.setdefault(id(op), [])
                    if not any(u is layer for u in users):  # Sequential.add() rebuilds leave stale nodes
                        users.append(layer)
    if not out and hasattr(model, "layers"):
        seq = list(model.layers)
        for a, b in zip(seq, seq[1:]):
            out.setdefault(id(a), []).append(b)
    return out


def _following_activation(layer: Any, consumers: dict[int, list[Any]]) -> str | None:
    """The activation applied to a linear layer's output by the layers after it (``Dense`` then
    ``Activation("tanh")``), through dropout and normalisation layers; None when it is not one."""
    seen = 0
    current = layer
    while seen < 8:
        nxt = consumers.get(id(current), [])
        if len(nxt) != 1:
            return None
        current, seen = nxt[0], seen + 1
        if _is_activation_layer(current):
            return own_activation(current)
        if type(current).__name__ not in _TRANSPARENT_LAYERS:
            return None
    return None


def loss_name(model: Any) -> str | None:
    """The compiled loss, as a string the diagnosis reads (``binary_crossentropy``,
    ``BinaryCrossentropy(from_logits=True)``); None when it cannot be told."""
    loss = getattr(model, "loss", None)
    if loss is None:
        return None
    if isinstance(loss, str):
        return loss
    if isinstance(loss, (list, tuple, dict)):
        return None  # several outputs: not one output/loss pair to judge
    config = getattr(loss, "get_config", None)
    name = type(loss).__name__ if not callable(loss) or hasattr(loss, "get_config") else getattr(loss, "__name__", None)
    if name in (None, "function", "LossFunctionWrapper"):
        fn = getattr(loss, "fn", None)
        name = getattr(fn, "__name__", None) or getattr(loss, "name", None)
    try:
        logits = bool(config().get("from_logits")) if config is not None else False
    except Exception:
        logits = False
    return f"{name}(from_logits=True)" if logits and name else name


def all_layers(model: Any) -> list[Any]:
    return list(getattr(model, "_flatten_layers", lambda **k: model.layers)(include_self=False, recursive=True))


def _owners(model: Any) -> dict[int, Any]:
    owner: dict[int, Any] = {}
    for layer in all_layers(model):
        for v in getattr(layer, "_trainable_variables", []) + getattr(layer, "_non_trainable_variables", []):
            owner.setdefault(id(v), layer)
    return owner


def effective_activations(model: Any) -> dict[int, str | None]:
    """Layer -> the activation applied to its output: its own, or that of the activation layer
    that follows it (``Dense(8)`` then ``Activation("tanh")``)."""
    layers = all_layers(model)
    consumers = _consumers(model, layers)
    out: dict[int, str | None] = {}
    for layer in layers:
        own = None if _is_activation_layer(layer) else own_activation(layer)
        out[id(layer)] = own if own is not None else _following_activation(layer, consumers)
    return out


def layer_infos(model: Any, variables: list[Any]) -> list[LayerInfo]:
    """Layers named by Keras variable path, typed by their Keras layer, with the activation applied
    to its output (its own, or a separate ``Activation`` layer's). Any backend."""
    owner = _owners(model)
    acts = effective_activations(model)
    layers = []
    for v in variables:
        layer = owner.get(id(v))
        shape = tuple(int(d) for d in v.shape)
        layers.append(LayerInfo(
            name=v.path, shape=shape, numel=math.prod(shape),
            module_type=type(layer).__name__ if layer is not None else "?",
            activation=acts.get(id(layer)) if layer is not None else None,
            dtype=str(getattr(v, "dtype", "float32")).replace("torch.", ""), trainable=bool(v.trainable),
        ))
    return layers


def tap_layers(model: Any, variables: list[Any]) -> list[tuple[Any, int, str | None, str]]:
    """The Keras layers whose outputs the activation statistics read, on every backend: each layer
    with a watched kernel and units or filters (Dense, Conv), as (layer, index of its kernel in
    ``variables``, the activation on its output, ``"post"`` when the layer applies it itself — its
    output is read in the activation's output space — else ``"pre"``)."""
    index = {id(v): i for i, v in enumerate(variables)}
    acts = effective_activations(model)
    out = []
    for layer in all_layers(model):
        kernel = getattr(layer, "kernel", None)
        if kernel is None or id(kernel) not in index or not (hasattr(layer, "units") or hasattr(layer, "filters")):
            continue
        out.append((layer, index[id(kernel)], acts.get(id(layer)), "post" if own_activation(layer) else "pre"))
    return out


def find_keras_model(variables: list[Any], optimizer: Any = None) -> Any:
    """The live Keras model that owns most of ``variables`` (on a tie: the one compiled with
    ``optimizer`` — not the functional graph a Sequential keeps inside —, then the fewest others)."""
    from .objects import live_instances

    wanted = {id(v) for v in variables}
    best, best_key = None, (0, 0, 0)
    models = live_instances(keras.Model)
    for m in models:
        ids = {id(v) for v in m.trainable_variables}
        compiled = optimizer is not None and getattr(m, "optimizer", None) is optimizer
        key = (len(wanted & ids), int(compiled), -len(ids))
        if key[0] and key > best_key:
            best, best_key = m, key
    if best is None:
        raise GradwatchError("no Keras model owns this optimizer's variables.")
    return best


def watch(model: Any, optimizer: Any = None, out: str | os.PathLike[str] | None = None, **options: Any) -> Any:
    """Record a custom training loop's Keras optimizer (``with tf.GradientTape() as tape: ...`` then
    ``optimizer.apply_gradients(...)``), eager or inside ``tf.function``::

        with gradwatch.keras.watch(model, optimizer, out="runs/loop") as w:
            for x, y in data:
                train_step(x, y)
        print(w.findings)

    On TensorFlow the loop's steps and losses are seen without any call (each ``apply``, each call
    of a ``tf.function`` that applies, the scalar given to ``tape.gradient``); on JAX, whose loops
    call ``stateless_apply`` in their own jit, call ``w.step()`` after each step. ``options`` are
    :class:`GradWatch`'s. Returns an object with ``close()``, ``findings``, ``out`` and ``run``, also
    a context manager.
    """
    optimizer = optimizer if optimizer is not None else getattr(model, "optimizer", None)
    if optimizer is None:
        raise GradwatchError("gradwatch.keras.watch needs the optimizer the loop applies gradients with: "
                             "watch(model, optimizer).")
    out = out if out is not None else default_out("keras")
    backend = keras.backend.backend()
    if backend == "torch":
        from .keras_torch import LoopWatch
    elif backend in ("tensorflow", "jax"):
        from .keras_sessions import LoopWatch  # type: ignore[assignment]
    else:
        raise GradwatchError(f"gradwatch records Keras on torch, tensorflow or jax; this Keras runs on {backend!r}.")
    return LoopWatch(model, optimizer, out, options)


class GradWatch(keras.callbacks.Callback):
    """Record (and diagnose, report) ``model.fit`` with gradwatch, on any Keras backend.

    Args:
        out: run directory (default ``gradwatch-runs/keras-TIME``).
        **watch_options: ``flush_every``, ``sample_every``, ``report``, ``quiet``, ``tensorboard``, ``log_to``,
            ``overwrite``, ``diagnose_online``, ``summary`` (as :class:`gradwatch.Watch`); ``guards``
            on the torch backend only (elsewhere use Keras' ``clipnorm``/``clipvalue``).
    """

    def __init__(self, out: str | os.PathLike[str] | None = None, **watch_options: Any):
        super().__init__()
        self.out = out
        self.watch_options = watch_options
        #: The run being recorded (a :class:`gradwatch.Watch` on torch, an ArraySession elsewhere).
        self.watch: Any = None
        self._attachment: Any = None
        self._fits = 0
        self._per_call = 1
        self.findings: list[Any] = []

    def on_train_begin(self, logs: Any = None) -> None:
        model = self.model
        if model.optimizer is None:
            raise GradwatchError("the Keras model has no optimizer; compile it before fit().")
        if self._attachment is not None:  # the previous fit() with this callback raised
            self._attachment.abandon()
            self._attachment = None
        self._fits += 1
        out = self.out if self.out is not None else default_out("keras")
        if self.out is not None and self._fits > 1:  # fit() again with the same callback: a new run beside it
            out = f"{self.out}-{self._fits}"
        options = {"summary": not self.watch_options.get("quiet", False), **self.watch_options}
        if keras.backend.backend() == "torch":
            from .keras_torch import start
        elif keras.backend.backend() in ("tensorflow", "jax"):
            from .keras_sessions import start
        else:
            raise GradwatchError(f"gradwatch records Keras on torch, tensorflow or jax; this Keras runs on "
                                 f"{keras.backend.backend()!r}.")
        self.watch, self._attachment = start(model, out, options)
        # With steps_per_execution=N, fit() calls the batch callbacks once per N steps.
        self._per_call = max(1, int(getattr(model, "steps_per_execution", 1) or 1))

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        # At a batch's start, not its end: Keras runs batch-end callbacks in a background thread
        # unless one implements them, and gradwatch must not take that away. The step about to run
        # is counted; the device's own counter says which steps a flush stores.
        if self._attachment is not None:
            self._attachment.host_step(self._per_call)

    def on_train_end(self, logs: Any = None) -> None:
        if self._attachment is not None:
            self._attachment.detach()
            self._attachment = None
        if self.watch is not None:
            w, self.watch = self.watch, None
            w.close(status="finished")
            self.findings = w.findings
