"""The guard protocol and the chain that runs guards between backward and the optimizer step.

A guard is a small object with seven hooks, all optional:

* ``setup(ctx)`` once, when its optimizer is first seen (which parameters, layer names, model);
* ``prepare(step)`` every step before any guard's ``before_step``: decisions already taken on the
  host act here (a rollback restores its snapshot and makes the step a no-op);
* ``before_step(step)`` every step, after the probe has measured the raw gradients and before the
  optimizer runs: it may scale or clip ``step.grads`` in place, ask for the step to be skipped, or
  restore a snapshot — all with device tensors, never reading one on the host;
* ``commit(step)`` after every guard's ``before_step`` (the step's final skip decision is known);
* ``after_step(step)`` after the optimizer ran (e.g. to undo a skipped update);
* ``abort(step)`` when something failed before the optimizer ran: undo what was handed to it (e.g.
  a skip flag given to a fused optimizer), so the step goes on unguarded rather than half-guarded;
* ``on_window(window)`` on the host, after each flushed window of stored statistics (decisions that
  may wait a few steps, such as a rollback, are taken here, from numbers already on the host).

Guards compose as a list and run in its order; each sees the gradient norm as the guards before it
left it (``step.norm()``). The chain records, per step, the global norm before and after all guards,
their ratio, the threshold in force and whether the step was skipped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import GradwatchError
from ..errors import GuardStop  # noqa: F401 - raised by the guards, caught by the runner
from ..probe.kernels import by_device_dtype
from ..probe.torch import StepInputs, per_tensor_norms
from ..store import Chunk, LayerInfo


@dataclass
class GuardSetup:
    """What a guard may know about its optimizer, once."""

    optimizer: torch.optim.Optimizer
    model: nn.Module | None
    layers: list[LayerInfo]
    params: list[torch.Tensor]  # in layer-table order
    device: torch.device
    say: Callable[[str], None]  # prints one line unless the watch is quiet
    #: Per-layer norms of this rank's gradients -> the global ones (data parallel; identity otherwise).
    reduce_norms: Callable[[Sequence[int], torch.Tensor], torch.Tensor] | None = None


class GuardStep:
    """One optimizer step as guards see it. Tensors live on the device; nothing here syncs.

    Attributes:
        index: the optimizer step number.
        layer_ids: layers (indices into the layer table) that have a gradient at this step.
        params, grads: their parameters and gradients (guards modify ``grads`` in place).
        raw_norm: the global gradient norm before any guard (0-d float32 tensor).
        skip: a 0-d bool tensor, True where a guard asked for the step to be skipped.
        host_skip: a guard decided on the host that this step does nothing (e.g. right after a
            rollback); the chain then removes the gradients so the optimizer leaves everything as is.
        threshold: the norm threshold the latest clipping guard used (for the record), or None.
    """

    def __init__(
        self,
        index: int,
        layer_ids: list[int],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        layer_norms: torch.Tensor,
        device: torch.device,
        reduce_norms: Callable[[Sequence[int], torch.Tensor], torch.Tensor] | None = None,
        grad_scale: torch.Tensor | None = None,
    ):
        self.index = index
        self._reduce = reduce_norms
        #: GradScaler's loss scale that the gradients still carry (a fused optimizer unscales in its
        #: kernel), as a 0-d device tensor; None when they are unscaled. Norms here are unscaled.
        self.grad_scale = grad_scale
        self.layer_ids = layer_ids
        self.params = params
        self.grads = grads
        self.device = device
        self.layer_norms = layer_norms  # current per-layer norms (None once a guard made them stale)
        self.raw_norm = torch.linalg.vector_norm(layer_norms)
        self._norm: torch.Tensor | None = self.raw_norm
        self.skip = torch.zeros((), dtype=torch.bool, device=device)
        self.skip_requested = False
        self.host_skip = False
        self.rolled_back = False
        self.threshold: torch.Tensor | None = None
        self._by_device: list[list[int]] | None = None

    # -- the current norm -----------------------------------------------------------------------

    def norm(self) -> torch.Tensor:
        """The global norm of the gradients as they are now (recomputed if a guard changed them
        element-wise)."""
        if self._norm is None:
            if self.layer_norms is None:
                norms = per_tensor_norms(self.grads, self.device)
                if self.grad_scale is not None:
                    norms = norms / self.grad_scale.to(norms.device)
                # Under data parallelism these are this rank's (shard's) norms: make them global.
                self.layer_norms = norms if self._reduce is None else self._reduce(self.layer_ids, norms)
            self._norm = torch.linalg.vector_norm(self.layer_norms)
        return self._norm

    def norms(self) -> torch.Tensor:
        """The per-tensor norms of the gradients as they are now (order of ``grads``)."""
        self.norm()
        assert self.layer_norms is not None
        return self.layer_norms

    def device_groups(self) -> list[list[int]]:
        """Gradient indices by (device, dtype): one foreach launch each."""
        if self._by_device is None:
            self._by_device = by_device_dtype(self.grads)
        return self._by_device

    # -- what guards do ---------------------------------------------------------------------------

    def scale(self, coef: torch.Tensor) -> None:
        """Multiply every gradient by the 0-d tensor ``coef`` (as ``clip_grad_norm_`` does)."""
        for ids in self.device_groups():
            torch._foreach_mul_([self.grads[i] for i in ids], coef.to(self.grads[ids[0]].device))
        if self._norm is not None:
            self._norm = self._norm * coef
        if self.layer_norms is not None:
            self.layer_norms = self.layer_norms * coef

    def scale_layers(self, coefs: torch.Tensor) -> None:
        """Multiply gradient ``i`` by ``coefs[i]`` (one coefficient per tensor)."""
        parts = coefs.unbind()
        for ids in self.device_groups():
            dev = self.grads[ids[0]].device
            torch._foreach_mul_([self.grads[i] for i in ids], [parts[i].to(dev) for i in ids])
        if self.layer_norms is not None:
            self.layer_norms = self.layer_norms * coefs
        self._norm = None

    def changed_elementwise(self) -> None:
        """A guard changed gradients in a way the norms cannot follow; they are recomputed on use."""
        self.layer_norms = None
        self._norm = None

    def request_skip(self, condition: torch.Tensor) -> None:
        """Skip the optimizer step where ``condition`` (a 0-d bool tensor) is True."""
        self.skip = self.skip | condition.to(self.device)
        self.skip_requested = True


@dataclass
class Window:
    """A flushed window of the stored step series, on the host (numpy arrays, one value per step)."""

    steps: np.ndarray
    loss: np.ndarray
    loss_logged: np.ndarray
    grad_norm: np.ndarray
    skipped: np.ndarray
    amp_skipped: np.ndarray  # 1 where GradScaler skipped the step (its overflow, not the guards' business)

    @classmethod
    def from_chunk(cls, chunk: Chunk) -> "Window":
        v = chunk.step_values
        amp = v.get("amp_skipped", np.zeros(len(chunk.steps)))
        return cls(np.asarray(chunk.steps), v["loss"], v["loss_logged"], v["grad_norm"], v["skipped"],
                   np.nan_to_num(amp, nan=0.0))


class Guard:
    """Base class: override the hooks you need. Instances hold per-optimizer state, so a watch with
    several optimizers gives each its own copy."""

    def setup(self, ctx: GuardSetup) -> None:  # noqa: B027 - optional hook
        pass

    def prepare(self, step: GuardStep) -> None:  # noqa: B027
        pass

    def before_step(self, step: GuardStep) -> None:  # noqa: B027
        pass

    def commit(self, step: GuardStep) -> None:  # noqa: B027
        """After every guard's before_step: hand the step's final decision to the optimizer."""

    def after_step(self, step: GuardStep) -> None:  # noqa: B027
        pass

    def abort(self, step: GuardStep | None) -> None:  # noqa: B027
        """Something failed before the optimizer ran: undo what was handed to it (the step goes on
        unguarded rather than half-guarded)."""

    def on_window(self, window: Window) -> None:  # noqa: B027
        pass

    def describe(self) -> dict[str, Any]:
        """Name and settings, stored in the run's metadata."""
        return {"name": type(self).__name__, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def summary(self) -> str | None:
        """One line on what the guard did during the run (printed at the end), or None."""
        return None

    def __repr__(self) -> str:
        d = self.describe()
        args = ", ".join(f"{k}={v!r}" for k, v in d.items() if k != "name")
        return f"{d['name']}({args})"


@dataclass(frozen=True)
class GuardRecord:
    """What the guards did to one step: the global norm after them, its ratio to the norm before
    (the clip coefficient), the threshold they clipped to (None: no norm threshold), and whether the
    step was skipped (a device flag, or a host bool when that was decided on the host)."""

    norm_after: torch.Tensor
    coef: torch.Tensor
    threshold: torch.Tensor | None
    skipped: torch.Tensor | bool


@dataclass
class GuardChain:
    """The guards of one optimizer, run in order, with the step's record."""

    guards: list[Guard]
    setup: GuardSetup
    _stop: GuardStop | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for g in self.guards:
            g.setup(self.setup)

    def before_step(self, index: int, inputs: StepInputs, grad_scale: torch.Tensor | None = None) -> GuardStep | None:
        """Run every guard on this step's gradients; return the step (None if it has no gradients)."""
        if self._stop is not None:
            stop, self._stop = self._stop, None
            raise stop
        if not inputs.grads or inputs.norms is None:
            return None
        step = GuardStep(index, inputs.ids, inputs.params, inputs.grads, inputs.norms, self.setup.device,
                         self.setup.reduce_norms, grad_scale)
        try:
            self._run(step)
        except BaseException:
            self.abort(step)
            raise
        return step

    def abort(self, step: GuardStep | None) -> None:
        for g in self.guards:
            try:
                g.abort(step)
            except Exception:  # undoing is best effort; the original error is what matters
                pass

    @torch.no_grad()
    def _run(self, step: GuardStep) -> None:
        for g in self.guards:
            g.prepare(step)
        if not step.host_skip:
            for g in self.guards:
                g.before_step(step)
            for g in self.guards:
                g.commit(step)
        if step.host_skip:
            # Decided on the host: with no gradients the optimizer leaves parameters and state as they are.
            for group in self.setup.optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def after_step(self, step: GuardStep | None) -> None:
        if step is None:
            return
        with torch.no_grad():
            for g in self.guards:
                g.after_step(step)

    def record(self, step: GuardStep) -> "GuardRecord":
        """What the guards did to the step, as device tensors (no host read)."""
        after = step.norm()
        skipped: torch.Tensor | bool = True if step.host_skip else (step.skip if step.skip_requested else False)
        return GuardRecord(after, after / step.raw_norm, step.threshold, skipped)

    def on_window(self, chunk: Chunk) -> None:
        """Host-side decisions from a flushed window; a guard's stop is raised at the next step
        (never from inside the flush, whose window is already stored)."""
        window = Window.from_chunk(chunk)
        for g in self.guards:
            try:
                g.on_window(window)
            except GuardStop as e:
                self._stop = self._stop or e

    def summaries(self) -> list[str]:
        return [s for s in (g.summary() for g in self.guards) if s]


def as_guard_list(guards: Sequence[Guard] | Guard | None) -> list[Guard]:
    """Validate ``watch(guards=...)``."""
    if guards is None:
        return []
    if isinstance(guards, type) or not isinstance(guards, (Guard, list, tuple)):
        items = [guards]
    else:
        items = [guards] if isinstance(guards, Guard) else list(guards)
    for g in items:
        if isinstance(g, type) and issubclass(g, Guard):
            raise GradwatchError(
                f"guards takes guard objects; got the class {g.__name__}: write {g.__name__}(...) with its settings."
            )
        if not isinstance(g, Guard):
            raise GradwatchError(
                f"guards must be gradwatch.guards objects (ClipNorm(1.0), SkipNonFinite(), ...); got {type(g).__name__}."
            )
    names = [type(g).__name__ for g in items]
    for name in set(names):
        if names.count(name) > 1 and name in ("SkipNonFinite", "Rollback"):
            raise GradwatchError(f"{name} is given twice in guards; give it once.")
    return items


def say_to_stderr(quiet: bool) -> Callable[[str], None]:
    def say(line: str) -> None:
        if not quiet:
            print(f"gradwatch: {line}", file=sys.stderr)

    return say
