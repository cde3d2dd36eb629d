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
"""

from __future__ import annotations

import collections.abc
import math
import re
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
from .optax_guards import (GuardState, GuardStop, adaptive_grad_clip, agc, autoclip, clip_by_global_norm, find_guards,
                           path_name, skip_nonfinite, zclip)
from .probe import arrays
from .probe.layout import COEF, LOSS, LR, NORM_AFTER, SKIPPED, THRESHOLD, ProbeConfig
from .session import default_out, status_for
from .store import LayerInfo

__all__ = ["GuardStop", "WatchState", "Watched", "adaptive_grad_clip", "agc", "autoclip", "clip_by_global_norm",
           "skip_nonfinite", "watch", "zclip"]

#: Activation names (lowercase, as jax.nn and flax name them) -> the layer table's names.
_ACTIVATIONS = {"relu": "ReLU", "sigmoid": "Sigmoid", "tanh": "Tanh", "elu": "ELU", "selu": "SELU", "gelu": "GELU",
                "silu": "SiLU", "swish": "SiLU", "leaky_relu": "LeakyReLU", "softplus": "Softplus", "soft_sign": "Softsign",
                "softsign": "Softsign", "hard_sigmoid": "Hardsigmoid", "hard_tanh": "Hardtanh", "mish": "Mish",
                "softmax": "Softmax", "relu6": "ReLU6", "log_softmax": "LogSoftmax", "log_sigmoid": "LogSigmoid",
                "celu": "CELU", "glu": "GLU", "linear": None, "identity": None}
_SESSION_OPTIONS = ("out", "flush_every", "sample_every", "overwrite", "quiet", "report", "tensorboard", "summary",
                    "diagnose_online", "activations", "model")
#: A Linen auto-name: ``Dense_0`` -> ``Dense``.
_LINEN_NAME = re.compile(r"^([A-Z][A-Za-z0-9]*)_\d+$")


class WatchState(NamedTuple):
    """The optimizer state of a watched transformation."""

    inner_state: Any  # the watched transformation's own state
    count: jax.Array  # int32: steps taken (the ring row of step s is s % rows)
    ring: jax.Array  # rows x width float32: one row per step (gradwatch.probe.layout.RingLayout)
    hist: jax.Array  # hist_rows x layers x 256 float32: one exponent histogram row per sampled step
    sampled: jax.Array  # int32: sampled steps taken (sample k is histogram row k % hist_rows)


# ----------------------------------------------------------------------------- the layer table


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


def _check_activations(given: Any) -> dict[str, str | None]:
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


class _Table(NamedTuple):
    layers: list[LayerInfo]
    order: list[int]  # leaf index of each layer, in layer-table order
    leaves: int  # arrays in the parameter tree
    signature: tuple[Any, ...]


def _layer_table(params: Any, activations: dict[str, str | None], model: Any) -> _Table:
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
    in_order = _container_order(params)

    def rank(entry: tuple[int, str, tuple[int, ...], str]) -> tuple[float, int]:
        i, name = entry[0], entry[1]
        if ranks and id(variables[i]) in ranks:
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
    return _Table(layers, [e[0] for e in entries], len(flat), signature)


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


def _optimizer_name(state: Any) -> str:
    names = []
    for x in jax.tree_util.tree_leaves(state, is_leaf=lambda x: hasattr(x, "_fields")):
        n = type(x).__name__
        if hasattr(x, "_fields") and n not in ("EmptyState", "WatchState") and n not in names:
            names.append(n)
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
        self.table: _Table | None = None
        self.stream: Any = None
        self.maker: arrays.RowMaker | None = None
        self._latest: Any = None  # the latest state the host was handed (or an eager update returned)
        self._losses: list[Any] = []
        self._guards: list[dict[str, Any]] = []
        self._counted: list[str] = []  # the guards whose acted/judged counters are read at each flush
        self._counters: list[tuple[int, int]] = []
        self._skip_limit: int | None = None  # SkipNonFinite's max_consecutive (None: no such guard)
        self._skip_name = ""
        self._skipped: list[int] = []
        self._run = 0
        self._run_start = -1
        self._stop: GuardStop | None = None
        self._jitted: Any = None

    # -- init (outside jit, or traced) ---------------------------------------------------------

    def init(self, params: Any) -> WatchState:
        table = _layer_table(params, self.activations, self.model)
        start = 0
        if self.table is None:
            self.table = table
            self.maker = arrays.RowMaker(arrays.jax_ops(), len(table.layers))
        else:
            if table.signature != self.table.signature:
                raise GradwatchError("tx.init got parameters of another structure than at its first init; one watch "
                                     "records one model: make a new gwx.watch(...) for it.")
            if self.stream is not None and not self.stream.failed:
                self.stream.flush()  # what the previous state holds; the new one counts on from there
                start = self.stream.steps
            self._latest, self._losses = None, []
        inner_state = self.inner.init(params)
        rows, width, hist_rows = ring_shape(self.config, len(table.layers))
        state = WatchState(inner_state, jnp.asarray(start, jnp.int32), jnp.zeros((rows, width), jnp.float32),
                           jnp.zeros((hist_rows, len(table.layers), arrays.EXP_BINS), jnp.float32),
                           jnp.zeros((), jnp.int32))
        if self.stream is None:
            self._open(inner_state)
        return state

    def _open(self, inner_state: Any) -> None:
        assert self.table is not None
        found = find_guards(inner_state)
        for g in found:
            if isinstance(g, GuardState):
                self._guards.append(g.describe())
                if g.kind == "SkipNonFinite":
                    self._skip_limit = int(dict(g.settings)["max_consecutive"])
                    self._skip_name = "SkipNonFinite"
                else:
                    args = ", ".join(f"{k}={v!r}" for k, v in g.settings if k != "math")
                    self._counted.append(f"{g.kind}({args})")
                if "nothing_excluded" in g.flags and not self.session.quiet:
                    print(f"gradwatch: AGC: no module is named {', '.join(dict(g.settings)['exclude'])}; every layer "
                          "is clipped, the output layer too (NFNets leave it out: pass agc(exclude=[its module name])).",
                          file=sys.stderr)
            else:
                self._guards.append({"name": "SkipNonFinite", "math": "optax.apply_if_finite"})
                self._skip_name = self._skip_name or "optax.apply_if_finite"
        info: dict[str, Any] = {"optimizer": _optimizer_name(inner_state), "framework": "jax/optax"}
        if self._guards:
            info["guards"] = self._guards
        self.stream = self.session.open(id(self), self.table.layers, info, self.fetch)
        if self._guards:
            self.session.add_window_listener(self._on_window, optimizer=self)

    # -- update (inside the step) ----------------------------------------------------------------

    def update(self, grads: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, WatchState]:
        if _eager(grads, state, params, extra):
            # Called outside jit: run it jitted (op by op, the sampled branch would compile at every call).
            if self._jitted is None:
                self._jitted = jax.jit(self._update)
            updates, new = self._jitted(grads, state, params, **extra)
            self._latest = new  # the host may read this state without tx.step
            return updates, new
        return self._update(grads, state, params, **extra)

    def _update(self, grads: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, WatchState]:
        if self.table is None or self.maker is None:
            raise GradwatchError("tx.update was called before tx.init; call state = tx.init(params) first.")
        if not isinstance(state, WatchState):
            raise GradwatchError(f"tx.update takes the state that tx.init returned (a gradwatch WatchState); "
                                 f"got {type(state).__name__}.")
        table = self.table
        leaves = self._leaves(grads, "gradients")
        grads_l = [leaves[i] for i in table.order]
        g_norm = self.maker.grad_norms(grads_l)
        updates, inner = self.inner.update(grads, state.inner_state, params, **extra)
        slots: dict[int, Any] = {}
        found = find_guards(inner)
        if found:
            before = find_guards(state.inner_state)
            updates, inner, guard_slots = self._guard_record(grads_l, before, found, updates, state.inner_state, inner)
            slots.update(guard_slots)
        lr = self._lr(inner)
        if lr is not None:
            slots[LR] = lr
        if extra.get("value") is not None:
            slots[LOSS] = extra["value"]
            if self.stream is not None:
                self.stream.has_loss = True
        count = state.count
        sampled = arrays.is_sampled(self.config, count)
        weights = None
        if params is not None:
            p = self._leaves(params, "parameters")
            weights = [p[i] for i in table.order]
        u = self._leaves(updates, "updates")
        deltas = [u[i] for i in table.order]
        row, hist = self.maker.row(sampled, grads_l, weights, deltas, slots, g_norm=g_norm)
        rows, hist_rows = state.ring.shape[0], state.hist.shape[0]
        ring = jax.lax.dynamic_update_slice(state.ring, row[None], ((count % rows).astype(jnp.int32), jnp.int32(0)))
        k = state.sampled % hist_rows
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

    def _guard_record(self, grads: list[Any], before: list[Any], after: list[Any], updates: Any, old_inner: Any,
                      new_inner: Any) -> tuple[Any, Any, dict[int, Any]]:
        """What the guards did at this step, from their states before and after the update; a
        chained skip_nonfinite that skipped keeps the rest of the optimizer state as it was."""
        raw = self.maker.global_norm(grads)  # type: ignore[union-attr]
        nan = jnp.full((), math.nan, jnp.float32)
        norm_after, threshold, skipped = nan, nan, jnp.zeros((), bool)
        any_norm = jnp.zeros((), bool)
        revert = jnp.zeros((), bool)
        chained_skip = False
        for old, new in zip(before, after):
            if isinstance(new, optax.ApplyIfFiniteState):
                rejected = ~new.last_finite
                skipped = skipped | rejected
                norm_after = jnp.where(any_norm, norm_after, raw)
                any_norm = jnp.ones((), bool)
                continue
            r = new.record
            ran = r.calls != old.record.calls
            norm_after = jnp.where(ran, r.norm_after, norm_after)
            any_norm = any_norm | ran
            threshold = jnp.where(ran & ~jnp.isnan(r.threshold), r.threshold, threshold)
            skipped = skipped | (ran & r.skipped)
            if new.kind == "SkipNonFinite" and "wraps" not in new.flags:
                chained_skip = True
                revert = revert | (ran & r.skipped)
        if chained_skip:
            def keep(o: Any, n: Any) -> Any:
                return n if isinstance(n, GuardState) else jnp.where(revert, o, n)

            new_inner = jax.tree.map(keep, old_inner, new_inner, is_leaf=lambda x: isinstance(x, GuardState))
            updates = jax.tree.map(lambda x: jnp.where(revert, jnp.zeros_like(x), x), updates)
        slots = {NORM_AFTER: norm_after, COEF: norm_after / raw, THRESHOLD: threshold,
                 SKIPPED: skipped.astype(jnp.float32)}
        return updates, new_inner, slots

    @staticmethod
    def _lr(inner: Any) -> Any:
        kinds = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
        for x in jax.tree_util.tree_leaves(inner, is_leaf=lambda x: isinstance(x, kinds)):
            if isinstance(x, kinds) and "learning_rate" in x.hyperparams:
                return x.hyperparams["learning_rate"]
        return None

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
            empty = np.zeros((0, 0), np.float32)
            return Fetched(empty, np.zeros((0, 0, arrays.EXP_BINS), np.float32), self.stream.stored_through + 1, 0)
        counters = [(g.record.acted, g.record.judged) for g in find_guards(ws.inner_state) if isinstance(g, GuardState)
                    and g.kind != "SkipNonFinite"]
        stacked: Any = losses
        if losses and all(isinstance(x, jax.Array) and x.size == 1 for x in losses):
            stacked = jnp.stack([jnp.reshape(x, ()) for x in losses])
        parts = (ws.ring, ws.hist, ws.count, ws.sampled, counters, stacked)
        parts = jax.tree.map(_value, parts, is_leaf=lambda x: callable(getattr(x, "get_value", None)))
        ring, hist, count, sampled, counts, loss_values = jax.device_get(parts)
        self._counters = [(int(a), int(j)) for a, j in counts]
        loss_arr = np.asarray([np.asarray(x, np.float64).reshape(()) for x in loss_values] if isinstance(loss_values, list)
                              else np.asarray(loss_values, np.float64).reshape(-1), np.float64) if losses else None
        self._note_summary()
        return Fetched(np.asarray(ring), np.asarray(hist), int(count), int(sampled), loss_arr)

    def _on_window(self, chunk: Any) -> None:
        """SkipNonFinite's bookkeeping on the host, from a stored window (as gradwatch.guards does)."""
        v = chunk.step_values
        amp = np.nan_to_num(v.get("amp_skipped", np.zeros(len(chunk.steps))), nan=0.0) > 0
        bad = (np.nan_to_num(v["skipped"], nan=0.0) > 0) & ~np.isfinite(v["grad_norm"])
        for step, b, a in zip(chunk.steps, bad, amp):
            if a:
                continue
            if b:
                self._skipped.append(int(step))
                if self._run == 0:
                    self._run_start = int(step)
                self._run += 1
            else:
                self._run = 0
        self._note_summary()
        if self._skip_limit is not None and self._run >= self._skip_limit and self._stop is None:
            self._stop = GuardStop(
                f"{self._run} optimizer steps in a row had non-finite gradients (steps {self._run_start}-"
                f"{self._skipped[-1]}); skip_nonfinite stops here rather than skip forever. The weights or the data "
                "are broken: lower the learning rate, add clip_by_global_norm, or check the inputs for NaN.")

    def _note_summary(self) -> None:
        lines = [f"{name} acted on {a} of {j} steps" for name, (a, j) in zip(self._counted, self._counters)]
        if self._skip_name:
            n = len(self._skipped)
            if not n:
                lines.append(f"{self._skip_name}: no step had non-finite gradients")
            else:
                shown = ", ".join(map(str, self._skipped[:8])) + (", ..." if n > 8 else "")
                lines.append(f"{self._skip_name} skipped {n} step{'s' * (n != 1)} with non-finite gradients (at {shown})")
        if lines and self.stream is not None:
            self.stream.extra["guard_summary"] = lines


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
        self._recorder.session.close(status=status)

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
        overwrite, quiet, report, tensorboard, summary, diagnose_online: as :class:`gradwatch.Watch`.
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
    activations = _check_activations(options.pop("activations", None))
    model = options.pop("model", None)
    config = ProbeConfig(flush_every=options.pop("flush_every", 50), sample_every=options.pop("sample_every", 50))
    options.setdefault("summary", not options.get("quiet", False))
    session = ArraySession(out if out is not None else default_out("jax"), config=config, framework=framework_info(),
                           **options)
    return Watched(_Recorder(tx, session, activations, model))
