"""JAX training with optax (Flax NNX, Flax Linen, plain pytrees): the statistics are computed inside
the compiled step, into a ring kept in the optimizer state, and read once per flush.

    import gradwatch.optax as gwx
    tx = gwx.watch(optax.adam(1e-3), out="runs/j1")     # an optax.GradientTransformation
    state = tx.init(params)
    for batch in data:
        params, state, loss = train_step(params, state, batch)   # jitted; calls tx.update inside
        tx.step(state, loss=loss)                                 # host side: never blocks
    tx.close()                                                    # or: with gwx.watch(...) as tx:

``tx.update`` runs inside the user's ``jax.jit``: every step it writes the per-layer gradient norms
(and, on sampled steps, decided on the device, the full statistics) into a ring row of the state
(:class:`WatchState`), the same row as PyTorch's (:mod:`gradwatch.probe.arrays`). ``tx.step`` only
counts and keeps references to the latest state and the loss; every ``flush_every`` calls it reads
the ring, the histograms, the counters and the stacked losses in one ``jax.device_get``
(:mod:`gradwatch.array_stream` does the rest). Layers are named by their pytree key paths. What
gradwatch's optax guards (:mod:`gradwatch.optax_guards`) and ``optax.apply_if_finite`` did is found
in the inner state after each update and written into the step's row.

The watch returns the inner transformation's updates and state untouched (a chained
``skip_nonfinite`` that skips aside). Inside one jitted step, though, XLA compiles the whole program
at once, and the statistics' extra reads of the gradients can change how it fuses the user's own ops
(a reduction fused into a different kernel): parameters may then differ from an unwatched run in the
last bits, as with any other added read of the gradients. Where the update is jitted apart from the
gradients, it is bit-identical (tests/test_optax.py).
"""

from __future__ import annotations

import collections.abc
import sys
from typing import Any, NamedTuple

from .errors import GradwatchError

try:
    import jax
    import jax.numpy as jnp
    import optax
except ImportError:  # pragma: no cover - exercised only without the extra
    raise GradwatchError("gradwatch.optax needs JAX and optax; install them with `pip install gradwatch[jax]`.") from None

import numpy as np

from .array_stream import ArraySession, Fetched, ring_shape
from .optax_book import GuardBook
from .optax_guards import (GuardState, GuardStop, adaptive_grad_clip, agc, autoclip, clip_by_global_norm,
                           skip_nonfinite, zclip)
from .optax_layers import Table, check_activations, layer_table
from .probe import arrays
from .probe.layout import COEF, LOSS, LR, NORM_AFTER, SKIPPED, THRESHOLD, ProbeConfig
from .session import default_out, status_for

__all__ = ["GuardStop", "WatchState", "Watched", "adaptive_grad_clip", "agc", "autoclip", "clip_by_global_norm",
           "skip_nonfinite", "watch", "zclip"]

_SESSION_OPTIONS = ("out", "flush_every", "sample_every", "overwrite", "quiet", "report", "tensorboard", "summary",
                    "diagnose_online", "log_to", "activations", "model")
class WatchState(NamedTuple):
    """The optimizer state of a watched transformation."""

    inner_state: Any  # the watched transformation's own state
    count: jax.Array  # int32: steps taken (the ring row of step s is s % rows)
    ring: jax.Array  # rows x width float32: one row per step (gradwatch.probe.layout.RingLayout)
    hist: jax.Array  # hist_rows x layers x 256 float32: one exponent histogram row per sampled step
    sampled: jax.Array  # int32: sampled steps taken (sample k is histogram row k % hist_rows)


# ----------------------------------------------------------------------------- the recorder


def _eager(*trees: Any) -> bool:
    """Whether an update is called outside any jax transformation, with arrays alone (then it can
    be jitted as a whole)."""
    leaves = jax.tree_util.tree_leaves(trees)
    return all(isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, bool)) for x in leaves) and \
        not any(isinstance(x, jax.core.Tracer) for x in leaves)


def _value(x: Any) -> Any:
    """An NNX Variable's array (``nnx.Optimizer`` keeps its state in OptArray variables)."""
    get = getattr(x, "get_value", None)
    return get() if callable(get) and not isinstance(x, jax.Array) else x


def _watch_state(obj: Any) -> WatchState | None:
    obj = getattr(obj, "opt_state", obj)  # an nnx.Optimizer
    if isinstance(obj, WatchState):
        return obj
    found = [x for x in jax.tree_util.tree_leaves(obj, is_leaf=lambda x: isinstance(x, WatchState))
             if isinstance(x, WatchState)]
    return found[0] if len(found) == 1 else None


