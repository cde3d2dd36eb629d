"""Keras 3 on TensorFlow and JAX: statistics computed inside the compiled step, kept in optimizer
variables, read once per flush.

On these backends the optimizer's ``apply`` runs traced (inside ``tf.function``/XLA or ``jax.jit``)
and sees symbolic tensors or tracers. So gradwatch does not wrap it: it gives the optimizer a
subclass (its class with :class:`_Watched` in front, undone by :meth:`Recorder.detach`) whose
``_backend_apply_gradients`` computes the step's row (:class:`gradwatch.probe.arrays.RowMaker`) as
ops of the step and writes it into a ring, and whose ``_clip_gradients`` and ``assign_add`` /
``assign_sub`` note the clipped gradients and each weight's update. The ring, a histogram ring and
a sampled-step counter are variables added to the optimizer (:meth:`BaseOptimizer.add_variable`):

* on TensorFlow they are ``tf.Variable``\\ s, written in place (``scatter_nd_update``);
* on JAX the trainer's ``stateless_apply`` carries every optimizer variable through the step, so
  the ring is state the step returns (written with ``dynamic_update_slice``, in place under the
  trainer's buffer donation).

The host reads them in :meth:`Recorder.fetch` (one transfer per flush; on JAX after
``model.jax_state_sync()``, since ``fit`` keeps the live state outside the variables).

The loss of each step: on TensorFlow, the scalar that ``tf.GradientTape.gradient`` was last asked
to differentiate before ``apply`` (``fit``'s train step and a custom loop alike); on JAX, ``fit``'s
unscaled loss, taken where the train step hands it to the metrics.

When the host hears of a step: from the callback (``fit``, each batch); in a TensorFlow custom loop,
at each eager ``apply``, or after each call of a ``tf.function`` whose trace contained ``apply``.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import keras
import numpy as np
from keras import ops

from .array_stream import ArraySession, Fetched, ring_shape
from .errors import GradwatchError
from .keras import layer_infos, loss_name, tap_layers
from .probe import arrays
from .probe.layout import COEF, LOSS, LR, NORM_AFTER, SKIPPED, THRESHOLD, ProbeConfig

BACKEND = keras.backend.backend()
if BACKEND not in ("tensorflow", "jax"):  # pragma: no cover - callers check first
    raise GradwatchError(f"gradwatch.keras_compiled records Keras on TensorFlow or JAX; this Keras runs on {BACKEND!r}.")


def _ops() -> arrays.ArrayOps:
    return arrays.tf_ops() if BACKEND == "tensorflow" else arrays.jax_ops()


def _outside_graph() -> Any:
    """TensorFlow's ``init_scope`` (eager, outside any ``tf.function`` being traced); nothing on JAX."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.init_scope()
    import contextlib

    return contextlib.nullcontext()


def _here(t: Any) -> bool:
    """TensorFlow: whether ``t`` can be used where ``apply`` runs now (eager with eager, or a tensor of
    the graph being traced), not one left from another ``tf.function``."""
    import tensorflow as tf

    if tf.is_symbolic_tensor(t) != (not tf.executing_eagerly()):
        return False
    return not tf.is_symbolic_tensor(t) or t.graph is tf.compat.v1.get_default_graph()


def _eager() -> bool:
    if BACKEND != "tensorflow":
        return False
    import tensorflow as tf

    return tf.executing_eagerly()


class _Watched:
    """Put in front of a Keras optimizer's class while it is recorded: the step's statistics as ops of
    the step (see the module's docstring). Every method passes through when no recorder is active."""

    def _backend_apply_gradients(self, grads: Any, trainable_variables: Any) -> Any:
        rec: Recorder | None = self.__dict__.get("_gradwatch")
        if rec is None or not rec.active:
            return super()._backend_apply_gradients(grads, trainable_variables)  # type: ignore[misc]
        rec.begin(grads, trainable_variables)
        result = super()._backend_apply_gradients(grads, trainable_variables)  # type: ignore[misc]
        rec.end(trainable_variables)
        return result

    def _clip_gradients(self, grads: Any) -> Any:
        clipped = super()._clip_gradients(grads)  # type: ignore[misc]
        rec: Recorder | None = self.__dict__.get("_gradwatch")
        if rec is not None and rec.pending:
            rec.clipped = list(clipped)
        return clipped

    def assign_add(self, variable: Any, value: Any) -> Any:
        rec: Recorder | None = self.__dict__.get("_gradwatch")
        if rec is not None and rec.pending:
            rec.note_delta(variable, value, 1.0)
        return super().assign_add(variable, value)  # type: ignore[misc]

    def assign_sub(self, variable: Any, value: Any) -> Any:
        rec: Recorder | None = self.__dict__.get("_gradwatch")
        if rec is not None and rec.pending:
            rec.note_delta(variable, value, -1.0)
        return super().assign_sub(variable, value)  # type: ignore[misc]


