"""What gradwatch's optax guards (:mod:`gradwatch.optax_guards`) and ``optax.apply_if_finite`` did at
a step, as :func:`gradwatch.optax.watch` reads it from the optimizer state: :class:`GuardBook`."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .errors import GuardStop
from .optax_guards import GuardState, _norm, find_guards



class GuardBook:
    """What the guards of a watched optimizer did: their descriptions (meta.json's ``guards``), each
    step's record (in the traced update), their counters (read with each flush) and, on the host,
    the runs of skipped steps and the summary lines (meta.json's ``guard_summary``), as
    :mod:`gradwatch.guards` keeps them for PyTorch. ``optax.apply_if_finite`` counts as SkipNonFinite."""

    def __init__(self, inner_state: Any):
        self.described: list[dict[str, Any]] = []
        self.notes: list[str] = []  # lines to say once
        self._counted: list[str] = []  # guards whose acted/judged counters are read at each flush
        self._counters: list[tuple[int, int]] = []
        self._skip_limit: int | None = None  # skip_nonfinite's max_consecutive
        self._skip_name = ""
        self.skipped: list[int] = []
        self._run, self._run_start = 0, -1
        for g in find_guards(inner_state):
            if not isinstance(g, GuardState):
                self.described.append({"name": "SkipNonFinite", "math": "optax.apply_if_finite"})
                self._skip_name = self._skip_name or "optax.apply_if_finite"
                continue
            self.described.append(g.describe())
            settings = dict(g.settings)
            if g.kind == "SkipNonFinite":
                self._skip_limit, self._skip_name = int(settings["max_consecutive"]), "SkipNonFinite"
            else:
                self._counted.append(f"{g.kind}({', '.join(f'{k}={v!r}' for k, v in g.settings if k != 'math')})")
            if "nothing_excluded" in g.flags:
                self.notes.append(f"AGC: no module is named {', '.join(settings['exclude'])}; every layer is clipped, "
                                  "the output layer too (NFNets leave it out: pass agc(exclude=[its module name])).")

    def __bool__(self) -> bool:
        return bool(self.described)

    def record(self, raw: Any, old_inner: Any, new_inner: Any, updates: Any) -> tuple[Any, Any, dict[str, Any]]:
        """(updates, inner state, record) of a step, traced: the global norm after the guards, its ratio
        to ``raw`` (the norm before), the threshold in force and whether the step was skipped. A
        guard counts at a step when it ran (its ``calls`` moved); a chained skip_nonfinite that
        skipped keeps the rest of the optimizer state as it was and the update zero."""
        nan = jnp.full((), math.nan, jnp.float32)
        after, threshold, skipped, seen = nan, nan, jnp.zeros((), bool), jnp.zeros((), bool)
        revert, chained, update_norm = jnp.zeros((), bool), False, None
        for old, new in zip(find_guards(old_inner), find_guards(new_inner)):
            if isinstance(new, optax.ApplyIfFiniteState):
                # A rejected step returns zeros; after max_consecutive_errors apply_if_finite gives up
                # and applies the non-finite update, which its state alone does not tell.
                update_norm = _norm(jax.tree.leaves(updates)) if update_norm is None else update_norm
                skipped = skipped | (~new.last_finite & (update_norm == 0))
                after, seen = jnp.where(seen, after, raw), jnp.ones((), bool)
                continue
            r = new.record
            ran = r.calls != old.record.calls
            after, seen = jnp.where(ran, r.norm_after, after), seen | ran
            threshold = jnp.where(ran & ~jnp.isnan(r.threshold), r.threshold, threshold)
            skipped = skipped | (ran & r.skipped)
            if new.kind == "SkipNonFinite" and "wraps" not in new.flags:
                chained, revert = True, revert | (ran & r.skipped)
        if chained:
            def keep(o: Any, n: Any) -> Any:
                return n if isinstance(n, GuardState) else jnp.where(revert, o, n)

            new_inner = jax.tree.map(keep, old_inner, new_inner, is_leaf=lambda x: isinstance(x, GuardState))
            updates = jax.tree.map(lambda x: jnp.where(revert, jnp.zeros_like(x), x), updates)
        record = {"norm_after": after, "coef": after / raw, "threshold": threshold, "skipped": skipped.astype(jnp.float32)}
        return updates, new_inner, record

    def counter_arrays(self, inner_state: Any) -> list[tuple[Any, Any]]:
        """The (acted, judged) device counters of the counted guards, for the flush's one read."""
        return [(g.record.acted, g.record.judged) for g in find_guards(inner_state)
                if isinstance(g, GuardState) and g.kind != "SkipNonFinite"]

    def take_counters(self, values: Sequence[tuple[Any, Any]]) -> None:
        self._counters = [(int(a), int(j)) for a, j in values]

    def on_window(self, steps: Sequence[int], skipped: Any, grad_norm: Any, amp_skipped: Any) -> GuardStop | None:
        """A stored window: note the steps skipped for non-finite gradients; a GuardStop once
        skip_nonfinite's ``max_consecutive`` skips came in a row (as gradwatch.guards.SkipNonFinite)."""
        bad = (skipped > 0) & ~np.isfinite(grad_norm)
        for step, b, amp in zip(steps, bad, amp_skipped > 0):
            if amp:
                continue  # GradScaler's business, not the guards'
            if b:
                self.skipped.append(int(step))
                self._run_start = int(step) if self._run == 0 else self._run_start
                self._run += 1
            else:
                self._run = 0
        if self._skip_limit is not None and self._run >= self._skip_limit:
            return GuardStop(
                f"{self._run} optimizer steps in a row had non-finite gradients (steps {self._run_start}-"
                f"{self.skipped[-1]}); skip_nonfinite stops here rather than skip forever. The weights or the data "
                "are broken: lower the learning rate, add clip_by_global_norm, or check the inputs for NaN.")
        return None

    def summary(self) -> list[str]:
        lines = [f"{name} acted on {a} of {j} steps" for name, (a, j) in zip(self._counted, self._counters)]
        if self._skip_name:
            n = len(self.skipped)
            shown = ", ".join(map(str, self.skipped[:8])) + (", ..." if n > 8 else "")
            lines.append(f"{self._skip_name} skipped {n} step{'s' * (n != 1)} with non-finite gradients (at {shown})" if n
                         else f"{self._skip_name}: no step had non-finite gradients")
        return lines