def _learning_rate(inner: Any) -> Any:
    """The learning rate of an ``optax.inject_hyperparams`` state in ``inner`` (None: none there)."""
    kinds = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
    for x in jax.tree_util.tree_leaves(inner, is_leaf=lambda x: isinstance(x, kinds)):
        if isinstance(x, kinds) and "learning_rate" in x.hyperparams:
            return x.hyperparams["learning_rate"]
    return None


def _optimizer_name(state: Any) -> str:
    """``optax (ScaleByAdamState, ...)``: the optax state types in ``state`` (a transformation does
    not say its own name)."""
    names: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, GuardState):
            walk(node.stats)
            return
        if hasattr(node, "_fields"):
            n = type(node).__name__
            if type(node).__module__ != GuardState.__module__ and n != "EmptyState" and n not in names:
                names.append(n)
        if isinstance(node, (list, tuple)):
            for child in node:
                walk(child)
        elif isinstance(node, collections.abc.Mapping):
            for child in node.values():
                walk(child)

    walk(state)
    return "optax" + (f" ({', '.join(names)})" if names else "")


class _Recorder:
    """One watched transformation: the ops its update adds to the step, and the host side (an
    :class:`~gradwatch.array_stream.ArrayStream` of ``session``)."""

    def __init__(self, inner: Any, session: ArraySession, activations: dict[str, str | None], model: Any):
        self.inner = optax.with_extra_args_support(inner)
        self.session = session
        self.config: ProbeConfig = session.config
        self.activations = activations
        self.model = model
        self.table: Table | None = None
        self.stream: Any = None
        self.maker: Any = None  # arrays.RowMaker, once the layers are known
        self.book: GuardBook | None = None
        self._latest: Any = None  # the latest state the host was handed (or an update outside jit returned)
        self._losses: list[Any] = []
        self._stop: GuardStop | None = None
        self._jitted: Any = None

    # -- init (outside jit, or traced) ---------------------------------------------------------

    def init(self, params: Any) -> WatchState:
        table = layer_table(params, self.activations, self.model)
        start = 0
        if self.table is None:
            self.table, self.maker = table, arrays.RowMaker(arrays.jax_ops(), len(table.layers))
        else:
            if table.signature != self.table.signature:
                raise GradwatchError("tx.init got parameters of another structure than at its first init; one watch "
                                     "records one model: make a new gwx.watch(...) for it.")
            if self.stream is not None and not self.stream.failed:
                self.stream.flush()  # what the previous state holds; the new one counts on from there
                start = self.stream.stored_through + 1
            self._latest, self._losses = None, []
        inner_state = self.inner.init(params)
        rows, width, hist_rows = ring_shape(self.config, len(table.layers))
        state = WatchState(inner_state, jnp.asarray(start, jnp.int32), jnp.zeros((rows, width), jnp.float32),
                           jnp.zeros((hist_rows, len(table.layers), arrays.EXP_BINS), jnp.float32),
                           jnp.zeros((), jnp.int32))
        if self.stream is None:
            self._open(table, inner_state)
        return state

    def _open(self, table: Table, inner_state: Any) -> None:
        self.book = GuardBook(inner_state)
        info: dict[str, Any] = {"optimizer": _optimizer_name(inner_state), "framework": "jax/optax"}
        if self.book:
            info["guards"] = self.book.described
        self.stream = self.session.open(id(self), table.layers, info, self.fetch)
        if self.book:
            self.session.add_window_listener(self._on_window, optimizer=self)
        for line in self.book.notes if not self.session.quiet else []:
            print(f"gradwatch: {line}", file=sys.stderr)

    # -- update (inside the step) ----------------------------------------------------------------

    def update(self, grads: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, WatchState]:
        if _eager(grads, state, params, extra):
            # Outside jit: run it jitted (op by op, the sampled branch would be compiled at every call).
            if self._jitted is None:
                self._jitted = jax.jit(self._update)
            updates, new = self._jitted(grads, state, params, **extra)
            self._latest = new  # the host may read this state without tx.step
            return updates, new
        return self._update(grads, state, params, **extra)

    def _update(self, grads: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, WatchState]:
        if self.table is None or self.book is None:
            raise GradwatchError("tx.update was called before tx.init; call state = tx.init(params) first.")
        if not isinstance(state, WatchState):
            raise GradwatchError(f"tx.update takes the state that tx.init returned (a gradwatch WatchState); "
                                 f"got {type(state).__name__}.")
        order = self.table.order
        g = [self._leaves(grads, "gradients")[i] for i in order]
        g_norm = self.maker.grad_norms(g)
        updates, inner = self.inner.update(grads, state.inner_state, params, **extra)
        slots: dict[int, Any] = {}
        if self.book:
            updates, inner, r = self.book.record(self.maker.global_norm(g), state.inner_state, inner, updates)
            slots.update({NORM_AFTER: r["norm_after"], COEF: r["coef"], THRESHOLD: r["threshold"], SKIPPED: r["skipped"]})
        lr = _learning_rate(inner)
        if lr is not None:
            slots[LR] = lr
        if extra.get("value") is not None:  # optax's name for the loss (extra args); the row says it has one
            slots[LOSS] = extra["value"]
        weights = None if params is None else [self._leaves(params, "parameters")[i] for i in order]
        # Each update's norm, every step, outside the sampled cond (see RowMaker.row's dw_norm): an
        # operand of the cond would be materialised and fuse the user's apply_updates differently.
        dw_norm = [None if d is None else jnp.sqrt(jnp.sum(jnp.square(jnp.asarray(d, jnp.float32))))
                   for d in (self._leaves(updates, "updates")[i] for i in order)]
        count = state.count
        sampled = arrays.is_sampled(self.config, count)
        row, hist = self.maker.row(sampled, g, weights, None, slots, g_norm=g_norm, dw_norm=dw_norm, step=count)
        ring = jax.lax.dynamic_update_slice(state.ring, row[None],
                                            ((count % state.ring.shape[0]).astype(jnp.int32), jnp.int32(0)))
        k = state.sampled % state.hist.shape[0]
        hist_ring = jax.lax.cond(sampled, lambda h: jax.lax.dynamic_update_slice(h, hist[None], (k, 0, 0)),
                                 lambda h: h, state.hist)
        return updates, WatchState(inner, optax.safe_increment(count), ring, hist_ring,
                                   state.sampled + sampled.astype(jnp.int32))

    def _leaves(self, tree: Any, what: str) -> list[Any]:
        assert self.table is not None
        leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: x is None)
        if len(leaves) != self.table.leaves:
            raise GradwatchError(f"tx.update got {what} with {len(leaves)} arrays; the parameters given to tx.init "
                                 f"had {self.table.leaves}: give it the same tree.")
        return leaves

    # -- the host --------------------------------------------------------------------------------

    def step(self, state: Any, loss: Any = None, n: int = 1) -> None:
        if self.stream is None:
            raise GradwatchError("tx.step was called before tx.init; call state = tx.init(params) first.")
        if state is not None:
            self._latest = state
        elif self._latest is None:
            raise GradwatchError("tx.step needs the optimizer state the step returned: tx.step(state, loss=loss).")
        if loss is not None:
            self._losses.append(loss)
        self.stream.host_step(n)
        if self._stop is not None:
            stop, self._stop = self._stop, None
            raise stop

    def fetch(self) -> Fetched:
        """Ring, histograms, counters, the guards' counters and the losses: the one read of a flush."""
        ws = _watch_state(self._latest) if self._latest is not None else None
        losses, self._losses = self._losses, []
        if ws is None:
            if self._latest is not None:
                raise GradwatchError("tx.step was handed something that holds no gradwatch WatchState.")
            return Fetched(np.zeros((0, 0), np.float32), np.zeros((0, 0, arrays.EXP_BINS), np.float32),
                           self.stream.stored_through + 1, 0)
        stacked: Any = losses
        if losses and all(isinstance(x, jax.Array) and x.size == 1 for x in losses):
            stacked = jnp.stack([jnp.reshape(x, ()) for x in losses])
        assert self.book is not None
        parts = (ws.ring, ws.hist, ws.count, ws.sampled, self.book.counter_arrays(ws.inner_state), stacked)
        parts = jax.tree.map(_value, parts, is_leaf=lambda x: callable(getattr(x, "get_value", None)))
        ring, hist, count, sampled, counters, loss_values = jax.device_get(parts)
        self.book.take_counters(counters)
        if self.book:
            self.stream.extra["guard_summary"] = self.book.summary()
        loss_arr = None
        if losses:
            loss_arr = np.array([np.asarray(v, np.float64).reshape(()) for v in loss_values], np.float64)
        return Fetched(np.asarray(ring), np.asarray(hist), int(count), int(sampled), loss_arr)

    def _on_window(self, chunk: Any) -> None:
        assert self.book is not None
        v = chunk.step_values
        amp = np.nan_to_num(v.get("amp_skipped", np.zeros(len(chunk.steps))), nan=0.0)
        stop = self.book.on_window(chunk.steps, np.nan_to_num(v["skipped"], nan=0.0), v["grad_norm"], amp)
        self.stream.extra["guard_summary"] = self.book.summary()
        self._stop = self._stop or stop


