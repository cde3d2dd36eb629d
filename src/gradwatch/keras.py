"""Keras 3 (torch backend): ``model.fit(..., callbacks=[gradwatch.keras.GradWatch(out="runs/k")])``.

Callbacks never see gradients, so gradwatch intercepts the model's optimizer: its ``apply(grads,
variables)`` is wrapped for the duration of ``fit``. On the torch backend a Keras model is a
``torch.nn.Module`` and every variable's value is a ``torch.nn.Parameter`` whose ``.grad`` holds the
gradient Keras passes to ``apply``, so the PyTorch probe reads them as it reads any model's — same
statistics, run directory, findings and report. Layers are named by the Keras variable paths
(``sequential/dense/kernel``; Keras kernels are (in, out)).

Keras' own clipping options (``clipnorm`` per variable, ``global_clipnorm``, ``clipvalue``) are
stored with the run and applied by Keras inside ``apply``; gradwatch records the gradients before
them (``grad_norm``) and, when one is set, the global norm after them (``grad_norm_clipped``, by
calling the optimizer's own clipping on the same gradients).

Other backends (TensorFlow, JAX) keep gradients outside torch: this module refuses them in one
sentence. gradwatch's guards act on torch optimizers and are not available here.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .errors import GradwatchError
from .probe.torch import TapTarget, global_norm
from .store import LayerInfo
from .session import default_out
from .watch import Watch, claim, release

try:
    import keras
except ImportError:  # pragma: no cover - exercised only without the extra
    raise GradwatchError("gradwatch.keras needs Keras 3; install it with `pip install gradwatch[keras]`.") from None

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


def _activation_of(layer: Any) -> str | None:
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
            return _activation_of(current)
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


def _check_backend() -> None:
    backend = keras.backend.backend()
    if backend != "torch":
        raise GradwatchError(
            f"gradwatch reads Keras gradients on the torch backend; this Keras runs on {backend!r}. "
            "Set KERAS_BACKEND=torch before the first `import keras`."
        )


class KerasOptimizerView:
    """A Keras optimizer seen as a torch one by a watch stream: its variables' torch parameters as
    one param group, its learning rate (a device tensor: no host read), its config as defaults."""

    def __init__(self, optimizer: Any, variables: list[Any]):
        self.keras_optimizer = optimizer
        self.variables = variables
        try:
            config = optimizer.get_config()
        except Exception:
            # A custom LearningRateSchedule without get_config() makes the optimizer's config raise;
            # the record keeps what can be read directly.
            config = {k: getattr(optimizer, k, None) for k in ("name", "clipnorm", "global_clipnorm", "clipvalue")}
        self.defaults = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool)) or v is None}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        lr = getattr(self.keras_optimizer, "learning_rate", None)
        value = getattr(lr, "value", lr)
        return [{"params": [v.value for v in self.variables], "lr": value if isinstance(value, torch.Tensor) else None}]


def _view_class(optimizer: Any) -> type:
    return type(f"keras.{type(optimizer).__name__}", (KerasOptimizerView,), {})


def _all_layers(model: Any) -> list[Any]:
    return list(getattr(model, "_flatten_layers", lambda **k: model.layers)(include_self=False, recursive=True))


def _owners(model: Any) -> dict[int, Any]:
    owner: dict[int, Any] = {}
    for layer in _all_layers(model):
        for v in getattr(layer, "_trainable_variables", []) + getattr(layer, "_non_trainable_variables", []):
            owner.setdefault(id(v), layer)
    return owner


def _effective_activations(model: Any) -> dict[int, str | None]:
    """Layer -> the activation applied to its output: its own, or that of the activation layer
    that follows it (``Dense(8)`` then ``Activation("tanh")``)."""
    layers = _all_layers(model)
    consumers = _consumers(model, layers)
    out: dict[int, str | None] = {}
    for layer in layers:
        own = None if _is_activation_layer(layer) else _activation_of(layer)
        out[id(layer)] = own if own is not None else _following_activation(layer, consumers)
    return out


def layer_table(model: Any, variables: list[Any]) -> tuple[list[LayerInfo], list[torch.Tensor]]:
    """Layers named by Keras variable path, typed by their Keras layer, with the activation applied
    to its output (its own, or a separate ``Activation`` layer's)."""
    owner = _owners(model)
    acts = _effective_activations(model)
    layers, params = [], []
    for v in variables:
        layer = owner.get(id(v))
        p = v.value
        layers.append(LayerInfo(
            name=v.path, shape=tuple(p.shape), numel=p.numel(),
            module_type=type(layer).__name__ if layer is not None else "?",
            activation=acts.get(id(layer)) if layer is not None else None,
            dtype=str(p.dtype).replace("torch.", ""), trainable=v.trainable,
        ))
        params.append(p)
    return layers, params


def tap_targets(model: Any, variables: list[Any]) -> list[TapTarget]:
    """The Keras layers whose outputs the activation tap reads: every layer with a watched kernel
    and units or filters (Dense, Conv). Their output is after their own activation when they have
    one (read in the activation's output space), else the pre-activation of the layer after them."""
    index = {id(v): i for i, v in enumerate(variables)}
    acts = _effective_activations(model)
    targets = []
    for layer in _all_layers(model):
        kernel = getattr(layer, "kernel", None)
        if kernel is None or id(kernel) not in index or not isinstance(layer, torch.nn.Module):
            continue
        if not (hasattr(layer, "units") or hasattr(layer, "filters")):
            continue
        own = _activation_of(layer)
        axis = 1 if getattr(layer, "data_format", "channels_last") == "channels_first" else -1
        targets.append(TapTarget(layer, index[id(kernel)], acts.get(id(layer)), "post" if own else "pre", axis))
    return targets


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


class KerasAttachment:
    """Wraps one Keras optimizer's ``apply`` so that a watch sees every step it takes."""

    #: How ``gradwatch run`` names the owner of an optimizer it leaves to this attachment.
    owner_name = "gradwatch.keras.GradWatch"

    def __init__(self, watch: Watch, model: Any, optimizer: Any, variables: list[Any] | None = None, *, wrap: bool = True):
        _check_backend()
        if watch.guards:
            raise GradwatchError("gradwatch's guards act on torch optimizers; with Keras use its own clipnorm/clipvalue.")
        variables = list(variables if variables is not None else model.trainable_variables)
        if not variables:
            raise GradwatchError(f"the Keras model {model.name!r} has no trainable variables; there is nothing to watch.")
        # A LossScaleOptimizer unscales into new tensors and hands them to its inner optimizer:
        # watch that one, which sees the true gradients.
        optimizer = getattr(optimizer, "inner_optimizer", None) or optimizer
        stale = optimizer.__dict__.get("apply")
        if stale is not None and isinstance(getattr(stale, "__self__", None), KerasAttachment):
            stale.__self__.abandon()  # a fit() that raised left its wrapper (Keras callbacks see no exceptions)
        self.watch = watch
        self.optimizer = optimizer
        self.view = _view_class(optimizer)(optimizer, variables)
        module = model if isinstance(model, torch.nn.Module) else None
        self.att = watch.add_optimizer(self.view, module, hooks=False, layer_table=layer_table(model, variables),
                                       tap_targets=tap_targets(model, variables) if module is not None else None,
                                       loss=loss_name(model))
        self._clip = any(getattr(optimizer, k, None) for k in ("clipnorm", "global_clipnorm", "clipvalue"))
        self._loss: torch.Tensor | None = None
        self._model: Any = None
        if wrap:
            self._original = optimizer.apply
            optimizer.apply = self._apply  # instance attribute: only this optimizer, undone by detach()
            claim(optimizer, self)  # `gradwatch run`'s Keras hooks leave it to this callback

    def before(self, grads: Any, variables: Any = None) -> None:
        """The optimizer is about to apply ``grads``. They are what is recorded: the probe reads
        ``.grad``, which a custom train_step (or a LossScaleOptimizer's unscaling) may not have
        filled with these tensors, so each variable's ``.grad`` shows ``grads`` while the probe reads."""
        grads = list(grads)
        variables = list(variables) if variables is not None else self.view.variables
        swapped = []
        for v, g in zip(variables, grads):
            p = getattr(v, "value", None)
            if isinstance(p, torch.Tensor) and isinstance(g, torch.Tensor) and p.grad is not g:
                if g.shape == p.shape and g.dtype == p.dtype and g.device == p.device:
                    swapped.append((p, p.grad))
                    p.grad = g
        if self._loss is not None:
            self.watch.stage_loss(self._loss)
            self._loss = None
        try:
            self.watch.on_before_optimizer_step(self.view)
            if self._clip and self.watch.watches(self.view):
                self._record_clipping(grads)
        finally:
            for p, old in swapped:
                p.grad = old

    def capture_loss(self, model: Any) -> None:
        """Take each training step's loss from the model's own loss computation (logs only carry the
        epoch's running mean); undone by detach()."""
        original = getattr(model, "_compute_loss", None)
        if original is None:
            return
        attachment = self

        def compute_loss(*a: Any, **k: Any) -> Any:
            loss = original(*a, **k)
            if isinstance(loss, torch.Tensor) and loss.numel() == 1 and k.get("training", True):
                attachment._loss = loss.detach()
            return loss

        model._compute_loss = compute_loss
        self._model = model

    def after(self) -> None:
        self.watch.on_after_optimizer_step(self.view)

    def _apply(self, grads: Any, trainable_variables: Any = None) -> Any:
        if self.watch.closed:  # the watch is gone (its fit raised): step as if never wrapped
            self.detach()
            return self.optimizer.apply(grads, trainable_variables)
        grads = list(grads)
        self.before(grads, trainable_variables)
        try:
            return self._original(grads, trainable_variables)
        finally:
            self.after()

    @torch.no_grad()
    def _record_clipping(self, grads: list[Any]) -> None:
        """The norm after Keras' own clipping (its clipping function, on the same gradients)."""
        opt = self.optimizer
        clipped = [g for g in opt._clip_gradients(grads) if g is not None]
        after = global_norm(clipped, clipped[0].device) if clipped else None
        if after is None:
            return
        limit = opt.global_clipnorm or (opt.clipnorm if not opt.clipvalue else None)
        self.watch.record_clipping(self.view, float(limit) if limit else None, after=after)

    def detach(self) -> None:
        release(self.optimizer, self)
        if self.optimizer.__dict__.get("apply") == self._apply:
            del self.optimizer.apply
        if self._model is not None and "_compute_loss" in self._model.__dict__:
            del self._model._compute_loss
            self._model = None

    def abandon(self) -> None:
        """Undo a wrapper whose fit() raised, and close its run as crashed."""
        self.detach()
        if not self.watch.closed:
            self.watch.close(status="crashed")


class GradWatch(keras.callbacks.Callback):
    """Record (and diagnose, report) ``model.fit`` with gradwatch.

    Args:
        out: run directory (default ``gradwatch-runs/keras-TIME``).
        **watch_options: passed to :class:`gradwatch.Watch` (``flush_every``, ``sample_every``,
            ``report``, ``quiet``, ...).
    """

    def __init__(self, out: str | os.PathLike[str] | None = None, **watch_options: Any):
        super().__init__()
        self.out = out
        self.watch_options = watch_options
        self.watch: Watch | None = None
        self._attachment: KerasAttachment | None = None
        self._fits = 0
        self.findings: list[Any] = []

    def on_train_begin(self, logs: Any = None) -> None:
        _check_backend()
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
        self.watch = Watch(model if isinstance(model, torch.nn.Module) else None, out=out, attach_later=True, **options)
        self.watch.status_at_exit = "crashed"  # closed at exit without on_train_end: fit() raised
        try:
            self._attachment = KerasAttachment(self.watch, model, model.optimizer)
            self._attachment.capture_loss(model)
        except BaseException:
            self.watch.close(status="crashed")
            raise

    def on_train_end(self, logs: Any = None) -> None:
        if self._attachment is not None:
            self._attachment.detach()
            self._attachment = None
        if self.watch is not None:
            w, self.watch = self.watch, None
            w.close(status="finished")
            self.findings = w.findings
