"""The statistics of one step as array operations, for frameworks whose step is compiled (TensorFlow's
``tf.function``/XLA, ``jax.jit``): they run inside the step, as ops of its graph, and their result
is a ring row (and, on sampled steps, a histogram row) that the step writes into state it keeps on
the device. The host reads that state once per flush (see :mod:`gradwatch.array_stream`).

One row has the layout of :class:`~gradwatch.probe.layout.RingLayout`, the same as PyTorch's, so the
host derivation (:func:`gradwatch.probe.derive.derive`) is shared:

* every step: each layer's ``‖g‖₂`` (a layer without a gradient this step writes ``NO_GRAD``), the
  loss and learning rate where the framework has them, what a clipping did;
* sampled steps (:meth:`ProbeConfig.is_sampled`, decided on the device from the step counter):
  ``Σg``, the centred norm ``‖g − ḡ‖₂``, ``min g``, ``max g``, the same moments of the weights,
  ``‖Δw‖₂`` of the update, and a histogram of the float32 exponent of ``|g|``. The two branches are
  one ``cond``: an unsampled step computes none of them.

Sums are float32 here (JAX runs without float64 by default; TensorFlow's GPU reductions are float32
too); a tensor's norm is its own reduction, so the relative error stays near float32's 1e-7.

Nothing imports a framework at module level: :func:`jax_ops` and :func:`tf_ops` import theirs.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from .layout import (BLOCKS, EXP_BINS, LOSS, LOSS_GIVEN, SHORT_RUN_STEPS, STEP_MARK, STEP_MARK_MOD, STEP_SLOTS,
                     ProbeConfig, RingLayout)

#: What a layer's gradient-norm column holds on a step where it had no gradient (norms are >= 0 or
#: NaN, so it cannot be mistaken for one).
NO_GRAD = -1.0
#: Per-layer blocks a sampled step fills (every block after ``g_norm`` up to the activation ones).
SAMPLED_BLOCKS = ("g_sum", "g_cnorm", "g_min", "g_max", "w_norm", "w_sum", "w_cnorm", "dw_norm")
#: Activation blocks, which these frameworks' probes leave NaN (see docs/integrations.md).
ACTIVATION_BLOCKS = ("a_dead", "a_sat", "a_const")
assert BLOCKS == ("g_norm",) + SAMPLED_BLOCKS + ACTIVATION_BLOCKS


class ArrayOps:
    """The few array operations a row needs, from one framework (see :func:`jax_ops`, :func:`tf_ops`)."""

    def __init__(self, xp: Any, cond: Callable[..., Any], bitcast_i32: Callable[[Any], Any],
                 bincount: Callable[[Any], Any], cast: Callable[[Any], Any]):
        self.xp = xp  # numpy-like namespace: sum, sqrt, min, max, stack, concatenate, full, zeros, ...
        self.cond = cond
        self.bitcast_i32 = bitcast_i32
        self.bincount = bincount  # int array of values in [0, EXP_BINS) -> EXP_BINS counts (float32)
        self.f32 = cast  # any array -> float32

    def scalar(self, value: Any) -> Any:
        """A float32 scalar of ``value`` (a Python number, or an array of any shape holding one)."""
        if value is None:
            return self.xp.full((), math.nan, dtype="float32")
        if isinstance(value, (int, float)):
            return self.xp.full((), float(value), dtype="float32")  # sync-ok: a Python number, not a device value
        return self.xp.reshape(self.f32(value), ())


def jax_ops() -> ArrayOps:
    import jax
    import jax.numpy as jnp

    def bitcast(x: Any) -> Any:
        return jax.lax.bitcast_convert_type(x, jnp.int32)

    def bincount(e: Any) -> Any:
        return jnp.bincount(e, length=EXP_BINS).astype(jnp.float32)

    return ArrayOps(jnp, lambda p, t, f: jax.lax.cond(p, t, f), bitcast, bincount, lambda x: jnp.asarray(x, jnp.float32))


def tf_ops() -> ArrayOps:
    import tensorflow as tf

    class _TfNp:
        """The numpy-like names ArrayOps uses, on TensorFlow."""

        float32 = tf.float32

        @staticmethod
        def full(shape: Any, value: float, dtype: str = "float32") -> Any:
            return tf.fill(shape, tf.constant(value, tf.float32))

        @staticmethod
        def zeros(shape: Any, dtype: str = "float32") -> Any:
            return tf.zeros(shape, tf.float32)

        sum = staticmethod(tf.reduce_sum)
        where = staticmethod(tf.where)
        exp = staticmethod(tf.exp)
        shape = staticmethod(tf.shape)
        min = staticmethod(tf.reduce_min)
        max = staticmethod(tf.reduce_max)
        sqrt = staticmethod(tf.sqrt)
        square = staticmethod(tf.square)
        stack = staticmethod(tf.stack)
        reshape = staticmethod(tf.reshape)
        abs = staticmethod(tf.abs)

        @staticmethod
        def concatenate(parts: Sequence[Any]) -> Any:
            return tf.concat(list(parts), 0)

        @staticmethod
        def mean(x: Any) -> Any:
            return tf.reduce_mean(x)

    def bitcast(x: Any) -> Any:
        return tf.bitcast(x, tf.int32)

    def bincount(e: Any) -> Any:
        # A segment sum, not tf.math.bincount: XLA (jit_compile=True) needs the bin count constant.
        return tf.math.unsorted_segment_sum(tf.ones_like(e, tf.float32), e, EXP_BINS)

    def cond(p: Any, t: Callable[[], Any], f: Callable[[], Any]) -> Any:
        if isinstance(p, bool):  # eager TensorFlow: the host decided (no device read)
            return t() if p else f()
        return tf.cond(p, t, f)

    return ArrayOps(_TfNp, cond, bitcast, bincount, lambda x: tf.cast(x, tf.float32))


def is_sampled(config: ProbeConfig, step: Any) -> Any:
    """:meth:`ProbeConfig.is_sampled` of an integer step array (a traced counter): the same schedule,
    decided on the device."""
    se = config.sample_every
    dense = max(1, se // 5)
    return ((step % se) == 0) | ((step < SHORT_RUN_STEPS) & ((step % 2) == 0)) | ((step < 2 * se) & ((step % dense) == 0))


class RowMaker:
    """Builds one step's ring row (and histogram row) from a step's arrays, for ``layers`` layers."""

    def __init__(self, ops: ArrayOps, layers: int):
        self.ops = ops
        self.layout = RingLayout(layers)
        self.layers = layers

    def grad_norms(self, grads: Sequence[Any]) -> Any:
        """Each layer's ``‖g‖₂`` (``NO_GRAD`` where ``grads`` has None): the every-step reduction."""
        xp, f32 = self.ops.xp, self.ops.f32
        return xp.stack([xp.sqrt(xp.sum(xp.square(f32(g)))) if g is not None else self.ops.scalar(NO_GRAD)
                         for g in grads])

    def global_norm(self, grads: Sequence[Any]) -> Any:
        xp, f32 = self.ops.xp, self.ops.f32
        present = [xp.sum(xp.square(f32(g))) for g in grads if g is not None]
        return xp.sqrt(xp.sum(xp.stack(present))) if present else self.ops.scalar(None)

    def row(self, sampled: Any, grads: Sequence[Any], weights: Sequence[Any] | None, deltas: Sequence[Any] | None,
            slots: dict[int, Any], g_norm: Any = None, acts: dict[int, Any] | None = None,
            dw_norm: Sequence[Any] | None = None, step: Any = None) -> tuple[Any, Any]:
        """(ring row of width ``layout.width``, histogram rows ``layers x EXP_BINS``), float32.

        Args:
            sampled: a boolean scalar (traced) or a Python bool: whether this step takes the sampled
                statistics.
            grads, weights, deltas: per layer, in layer order (None: not known this step). ``deltas``
                is the update ``w_after - w_before`` of each layer.
            slots: step-slot index -> scalar (the loss, the lr, what a clipping did); the rest NaN
                (a given loss also sets LOSS_GIVEN).
            g_norm: the per-layer norms if already computed (:meth:`grad_norms`).
            acts: layer -> its units' (dead, saturated, constant) shares (:func:`unit_stats`).
            step: the step's number (an integer array): written as STEP_MARK, which the host checks.
            dw_norm: each layer's ``‖Δw‖₂`` already reduced by the caller, every step (then ``deltas``
                is not read). An operand of the sampled ``cond`` must be materialised, which can change
                how XLA fuses the caller's own update: a norm outside the cond keeps it bit-identical.
        """
        ops, xp, L = self.ops, self.ops.xp, self.layers
        if g_norm is None:
            g_norm = self.grad_norms(grads)
        if LOSS in slots:
            slots = {**slots, LOSS_GIVEN: 1.0}
        if step is not None:
            slots = {**slots, STEP_MARK: self.ops.f32(step % STEP_MARK_MOD)}
        head = xp.stack([ops.scalar(slots.get(i)) for i in range(STEP_SLOTS)])

        def full() -> tuple[Any, Any]:
            return self._sampled_blocks(grads, weights, deltas, dw_norm)

        def empty() -> tuple[Any, Any]:
            return xp.full((len(SAMPLED_BLOCKS) * L,), math.nan, dtype="float32"), xp.zeros((L, EXP_BINS), dtype="float32")

        rest, hist = ops.cond(sampled, full, empty)
        return xp.concatenate([head, g_norm, rest, self.activation_blocks(acts or {})]), hist

    def activation_blocks(self, acts: dict[int, Any]) -> Any:
        """The ``a_dead``, ``a_sat`` and ``a_const`` blocks (3 x layers, NaN where a layer is not tapped)."""
        nan = self.ops.scalar(None)
        cols = []
        for k in range(len(ACTIVATION_BLOCKS)):
            cols.extend(acts[i][k] if i in acts else nan for i in range(self.layers))
        return self.ops.xp.stack(cols)

    def _sampled_blocks(self, grads: Sequence[Any], weights: Sequence[Any] | None,
                        deltas: Sequence[Any] | None, dw_norms: Sequence[Any] | None = None) -> tuple[Any, Any]:
        ops, xp, f32 = self.ops, self.ops.xp, self.ops.f32
        nan = ops.scalar(None)
        L = self.layers
        weights = list(weights) if weights is not None else [None] * L
        deltas = list(deltas) if deltas is not None else [None] * L

        def moments(x: Any) -> tuple[Any, Any]:
            if x is None:
                return nan, nan
            x = f32(x)
            s = xp.sum(x)
            n = 1
            for d in x.shape:
                n *= int(d)
            c = xp.sqrt(xp.sum(xp.square(x - s / max(n, 1))))
            return s, c

        g_sum, g_cnorm, g_min, g_max, hists = [], [], [], [], []
        zeros = xp.zeros((EXP_BINS,), dtype="float32")
        for g in grads:
            s, c = moments(g)
            g_sum.append(s)
            g_cnorm.append(c)
            g_min.append(xp.min(f32(g)) if g is not None else nan)
            g_max.append(xp.max(f32(g)) if g is not None else nan)
            hists.append(self._exponent_hist(g) if g is not None else zeros)
        w_norm, w_sum, w_cnorm, dw_norm = [], [], [], []
        for k, (w, d) in enumerate(zip(weights, deltas)):
            w_norm.append(xp.sqrt(xp.sum(xp.square(f32(w)))) if w is not None else nan)
            s, c = moments(w)
            w_sum.append(s)
            w_cnorm.append(c)
            if dw_norms is not None:
                dw_norm.append(dw_norms[k] if dw_norms[k] is not None else nan)
            else:
                dw_norm.append(xp.sqrt(xp.sum(xp.square(f32(d)))) if d is not None else nan)
        blocks = [g_sum, g_cnorm, g_min, g_max, w_norm, w_sum, w_cnorm, dw_norm]
        return xp.concatenate([xp.stack(b) for b in blocks]), xp.stack(hists)

    def _exponent_hist(self, g: Any) -> Any:
        """Counts of the float32 exponent field of ``|g|`` (256 bins; bin 0: zeros and subnormals)."""
        ops = self.ops
        bits = ops.bitcast_i32(ops.xp.reshape(ops.xp.abs(ops.f32(g)), (-1,)))
        return ops.bincount((bits // (1 << 23)) % EXP_BINS)


#: Pre-activation |x| beyond which an activation is flat (see :mod:`gradwatch.probe.tap`).
_PRE_SATURATION = {"Sigmoid": 4.595, "Hardsigmoid": 3.0, "Tanh": 2.647, "Hardtanh": 1.0, "Softsign": 99.0}
#: The same points seen from the activation's output: (centre, half-width).
_POST_BOUND = {"Sigmoid": (0.5, 0.49), "Hardsigmoid": (0.5, 0.49), "Tanh": (0.0, 0.99), "Softsign": (0.0, 0.99),
               "Hardtanh": (0.0, 0.99)}


def unit_stats(ops: ArrayOps, out: Any, activation: str | None, space: str, sampled: Any) -> Any:
    """A layer output's (dead, saturated, constant) shares, as the PyTorch tap defines them (units on
    the last axis): a unit is dead when its largest value over the batch is <= 0, constant when its
    largest equals its smallest (NaN for a single row); the saturated share is of the values where
    ``activation`` is flat, read before it (``space="pre"``) or after it (``"post"``); NaN where it
    has no flat part. Computed on sampled steps only (``sampled``: traced or a Python bool)."""
    xp = ops.xp

    def compute() -> Any:
        x = ops.f32(out)
        units = int(x.shape[-1])
        x2 = xp.reshape(x, (-1, units))
        hi, lo = xp.max(x2, axis=0), xp.min(x2, axis=0)
        dead = xp.mean(ops.f32(hi <= 0))
        rows = x2.shape[0] if x2.shape[0] is not None else xp.shape(x2)[0]  # TensorFlow: maybe known at run time only
        const = xp.mean(ops.f32(hi == lo))
        nan = ops.scalar(None)
        const = (const if rows > 1 else nan) if isinstance(rows, int) else xp.where(rows > 1, const, nan)
        if activation == "Softmax":
            top = xp.max(x if space == "post" else _softmax(xp, x), axis=-1)
            sat = xp.mean(ops.f32(top > 0.99))
        elif space == "pre" and activation in _PRE_SATURATION:
            sat = xp.mean(ops.f32(xp.abs(x) > _PRE_SATURATION[activation]))
        elif space == "post" and activation in _POST_BOUND:
            c, h = _POST_BOUND[activation]
            sat = xp.mean(ops.f32(xp.abs(x - c) > h))
        else:
            sat = ops.scalar(None)
        return xp.stack([dead, sat, const])

    def empty() -> Any:
        return xp.full((3,), math.nan, dtype="float32")

    return ops.cond(sampled, compute, empty)


def _softmax(xp: Any, x: Any) -> Any:
    e = xp.exp(x - xp.max(x, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)