class Watched(optax.GradientTransformationExtraArgs):
    """An optax transformation that records what it is given (see :func:`watch`): use it wherever an
    ``optax.GradientTransformation`` goes; ``step``, ``close``, ``findings``, ``out`` and ``run``
    are the record's."""

    def __new__(cls, recorder: _Recorder) -> "Watched":
        self = super().__new__(cls, recorder.init, recorder.update)
        self._recorder = recorder
        return self

    def step(self, state: Any, loss: Any = None, n: int = 1) -> None:
        """Tell the record that ``n`` steps ran (host side: no device read between flushes).

        Args:
            state: the optimizer state the step returned (or an ``nnx.Optimizer``).
            loss: the step's loss (a device scalar is fine: it is read at the flush).
            n: steps taken since the last call (a loop that runs several per call).
        """
        self._recorder.step(state, loss, n)

    def flush(self) -> None:
        """Store the buffered steps now (one device read)."""
        self._recorder.session.flush()

    def close(self, status: str = "finished") -> None:
        """Store what is buffered, diagnose, write the report; mark the run ``status``."""
        rec = self._recorder
        if rec.stream is not None and rec._latest is None and rec.stream.steps == 0 and not rec.session.closed \
                and not rec.session.quiet:
            print("gradwatch: tx.step(state, loss=loss) was never called, so no step could be read from the device "
                  "(if the loop ran, call it after each step).", file=sys.stderr)
        rec.session.close(status=status)

    @property
    def session(self) -> ArraySession:
        return self._recorder.session

    @property
    def out(self) -> Any:
        return self._recorder.session.out

    @property
    def run(self) -> Any:
        """The stored run (:func:`gradwatch.load_run`), flushed first while recording."""
        return self._recorder.session.run

    @property
    def findings(self) -> list[Any]:
        return self._recorder.session.findings

    def __enter__(self) -> "Watched":
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        self.close(status=status_for(exc))


