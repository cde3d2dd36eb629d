"""gradwatch's guards as optax transformations that keep what they did in their state.

    tx = gwx.watch(optax.chain(gwx.zclip(), optax.adam(1e-3)), out="runs/j")

Each guard reproduces the math and defaults of its PyTorch counterpart in :mod:`gradwatch.guards`
(``zclip`` ~ ZClip, ``autoclip`` ~ AutoClip, ``agc`` ~ AGC, ``skip_nonfinite`` ~ SkipNonFinite),
in ``jax.numpy`` inside the compiled step. ``clip_by_global_norm`` and ``adaptive_grad_clip`` are
optax's own transformations with a record added: optax's keep no state, so nothing outside them can
tell what they did.

Every guard's state is a :class:`GuardState`: a :class:`GuardRecord` of its last step (the global
norm it left, the threshold it used, whether it skipped the step, and counters), its statistics,
and, as static pytree metadata, its name and settings. :func:`gradwatch.optax.watch` finds these
states in the optimizer state after each update and writes the record into that step's ring row,
the same columns the PyTorch guards fill (``grad_norm_clipped``, ``clip_coef``, ``clip_threshold``,
``skipped``). Outside a watch they work as plain optax transformations.

Guards are meant to come first in a chain (they judge gradients, as in PyTorch, where they run
between backward and the optimizer step).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, NamedTuple, Sequence


from .errors import GradwatchError
from .errors import GuardStop  # noqa: F401 - the same class as PyTorch's guards raise

try:
    import jax
    import jax.numpy as jnp
    import optax
except ImportError:  # pragma: no cover - exercised only without the extra
    raise GradwatchError("gradwatch.optax needs JAX and optax; install them with `pip install gradwatch[jax]`.") from None

#: Added to the norm before dividing (as torch.nn.utils.clip_grad_norm_ does; gradwatch.guards too).
NORM_EPS = 1e-6
#: Module names AGC leaves alone by default: the usual names of output layers (as gradwatch.guards.AGC).
HEAD_NAMES = ("head", "classifier", "lm_head", "fc", "logits", "output", "out")


def path_name(path: Sequence[Any]) -> str:
    """A parameter's name from its pytree key path: ``params/Dense_0/kernel``; an NNX Variable's
    trailing ``value`` key is dropped (``linear1/kernel``)."""
    name = jax.tree_util.keystr(tuple(path), simple=True, separator="/")
    if name.endswith("/value"):
        name = name[: -len("/value")]
    return name


class GuardRecord(NamedTuple):
    """What a guard did at its last update (device scalars)."""

    norm_after: jax.Array  # float32: the global norm of what it returned (skip_nonfinite: of what it was given)
    threshold: jax.Array  # float32: the norm threshold it used (NaN: none)
    skipped: jax.Array  # bool: it made the step a no-op
    acted: jax.Array  # int32: steps at which it changed something
    judged: jax.Array  # int32: steps it judged (ZClip: after its warm-up)
    calls: jax.Array  # int32: updates it ran (the watch tells whether it ran at a step by this)


def _empty_record() -> GuardRecord:
    nan = jnp.full((), math.nan, jnp.float32)
    zero = jnp.zeros((), jnp.int32)
    return GuardRecord(nan, nan, jnp.zeros((), bool), zero, zero, zero)


def _next_record(old: GuardRecord, norm_after: Any, threshold: Any, skipped: Any, acted: Any,
                 judged: Any = True) -> GuardRecord:
    f32 = jnp.float32
    return GuardRecord(
        norm_after=jnp.asarray(norm_after, f32).reshape(()),
        threshold=jnp.asarray(threshold, f32).reshape(()),
        skipped=jnp.asarray(skipped, bool).reshape(()),
        acted=old.acted + jnp.asarray(acted, jnp.int32),
        judged=old.judged + jnp.asarray(judged, jnp.int32),
        calls=optax.safe_increment(old.calls),
    )


@dataclasses.dataclass(frozen=True)
class GuardState:
    """A guard's optax state: its record, its statistics, and (static) its name and settings.

    Attributes:
        record: what it did at its last update (:class:`GuardRecord`).
        stats: the guard's own running statistics (a NamedTuple; ``skip_nonfinite(inner)`` holds
            the inner state here).
        kind: the name of its PyTorch counterpart (``ZClip``, ``ClipNorm``, ...).
        settings: ``((name, value), ...)``, stored in meta.json's ``guards``.
        flags: internal notes (``wraps``: a skip_nonfinite that holds its optimizer).
    """

    record: GuardRecord
    stats: Any
    kind: str = ""
    settings: tuple = ()
    flags: tuple = ()

    def describe(self) -> dict[str, Any]:
        return {"name": self.kind, **dict(self.settings)}


jax.tree_util.register_dataclass(GuardState, data_fields=["record", "stats"], meta_fields=["kind", "settings", "flags"])


def find_guards(tree: Any) -> list[Any]:
    """Every :class:`GuardState` and ``optax.ApplyIfFiniteState`` in ``tree``, outer ones before
    the ones they hold, in pytree order (the order of a chain)."""
    targets = (GuardState, optax.ApplyIfFiniteState)
    out: list[Any] = []
    for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, targets)):
        if isinstance(x, GuardState):
            out.append(x)
            out.extend(find_guards(x.stats))
        elif isinstance(x, optax.ApplyIfFiniteState):
            out.append(x)
            out.extend(find_guards(x.inner_state))
    return out


# ----------------------------------------------------------------------------- shared arithmetic


def _norm(leaves: Sequence[Any]) -> jax.Array:
    """The global L2 norm in float32 (a float32 overflow gives inf, as PyTorch's guards see it)."""
    parts = [jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in leaves if x is not None]
    return jnp.sqrt(jnp.sum(jnp.stack(parts))) if parts else jnp.zeros((), jnp.float32)


def _scale(updates: Any, coef: jax.Array, where: jax.Array) -> Any:
    """``g * coef`` where ``where``, else ``g`` unchanged (each in its own dtype)."""
    return jax.tree.map(lambda g: jnp.where(where, (g * coef).astype(g.dtype), g), updates)


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise GradwatchError(f"{name} must be a positive number; got {value!r}.")
    return float(value)


def _count(name: str, value: Any) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise GradwatchError(f"{name} must be a positive integer; got {value!r}.")
    return int(value)


# ----------------------------------------------------------------------------- ZClip, AutoClip


class ZClipStats(NamedTuple):
    seen: jax.Array  # int32: warm-up norms collected so far (at most warmup)
    buf: jax.Array  # the warm-up norms (NaN: not finite, or not yet)
    mean: jax.Array  # EMA of the norm (NaN until the warm-up ends)
    var: jax.Array  # EMA of its variance


def zclip(alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25, eps: float = 1e-6) -> optax.GradientTransformation:
    """Clip gradient-norm spikes by their z-score against an exponential moving average (Kumar et
    al. 2025, "ZClip"), as :class:`gradwatch.guards.ZClip`: the first ``warmup`` steps only collect
    norms, whose mean and variance start the EMAs; then a norm with ``z = (‖g‖ − μ) / (σ + eps)``
    above ``z_thresh`` is scaled down to ``μ + z_thresh² σ / z`` and the EMAs take the clipped norm.
    A non-finite norm is neither clipped nor let into the statistics. Records the norm after, the
    threshold ``μ + z_thresh σ`` and whether it clipped."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
        raise GradwatchError(f"zclip(alpha) must be between 0 and 1; got {alpha!r}.")
    warmup = _count("zclip(warmup)", warmup)
    z_thresh = _positive("zclip(z_thresh)", z_thresh)
    eps = _positive("zclip(eps)", eps)
    a = float(alpha)
    settings = (("alpha", a), ("z_thresh", z_thresh), ("warmup", warmup), ("eps", eps))

    def init(params: Any) -> GuardState:
        nan = jnp.full((), math.nan, jnp.float32)
        stats = ZClipStats(jnp.zeros((), jnp.int32), jnp.full((warmup,), math.nan, jnp.float32), nan, nan)
        return GuardState(_empty_record(), stats, "ZClip", settings)

    def update(updates: Any, state: GuardState, params: Any = None) -> tuple[Any, GuardState]:
        del params
        s = state.stats
        norm = _norm(jax.tree.leaves(updates))
        finite = jnp.isfinite(norm)
        warming = s.seen < warmup
        # Warm-up: collect the norm; when the last one is in, the population mean and variance.
        buf = jnp.where(warming, s.buf.at[jnp.minimum(s.seen, warmup - 1)].set(jnp.where(finite, norm, jnp.nan)), s.buf)
        seen = jnp.where(warming, s.seen + 1, s.seen)
        w_mean = jnp.nanmean(buf)
        w_var = jnp.nanmean((buf - w_mean) ** 2)
        done = warming & (seen == warmup)
        # After it: the z-score rule.
        mean, var = s.mean, s.var
        ready = jnp.isfinite(mean)
        std = jnp.sqrt(var)
        z = (norm - mean) / (std + eps)
        spike = ~warming & finite & ready & (z > z_thresh)
        target = mean + z_thresh**2 * std / z
        coef = jnp.where(spike, target / (norm + NORM_EPS), 1.0)
        effective = jnp.where(spike, target, norm)
        new_mean = a * mean + (1 - a) * effective
        new_var = a * var + (1 - a) * (effective - new_mean) ** 2
        moved = finite & ready
        start = finite & ~ready  # no finite norm in the warm-up: start from the first one
        j_mean = jnp.where(moved, new_mean, jnp.where(start, norm, mean))
        j_var = jnp.where(moved, new_var, jnp.where(start, 0.0, var))
        stats = ZClipStats(seen, buf, jnp.where(warming, jnp.where(done, w_mean, mean), j_mean),
                           jnp.where(warming, jnp.where(done, w_var, var), j_var))
        threshold = jnp.where(warming, jnp.nan, mean + z_thresh * std)
        record = _next_record(state.record, jnp.where(spike, norm * coef, norm), threshold, False, spike, ~warming)
        return _scale(updates, coef, spike), dataclasses.replace(state, record=record, stats=stats)

    return optax.GradientTransformation(init, update)


class AutoClipStats(NamedTuple):
    n: jax.Array  # int32: norms seen so far
    norms: jax.Array  # the last ``history`` norms, a ring (NaN: not finite, or not yet)


def autoclip(percentile: float = 10.0, history: int = 10_000) -> optax.GradientTransformation:
    """Clip to a percentile of the gradient norms seen so far (Seetharaman et al. 2020, "AutoClip"),
    as :class:`gradwatch.guards.AutoClip`: each step's norm joins the history first, the threshold
    is its ``percentile``-th percentile (linear interpolation, as ``numpy.percentile``) and the
    gradients are scaled down to it. A compiled step needs a fixed size, so the history is the last
    ``history`` norms (PyTorch's AutoClip keeps all of them by default); non-finite norms are kept
    out of it. Records the norm after, the threshold and whether it clipped."""
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real) or not 0 <= percentile <= 100:
        raise GradwatchError(f"autoclip(percentile) must be between 0 and 100; got {percentile!r}.")
    history = _count("autoclip(history)", history)
    q = float(percentile) / 100.0
    settings = (("percentile", float(percentile)), ("history", history))

    def init(params: Any) -> GuardState:
        stats = AutoClipStats(jnp.zeros((), jnp.int32), jnp.full((history,), math.nan, jnp.float32))
        return GuardState(_empty_record(), stats, "AutoClip", settings)

    def update(updates: Any, state: GuardState, params: Any = None) -> tuple[Any, GuardState]:
        del params
        s = state.stats
        norm = _norm(jax.tree.leaves(updates))
        finite = jnp.isfinite(norm)
        norms = s.norms.at[s.n % history].set(jnp.where(finite, norm, jnp.nan))
        threshold = jnp.nanquantile(norms, q)
        coef = jnp.minimum(threshold / (norm + NORM_EPS), 1.0)
        coef = jnp.where(finite & jnp.isfinite(coef), coef, 1.0)
        acted = coef < 1.0
        record = _next_record(state.record, jnp.where(acted, norm * coef, norm), threshold, False, acted)
        stats = AutoClipStats(optax.safe_increment(s.n), norms)
        return _scale(updates, coef, acted), dataclasses.replace(state, record=record, stats=stats)

    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------- AGC


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    parts = name.replace(".", "/").split("/")[:-1]  # the module path, without the parameter's own name
    for e in exclude:
        want = e.replace(".", "/").split("/")
        k = len(want)
        if any(parts[j: j + k] == want for j in range(len(parts) - k + 1)):
            return True
    return False


def _names(tree: Any) -> list[str]:
    return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]]


def agc(clipping: float = 0.01, eps: float = 1e-3, exclude: Sequence[str] | None = None) -> optax.GradientTransformation:
    """Adaptive gradient clipping, unit-wise (Brock et al. 2021, NFNets), as
    :class:`gradwatch.guards.AGC`: each unit keeps ``‖G_i‖ <= clipping * max(‖W_i‖, eps)``. A unit is
    an output unit's fan-in: in JAX's ``(..., in, out)`` kernel layout, a slice along the last axis
    (the rows of PyTorch's ``(out, in, ...)``); each element of a bias or other 1-D parameter.
    Parameters whose module path has a component named in ``exclude`` are left alone (default: the
    usual output-layer names, :data:`HEAD_NAMES`). Needs ``params`` in ``update``. Records the norm
    after and whether it clipped any unit."""
    clipping = _positive("agc(clipping)", clipping)
    eps = _positive("agc(eps)", eps)
    if isinstance(exclude, str):
        exclude = [exclude]
    if exclude is not None and (not isinstance(exclude, (list, tuple, set)) or not all(isinstance(e, str) for e in exclude)):
        raise GradwatchError(f"agc(exclude) takes module names (strings), e.g. exclude=['head']; got {exclude!r}.")
    skip = tuple(exclude) if exclude is not None else HEAD_NAMES
    settings = (("clipping", clipping), ("eps", eps), ("exclude", skip))  # static pytree data: hashable

    def init(params: Any) -> GuardState:
        matched = any(_excluded(n, skip) for n in _names(params))
        return GuardState(_empty_record(), optax.EmptyState(), "AGC", settings, () if matched else ("nothing_excluded",))

    def update(updates: Any, state: GuardState, params: Any = None) -> tuple[Any, GuardState]:
        if params is None:
            raise GradwatchError("gwx.agc needs the parameters: call tx.update(grads, state, params).")
        flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
        weights = treedef.flatten_up_to(params)
        out, acted = [], []
        for (path, g), w in zip(flat, weights):
            if g is None or g.size == 0 or _excluded(path_name(path), skip):
                out.append(g)
                continue
            w = jnp.asarray(w, jnp.float32)
            g32 = jnp.asarray(g, jnp.float32)
            if g.ndim <= 1:
                w_norm, g_norm = jnp.abs(w), jnp.abs(g32)
            else:
                axes = tuple(range(g.ndim - 1))
                w_norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))
                g_norm = jnp.sqrt(jnp.sum(jnp.square(g32), axis=axes, keepdims=True))
            max_norm = jnp.maximum(w_norm, eps) * clipping
            over = g_norm > max_norm
            out.append(jnp.where(over, (g32 * (max_norm / jnp.maximum(g_norm, NORM_EPS))).astype(g.dtype), g))
            acted.append(jnp.any(over))
        updates = treedef.unflatten(out)
        any_acted = jnp.any(jnp.stack(acted)) if acted else jnp.zeros((), bool)
        record = _next_record(state.record, _norm(out), jnp.nan, False, any_acted)
        return updates, dataclasses.replace(state, record=record)

    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------- optax's clippings, recorded


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm(max_norm)`` with a record: the same transformation (its update is
    called as is), plus what it did — the norm after, the threshold ``max_norm``, whether it clipped.
    optax's keeps no state, so a watch cannot see what it did; use this one in its place."""
    max_norm = _positive("clip_by_global_norm(max_norm)", max_norm)
    inner = optax.clip_by_global_norm(max_norm)

    def init(params: Any) -> GuardState:
        return GuardState(_empty_record(), optax.EmptyState(), "ClipNorm",
                          (("max_norm", max_norm), ("math", "optax.clip_by_global_norm")))

    def update(updates: Any, state: GuardState, params: Any = None) -> tuple[Any, GuardState]:
        out, _ = inner.update(updates, optax.EmptyState(), params)
        norm = jnp.asarray(optax.tree.norm(updates), jnp.float32)
        kept = norm < max_norm  # optax's own test: at or above max_norm, scaled to it
        after = jnp.where(kept, norm, norm / norm * max_norm)  # NaN stays NaN
        record = _next_record(state.record, after, max_norm, False, ~kept & jnp.isfinite(norm))
        return out, dataclasses.replace(state, record=record)

    return optax.GradientTransformation(init, update)


def adaptive_grad_clip(clipping: float, eps: float = 1e-3, axis: Any = None) -> optax.GradientTransformation:
    """``optax.adaptive_grad_clip(clipping, eps, axis)`` with a record: the same transformation
    (optax's unit-wise norms, its update called as is), plus the norm after and whether it clipped
    any unit. optax's keeps no state, so a watch cannot see what it did; use this one in its place.
    (:func:`agc` is gradwatch's own AGC, with PyTorch's unit and exclusion rules.)"""
    clipping = _positive("adaptive_grad_clip(clipping)", clipping)
    eps = _positive("adaptive_grad_clip(eps)", eps)
    inner = optax.adaptive_grad_clip(clipping, eps, axis)

    def init(params: Any) -> GuardState:
        return GuardState(_empty_record(), optax.EmptyState(), "AGC",
                          (("clipping", clipping), ("eps", eps), ("math", "optax.adaptive_grad_clip")))

    def update(updates: Any, state: GuardState, params: Any = None) -> tuple[Any, GuardState]:
        out, _ = inner.update(updates, optax.EmptyState(), params)
        changed = [jnp.any(jnp.isfinite(g) & (o != g)) for g, o in zip(jax.tree.leaves(updates), jax.tree.leaves(out))]
        acted = jnp.any(jnp.stack(changed)) if changed else jnp.zeros((), bool)
        record = _next_record(state.record, _norm(jax.tree.leaves(out)), jnp.nan, False, acted)
        return out, dataclasses.replace(state, record=record)

    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------- SkipNonFinite


class SkipStats(NamedTuple):
    consecutive: jax.Array  # int32: skipped steps in a row, up to the last one
    inner_state: Any  # the optimizer's state, when skip_nonfinite holds it (else EmptyState)


def skip_nonfinite(inner: optax.GradientTransformation | None = None, max_consecutive: int = 25
                   ) -> optax.GradientTransformationExtraArgs:
    """Skip every step whose gradients hold NaN or ±Inf, or whose float32 global norm overflows, as
    :class:`gradwatch.guards.SkipNonFinite`: parameters **and optimizer state** stay exactly as they
    were. Records the skipped steps; under :func:`gradwatch.optax.watch`, after ``max_consecutive``
    skipped steps in a row the next ``tx.step`` raises :class:`GuardStop` rather than skip forever
    (checked at each flush).

    Two forms:

    * ``gwx.skip_nonfinite(optax.adam(1e-3))`` holds the optimizer and does not run it on a skipped
      step (as ``optax.apply_if_finite``, which gives up after a few steps; this one does not);
    * ``optax.chain(gwx.skip_nonfinite(), optax.adam(1e-3))``: under ``gwx.watch`` the watch keeps
      the whole optimizer state as it was on a skipped step and returns a zero update. Used without
      a watch, this form can only zero the gradients of that step (later transformations' state,
      e.g. Adam's moments, still moves); use the first form there.
    """
    max_consecutive = _count("skip_nonfinite(max_consecutive)", max_consecutive)
    if inner is not None and not isinstance(inner, optax.GradientTransformation):
        raise GradwatchError(f"skip_nonfinite takes an optax transformation to hold (or nothing); got {type(inner).__name__}.")
    wrapped = optax.with_extra_args_support(inner) if inner is not None else None
    settings = (("max_consecutive", max_consecutive),)
    flags = ("wraps",) if wrapped is not None else ()

    def init(params: Any) -> GuardState:
        held = wrapped.init(params) if wrapped is not None else optax.EmptyState()
        return GuardState(_empty_record(), SkipStats(jnp.zeros((), jnp.int32), held), "SkipNonFinite", settings, flags)

    def update(updates: Any, state: GuardState, params: Any = None, **extra: Any) -> tuple[Any, GuardState]:
        norm = _norm(jax.tree.leaves(updates))
        skip = ~jnp.isfinite(norm)
        held = state.stats.inner_state
        if wrapped is None:
            out = jax.tree.map(lambda g: jnp.where(skip, jnp.zeros_like(g), g), updates)
        else:
            out, held = jax.lax.cond(
                skip,
                lambda: (jax.tree.map(jnp.zeros_like, updates), held),
                lambda: wrapped.update(updates, held, params, **extra),
            )
        consecutive = jnp.where(skip, optax.safe_increment(state.stats.consecutive), 0)
        record = _next_record(state.record, norm, jnp.nan, skip, skip)
        return out, dataclasses.replace(state, record=record, stats=SkipStats(consecutive, held))

    return optax.GradientTransformationExtraArgs(init, update)