_classes: dict[type, type] = {}


def _watched_class(cls: type) -> type:
    if issubclass(cls, _Watched):
        return cls
    if cls not in _classes:
        _classes[cls] = type(cls.__name__, (_Watched, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _classes[cls]


class Recorder:
    """One Keras optimizer recorded on TensorFlow or JAX: its ring variables, the ops that fill them
    in the step, and the host side (an :class:`~gradwatch.array_stream.ArrayStream` of ``session``).

    Args:
        by_callback: the host hears of steps from a callback (``fit``); else from the custom loop
            itself (eager ``apply`` calls, ``tf.function`` calls).
    """

    def __init__(self, session: ArraySession, model: Any, optimizer: Any, *, by_callback: bool,
                 variables: list[Any] | None = None):
        with _outside_graph():  # an apply being traced may start a record: its variables are made eagerly
            self._setup(session, model, optimizer, by_callback, variables)

    def _setup(self, session: ArraySession, model: Any, optimizer: Any, by_callback: bool,
               variables: list[Any] | None) -> None:
        optimizer = getattr(optimizer, "inner_optimizer", None) or optimizer  # LossScaleOptimizer: the true gradients
        if optimizer.__dict__.get("_gradwatch") is not None:
            optimizer.__dict__["_gradwatch"].detach()  # a fit() that raised left it attached
        if not optimizer.built:
            variables = list(variables if variables is not None else model.trainable_variables)
            optimizer.build(variables)
        variables = list(optimizer._trainable_variables)
        if not variables:
            raise GradwatchError(f"the Keras model {model.name!r} has no trainable variables; there is nothing to watch.")
        if getattr(optimizer, "gradient_accumulation_steps", None):
            print("gradwatch: this optimizer accumulates gradients; every micro-step is recorded as a step "
                  "(its gradient, before accumulation).", file=sys.stderr)
        self.session = session
        self.optimizer = optimizer
        self.model = model
        self.by_callback = by_callback
        self.config: ProbeConfig = session.config
        self.variables = variables
        self._index = {optimizer._var_key(v): i for i, v in enumerate(variables)}
        layers = layer_infos(model, variables)
        self.maker = arrays.RowMaker(_ops(), len(layers))
        rows, width, hist_rows = ring_shape(self.config, len(layers))
        self.rows, self.hist_rows = rows, hist_rows
        self.ring = _state_variable(optimizer, "gradwatch_ring", (rows, width), "float32")
        self.hist = _state_variable(optimizer, "gradwatch_hist", (hist_rows, len(layers), arrays.EXP_BINS), "float32")
        self.sampled = _state_variable(optimizer, "gradwatch_sampled", (), "int32")
        self._clip_limit = optimizer.global_clipnorm or (optimizer.clipnorm if not optimizer.clipvalue else None)
        self._clips = any(getattr(optimizer, k, None) for k in ("clipnorm", "global_clipnorm", "clipvalue"))
        info = {"optimizer": type(optimizer).__name__, "framework": f"keras/{BACKEND}",
                "options": _optimizer_options(optimizer), "loss": loss_name(model)}
        # The optimizer may have stepped before (an earlier fit): its counter, read once here, is
        # where this record starts (the ring is written at iterations % rows).
        self._eager_steps = int(np.asarray(ops.convert_to_numpy(optimizer.iterations)))
        # Last: nothing after this can fail, so a record that could not start leaves no stream behind.
        self.stream = session.open(id(optimizer), layers, {k: v for k, v in info.items() if v is not None}, self.fetch,
                                   label=None)
        self.stream.start_at(self._eager_steps)
        self.active = True
        #: Layer index -> its units' (dead, saturated, constant) shares from this step's forward.
        self.act_stats: dict[int, Any] = {}
        self.jax_sampled: Any = None  # JAX: whether the step being traced is sampled (set around its forward)
        self._taps: list[tuple[Any, Any]] = []
        for layer, i, activation, space in tap_layers(model, variables):
            self._tap(layer, i, activation, space)
        self.pending = False
        self.clipped: list[Any] | None = None
        self.deltas: list[Any] = []
        self.loss: Any = None  # the step's loss, when the framework handed it over (see module docstring)
        self.functions: set[int] = set()  # tf.function objects whose trace contained this optimizer's apply
        #: Called after each step the host hears of (``gradwatch run``'s step limit).
        self.after_host_step: Any = None
        self._original_class = type(optimizer)
        optimizer.__class__ = _watched_class(type(optimizer))
        optimizer.__dict__["_gradwatch"] = self
        _live.append(self)
        if BACKEND == "tensorflow":
            _tf_hooks.acquire()

    # -- inside the step (traced) ----------------------------------------------------------------

    def _tap(self, layer: Any, index: int, activation: str | None, space: str) -> None:
        """Read ``layer``'s output in the forward (its ``call``, replaced on the instance until detach)."""
        original = layer.call
        rec = self

        def call(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if rec.active:
                sampled = rec._forward_sampled()
                if sampled is not None and hasattr(out, "shape") and len(out.shape) >= 2:
                    rec.act_stats[index] = arrays.unit_stats(rec.maker.ops, out, activation, space, sampled)
            return out

        layer.call = call
        self._taps.append((layer, call))

    def _forward_sampled(self) -> Any:
        """Whether the forward being run belongs to a sampled step (None: not a training step's)."""
        if BACKEND == "jax":
            return self.jax_sampled
        if _eager():
            return self.config.is_sampled(self._eager_steps)
        return arrays.is_sampled(self.config, ops.convert_to_tensor(self.optimizer._iterations))

    def begin(self, grads: Any, variables: Any) -> None:
        self.pending = True
        self.clipped = None
        self.deltas = [None] * len(self.variables)
        self._grads = [None] * len(self.variables)
        for g, v in zip(grads, variables):
            i = self._index.get(self.optimizer._var_key(v))
            if i is not None and g is not None:
                self._grads[i] = g
        self._g_norm = self.maker.grad_norms(self._grads)

    def note_delta(self, variable: Any, value: Any, sign: float) -> None:
        i = self._index.get(self.optimizer._var_key(variable))
        if i is None:
            return
        d = ops.multiply(ops.cast(value, "float32"), sign)
        self.deltas[i] = d if self.deltas[i] is None else ops.add(self.deltas[i], d)

    def end(self, variables: Any) -> None:
        self.pending = False
        opt = self.optimizer
        step = ops.convert_to_tensor(opt._iterations)
        eager = _eager()
        if eager:
            sampled: Any = self.config.is_sampled(self._eager_steps)  # host knows: no device read
        else:
            sampled = arrays.is_sampled(self.config, step)
        weights = [ops.convert_to_tensor(v) for v in self.variables]
        slots: dict[int, Any] = {LR: opt.learning_rate}
        loss = self._take_loss()
        if loss is not None:
            slots[LOSS] = loss
        if self._clips and self.clipped is not None:
            raw = self.maker.global_norm(self._grads)
            after = self.maker.global_norm([g for g in self.clipped if g is not None])
            slots.update({NORM_AFTER: after, COEF: after / raw, SKIPPED: 0.0})
            if self._clip_limit:
                slots[THRESHOLD] = float(self._clip_limit)
        acts = self._take_acts() if BACKEND == "tensorflow" else {}
        row, hist = self.maker.row(sampled, self._grads, weights, self.deltas, slots, g_norm=self._g_norm, acts=acts,
                                   step=step)
        self._write(step, sampled, row, hist)
        self._grads, self.deltas, self.clipped = [], [], None
        if eager:
            self._eager_steps += 1
            if not self.by_callback:
                self.host_step()
        elif not eager:
            _note_traced(self)

    def _take_loss(self) -> Any:
        loss, self.loss = self.loss, None
        if loss is None or BACKEND != "tensorflow":
            return loss
        return loss if _here(loss) else None

    def _take_acts(self) -> dict[int, Any]:
        """TensorFlow: the activation statistics of this step's forward, if it ran in this graph."""
        acts, self.act_stats = self.act_stats, {}
        return {i: a for i, a in acts.items() if _here(a)}

    def _write(self, step: Any, sampled: Any, row: Any, hist: Any) -> None:
        R, H = self.rows, self.hist_rows
        if BACKEND == "tensorflow":
            import tensorflow as tf

            r = tf.cast(step, tf.int64) % R
            self.ring.value.scatter_nd_update(tf.reshape(r, (1, 1)), row[None])
            k = tf.cast(self.sampled.value, tf.int64) % H

            def put() -> Any:
                self.hist.value.scatter_nd_update(tf.reshape(k, (1, 1)), hist[None])
                self.sampled.value.assign_add(1)
                return tf.constant(0)

            if isinstance(sampled, bool):
                if sampled:
                    put()
            else:
                tf.cond(sampled, put, lambda: tf.constant(0))
        else:
            import jax
            import jax.numpy as jnp

            r = (step % R).astype(jnp.int32)
            self.ring.assign(jax.lax.dynamic_update_slice(self.ring.value, row[None], (r, jnp.int32(0))))
            k = self.sampled.value % H
            self.hist.assign(jax.lax.cond(sampled, lambda h: jax.lax.dynamic_update_slice(h, hist[None], (k, 0, 0)),
                                          lambda h: h, self.hist.value))
            self.sampled.assign(self.sampled.value + jnp.asarray(sampled, jnp.int32))

    # -- the host ----------------------------------------------------------------------------------

    def fetch(self) -> Fetched:
        """Ring, histograms and the two counters: the one read of a flush."""
        if BACKEND == "jax":
            import jax

            sync = getattr(self.model, "jax_state_sync", None)
            if sync is not None:
                sync()  # fit() keeps the live state outside the variables between callbacks
            values = [v.value for v in (self.ring, self.hist, self.optimizer._iterations, self.sampled)]
            ring, hist, steps, sampled = jax.device_get(values)
        else:
            ring, hist, steps, sampled = (v.value.numpy() for v in (self.ring, self.hist, self.optimizer._iterations,
                                                                   self.sampled))
        return Fetched(np.asarray(ring), np.asarray(hist), int(steps), int(sampled))

    def host_step(self, n: int = 1) -> None:
        self.stream.host_step(n)
        if self.after_host_step is not None:
            self.after_host_step()

    def detach(self) -> None:
        """Stop recording this optimizer and give it its class back. The ring variables stay in its
        variable list (Keras cannot remove one), unused, until the optimizer is rebuilt."""
        if not self.active:
            return
        self.active = False
        opt = self.optimizer
        if opt.__dict__.get("_gradwatch") is self:
            del opt.__dict__["_gradwatch"]
            opt.__class__ = self._original_class
        for layer, call in self._taps:
            if layer.__dict__.get("call") is call:
                del layer.call
        self._taps = []
        if self in _live:
            _live.remove(self)
            if BACKEND == "tensorflow":
                _tf_hooks.release()


def _state_variable(optimizer: Any, name: str, shape: tuple[int, ...], dtype: str) -> Any:
    """The optimizer's variable ``name`` of this shape, left by an earlier record (Keras cannot remove
    one: reused, so that fitting again does not grow the state every step carries), or a new one.
    Rows are checked by their step mark (see ``array_stream``), so what an earlier record left in
    them is never taken for this one's."""
    for v in optimizer.variables:
        if v.name == name and tuple(v.shape) == tuple(shape) and str(v.dtype) == dtype:
            return v
    return optimizer.add_variable(shape, initializer="zeros", dtype=dtype, name=name, aggregation="only_first_replica")


def _optimizer_options(opt: Any) -> dict[str, Any]:
    try:
        config = opt.get_config()
    except Exception:
        config = {k: getattr(opt, k, None) for k in ("name", "clipnorm", "global_clipnorm", "clipvalue")}
    return {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool)) or v is None}


# ------------------------------------------------------------------- TensorFlow: loss and loop steps

_live: list[Recorder] = []
_calls = threading.local()


def _note_traced(rec: Recorder) -> None:
    """``apply`` was traced: inside which outermost ``tf.function`` call (its calls are the loop's steps)."""
    stack = getattr(_calls, "stack", None)
    if stack:
        rec.functions.add(id(stack[0]))


class _TfHooks:
    """While a TensorFlow recorder is live: ``GradientTape.gradient`` offers its scalar target as the
    step's loss, and each outermost ``tf.function`` call whose trace contained ``apply`` is a step
    of a custom loop."""

    def __init__(self) -> None:
        self._users = 0
        self._undo: list[Any] = []

    def acquire(self) -> None:
        self._users += 1
        if self._users == 1:
            self._install()

    def release(self) -> None:
        self._users -= 1
        if self._users == 0:
            while self._undo:
                self._undo.pop()()

    def _install(self) -> None:
        import tensorflow as tf
        from tensorflow.python.eager.polymorphic_function import polymorphic_function as pf

        tape_cls = tf.GradientTape
        gradient = tape_cls.gradient

        def tape_gradient(tape: Any, target: Any, sources: Any, *a: Any, **k: Any) -> Any:
            shape = getattr(target, "shape", None)
            if shape is not None and shape.rank is not None and shape.num_elements() == 1:
                for rec in _live:
                    rec.loss = target
            return gradient(tape, target, sources, *a, **k)

        fn_cls = pf.Function
        call = fn_cls.__call__

        def function_call(fn: Any, *a: Any, **k: Any) -> Any:
            stack = getattr(_calls, "stack", None)
            if stack is None:
                stack = _calls.stack = []
            stack.append(fn)
            try:
                return call(fn, *a, **k)
            finally:
                stack.pop()
                if not stack:
                    for rec in list(_live):
                        if not rec.by_callback and id(fn) in rec.functions:
                            rec.host_step()

        tape_cls.gradient = tape_gradient
        fn_cls.__call__ = function_call
        self._undo = [lambda: setattr(tape_cls, "gradient", gradient), lambda: setattr(fn_cls, "__call__", call)]


_tf_hooks = _TfHooks()