def framework_info() -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {"name": "jax", "jax": jax.__version__, "optax": optax.__version__,
                            "python": platform.python_version(), "platform": platform.platform()}
    flax = sys.modules.get("flax")
    if flax is not None:
        info["flax"] = getattr(flax, "__version__", "?")
    try:
        info["device_name"] = str(jax.devices()[0].device_kind)
    except Exception:
        pass
    return info


def watch(tx: Any, out: Any = None, **options: Any) -> Watched:
    """Record the training that ``tx`` (an optax transformation) steps, into ``out``.

    Args:
        tx: the optimizer (any ``optax.GradientTransformation``, chains and gradwatch's guards included).
        out: run directory (default ``gradwatch-runs/jax-TIME``).
        flush_every, sample_every: steps per device read; steps between full statistics.
        overwrite, quiet, report, tensorboard, summary, diagnose_online, log_to: as :class:`gradwatch.Watch`.
        activations: layer-name prefix -> activation (``{"params/Dense_0": "sigmoid"}``, ``"*"``
            for every layer), for the diagnosis to name them.
        model: an NNX model, for the module types and the order the layers were defined in (found
            by itself when ``tx.init`` gets ``nnx.state(model, ...)``).
    """
    if not isinstance(tx, optax.GradientTransformation):
        raise GradwatchError(f"gwx.watch takes an optax transformation (optax.adam(1e-3), optax.chain(...)); "
                             f"got {type(tx).__name__}.")
    if "guards" in options:
        raise GradwatchError("gwx.watch takes no guards=; put gradwatch's optax guards into the chain itself: "
                             "gwx.watch(optax.chain(gwx.zclip(), optax.adam(1e-3))).")
    unknown = sorted(set(options) - set(_SESSION_OPTIONS))
    if unknown:
        raise GradwatchError(f"unknown option {unknown[0]!r} for gradwatch.optax.watch; known: {', '.join(_SESSION_OPTIONS)}.")
    options = dict(options)
    activations = check_activations(options.pop("activations", None))
    model = options.pop("model", None)
    config = ProbeConfig(flush_every=options.pop("flush_every", 50), sample_every=options.pop("sample_every", 50))
    options.setdefault("summary", not options.get("quiet", False))
    session = ArraySession(out if out is not None else default_out("jax"), config=config, framework=framework_info(),
                           **options)
    return Watched(_Recorder(tx, session, activations, model))
