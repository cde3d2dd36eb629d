"""Per-layer gradient and weight statistics from PyTorch, computed on the device without host syncs.

The probe is driven from two points of an optimizer step (Lightning's naming: the hook name says
when it runs):

* :meth:`TorchProbe.on_before_optimizer_step` — gradients are final (after backward, AMP unscaling
  and the data-parallel all-reduce); reductions are queued on the device and their results written
  into a preallocated device ring buffer, one row per step.
* :meth:`TorchProbe.on_after_optimizer_step` — on sampled steps, the norm of the actual update.

Nothing in these two calls reads a device value on the host: no scalar reads (``item``, ``tolist``,
a Python ``float`` or ``if`` of a tensor). Every ``flush_every`` steps the used part of the buffer crosses to the
host in a single copy; everything derived (RMS, mean, std, ratios, the global norm) is computed there
in float64, from raw sums that the device produced.

Raw quantities per layer (a parameter tensor):

* every step: ``‖g‖₂``, one ``_foreach_norm`` per (device, dtype) group — the one pass over the
  gradients that every step pays for (RMS, the non-finite flag and the global norm derive from it);
* sampled steps (every ``sample_every``, denser at the start): ``Σg`` and the centred norm
  ``‖g − ḡ‖₂`` (exact in float64 up to 65536 elements; larger tensors from float32 partial sums and
  ``‖g‖₂``, see :func:`.kernels.moments`), ``min g`` and ``max g`` (one ``aminmax``; ``abs().amax()``
  and ``_foreach_norm(ord=inf)`` were ~10x slower on the 2-core development CPU), a log2 histogram
  of ``|g|`` read from the float32 exponent bits (there ~5x cheaper than ``histc`` of ``log10``; its
  zero bin gives the zero fraction), the same moments of the weights, ``‖Δw‖₂`` of the real
  update, and the dead, saturated and constant shares of the units the forward pass produced.

This module holds the schedule and the probe; its parts are beside it: :mod:`.layers` (the layer
table), :mod:`.kernels` (the device reductions), :mod:`.tap` (the activation hooks), :mod:`.ring`
(the device buffer and which column holds what) and :mod:`.derive` (the host-side statistics).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import GradwatchError
from ..store import Chunk, LayerInfo
from .derive import HostRows, derive, fold_exponent_counts
from .distributed import WindowReducer, local_tensor, world
from .kernels import ParamGroup, exponent_counts, global_norm, l2_norms, moments, per_tensor_norms
from .layers import ACTIVATION_TYPES, OUTPUT_ACTIVATION_TYPES, build_layer_table, following_activations
from .layout import SHORT_RUN_STEPS, ProbeConfig, RingLayout, max_sampled_in_window
from .ring import RingBuffer
from .tap import SATURATION_THRESHOLD, SOFTMAX_SATURATED, ActivationTap, TapTarget, torch_tap_targets

__all__ = [
    "ACTIVATION_TYPES", "OUTPUT_ACTIVATION_TYPES", "SATURATION_THRESHOLD", "SHORT_RUN_STEPS", "SOFTMAX_SATURATED",
    "ProbeConfig", "StepInputs", "TapTarget", "TorchProbe", "build_layer_table", "fold_exponent_counts",
    "following_activations", "global_norm", "l2_norms", "per_tensor_norms", "torch_tap_targets",
]

@dataclass(frozen=True)
class StepInputs:
    """What the guards judge a step by, as the probe computed it: the layers that have a gradient,
    their parameters and gradients, and the gradients' norms (one device tensor, summed over the
    data-parallel ranks), in the same order."""

    ids: list[int]
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    norms: torch.Tensor | None

    def unscaled(self, scale: torch.Tensor) -> "StepInputs":
        """The same step with its norms divided by a loss scale still carried by the gradients."""
        return self if self.norms is None else replace(self, norms=self.norms / scale)


class TorchProbe:
    """Statistics of one optimizer's parameters, kept on the device until a flush.

    Args:
        params: parameters in layer-table order.
        layers: their layer table.
        config: schedules.
        sink: receives each flushed :class:`~gradwatch.store.Chunk` on the host.
        model: the model whose forward the activation tap reads (None: no activation statistics).
        tap_targets: the modules the tap reads (None: the model's Linear and Conv layers).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        layers: Sequence[LayerInfo],
        config: ProbeConfig,
        sink: Callable[[Chunk], None],
        model: nn.Module | None = None,
        tap_targets: Sequence[TapTarget] | None = None,
    ):
        if not params:
            raise GradwatchError("there are no parameters to watch: the model or optimizer holds none.")
        self.config = config
        self.layers = list(layers)
        self._sink = sink
        self._params = list(params)
        n = len(self._params)
        self.device = self._params[0].device
        self._groups = ParamGroup.split(self._params)
        self._numel = np.array([p.numel() for p in self._params], dtype=np.float64)

        cap = config.flush_every
        self._layout = RingLayout(n)
        # Sampled steps in any window of `cap` consecutive steps (a manual flush can start one anywhere).
        hist_rows = max_sampled_in_window(config.is_sampled, cap, horizon=2 * config.sample_every + 2 * cap)
        self._buffer = RingBuffer(self._layout, cap, hist_rows, self.device)
        self._ring, self._staging = self._buffer.ring, self._buffer.staging
        self._host = HostRows(cap, n)
        #: Whether to keep each step's gradients and norms for guards (set by a watch with guards).
        self.keep_step_inputs = False
        #: This step's gradients and their norms, for guards.
        self.step_inputs = StepInputs([], [], [], None)
        #: This step's per-layer gradient norms, one device tensor per (device, dtype) group (forensics).
        self.step_norms: list[torch.Tensor] = []
        #: Whether the last flush summed its window over the ranks.
        self.last_flush_reduced = False

        self._rows = 0  # rows of the ring in use
        self.step = 0  # optimizer steps seen
        self._t0 = time.perf_counter()
        self._pending_loss: torch.Tensor | float | None = None
        self._snapshot: list[list[torch.Tensor]] | None = None
        #: Combines statistics over data-parallel ranks (set at the first step when a process group
        #: with several ranks is initialised by then; None in a single process).
        self._reducer: WindowReducer | None = None
        self._world_checked = False
        #: (first, last) steps of windows flushed without summing over the ranks (this rank's own numbers).
        self.local_windows: list[tuple[int, int]] = []
        #: Whether every rank runs this probe (so windows may be summed over them). Integrations that
        #: record on rank 0 only turn it off: a collective on one rank alone would wait forever.
        self.reduce_ranks = True
        self._tap: ActivationTap | None = None
        if model is not None:
            layer_of = {id(p): i for i, p in enumerate(self._params)}
            acts = {i: layer.activation for i, layer in enumerate(self.layers)}
            self._tap = ActivationTap(model, layer_of, acts, tap_targets)
            if config.is_sampled(0):
                self._tap.attach()  # the next forward belongs to step 0

    def _start_reducer(self) -> None:
        self._world_checked = True
        w = world() if self.reduce_ranks else None
        if w is not None:
            self._reducer = WindowReducer(self._params, w[0], w[1], self._layout, self.device)

    @property
    def reducer(self) -> WindowReducer | None:
        return self._reducer

    def reduce_step_norms(self, layer_ids: Sequence[int], norms: torch.Tensor) -> torch.Tensor:
        """Per-layer norms of this rank's gradients -> the global ones (unchanged in one process)."""
        return norms if self._reducer is None else self._reducer.reduce_norms(layer_ids, norms)

    def _put(self, row: torch.Tensor, block: str, key: tuple, layer_ids: Sequence[int],
             values: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(values).to(device=self.device, dtype=torch.float32)
        row.index_copy_(0, self._buffer.column_index((block, *key), block, layer_ids), stacked)
        return stacked

    # -- hook points ------------------------------------------------------------------------------

    @torch.no_grad()
    def on_before_optimizer_step(self, lr: float | torch.Tensor | None = None) -> None:
        """Queue this step's statistics; gradients must be final."""
        if not self._world_checked:
            self._start_reducer()
        if self._rows == self.config.flush_every:
            self.flush()
        row, step = self._rows, self.step
        sampled = self.config.is_sampled(step)
        host = self._host
        host.begin(row, step, sampled, time.perf_counter() - self._t0, lr)
        ring_row = self._ring[row]  # all NaN: filled at creation and after each flush
        if isinstance(lr, torch.Tensor):
            host.lr_tensor = True
            self._buffer.put_lr(row, lr)
        if self._pending_loss is not None:
            self._write_loss(row, self._pending_loss)
            self._pending_loss = None
        hrow = len(host.hist_steps)
        snapshot: list[list[torch.Tensor]] = []
        all_ids: list[int] = []
        all_params: list[torch.Tensor] = []
        all_grads: list[torch.Tensor] = []
        all_norms: list[torch.Tensor] = []
        self.step_norms = step_norms = []
        for gi, group in enumerate(self._groups):
            ids, params, grads = group.gradients()
            host.present[row, ids] = True
            key = (gi, tuple(ids))
            if grads:
                norms = self._put(ring_row, "g_norm", key, ids, l2_norms(grads))
                step_norms.append(norms)
                if self.keep_step_inputs:
                    all_ids += ids
                    all_params += params
                    all_grads += grads
                    all_norms.append(norms)
                if sampled:
                    self._grad_details(ring_row, hrow, key, ids, grads, norms)
            if sampled:
                self._weight_details(ring_row, gi, group)
                snapshot.append(group.take_snapshot())
        self._snapshot = snapshot if sampled else None
        if self.keep_step_inputs:
            norms_all = None if not all_norms else all_norms[0] if len(all_norms) == 1 else torch.cat(all_norms)
            if norms_all is not None:
                norms_all = self.reduce_step_norms(all_ids, norms_all)  # same decisions on every rank
            self.step_inputs = StepInputs(all_ids, all_params, all_grads, norms_all)
        if self._tap is not None and self._tap.attached:
            for name, (ids, values) in self._tap.end_step(sampled, host.present[row]).items():
                if values:
                    self._put(ring_row, name, (name, tuple(ids)), ids, values)
        # Commit the row last: a step that failed half-way is never flushed as if it were whole.
        self._rows = row + 1
        self.step = step + 1
        if sampled:
            host.hist_steps.append(step)

    def _grad_details(self, ring_row: torch.Tensor, hrow: int, key: tuple, ids: list[int],
                      grads: list[torch.Tensor], norms: torch.Tensor) -> None:
        group = self._groups[key[0]]
        sums, cnorms = moments(grads, norms, group)
        self._put(ring_row, "g_sum", key, ids, sums)
        self._put(ring_row, "g_cnorm", key, ids, cnorms)
        # aminmax raises on empty tensors: those keep NaN for min and max.
        full = [(i, g) for i, g in zip(ids, grads) if g.numel()]
        if full:
            mm = [torch.aminmax(g) for _, g in full]
            fids = [i for i, _ in full]
            self._put(ring_row, "g_min", ("mm", *key), fids, [m.min for m in mm])
            self._put(ring_row, "g_max", ("mm", *key), fids, [m.max for m in mm])
        self._buffer.put_hist(hrow, key, ids, [exponent_counts(g, group.scratch, group.scratch8) for g in grads])

    def _weight_details(self, ring_row: torch.Tensor, gi: int, group: ParamGroup) -> None:
        weights = group.weights
        norms = self._put(ring_row, "w_norm", ("w", gi), group.layer_ids, l2_norms(weights))
        sums, cnorms = moments(weights, norms, group)
        self._put(ring_row, "w_sum", ("w", gi), group.layer_ids, sums)
        self._put(ring_row, "w_cnorm", ("w", gi), group.layer_ids, cnorms)

    @torch.no_grad()
    def on_after_optimizer_step(self) -> None:
        """On sampled steps, record ‖Δw‖ of the update the optimizer actually made; before a sampled
        step, put the activation hooks on for its forward pass."""
        if self._tap is not None and self.config.is_sampled(self.step):
            self._tap.attach(judge=True)
        if self._snapshot is None:
            return
        ring_row = self._ring[self._rows - 1]  # the row that on_before_optimizer_step committed
        for gi, (group, before) in enumerate(zip(self._groups, self._snapshot)):
            torch._foreach_sub_(before, group.weights)
            self._put(ring_row, "dw_norm", ("dw", gi), group.layer_ids, l2_norms(before))
        self._snapshot = None

    def current_grad_norm(self) -> torch.Tensor | None:
        """The global norm of the gradients as they are now (e.g. after a framework clipped them)."""
        ids = [i for i, p in enumerate(self._params) if p.grad is not None and not p.grad.is_sparse]
        grads = [local_tensor(self._params[i].grad) for i in ids]  # type: ignore[arg-type]
        if self._reducer is None:
            return global_norm(grads, self.device)
        if not ids:
            return None
        return torch.linalg.vector_norm(self.reduce_step_norms(ids, per_tensor_norms(grads, self.device)))

    def last_global_norm(self) -> torch.Tensor:
        """The global gradient norm of the step just committed, as a device scalar (no host read)."""
        norms = self._ring[self._rows - 1, self._layout.columns("g_norm")]
        norms = torch.where(torch.isnan(norms), 0.0, norms)
        return torch.linalg.vector_norm(self.reduce_step_norms(range(len(self._params)), norms))

    @torch.no_grad()
    def record_guards(
        self,
        norm_after: torch.Tensor,
        coef: torch.Tensor,
        threshold: torch.Tensor | None,
        skipped: torch.Tensor | bool,
        rolled_back: bool,
    ) -> None:
        """What the guards did at the step just committed (0-d device tensors; no host read)."""
        self._buffer.put_guards(self._rows - 1, norm_after, coef, threshold, skipped)
        self._host.rolled[self._rows - 1] = 1.0 if rolled_back else 0.0

    @torch.no_grad()
    def record_amp(self, scale: torch.Tensor | None, skipped: torch.Tensor | bool, grads_scaled: bool = False) -> None:
        """GradScaler's part in the step just committed: its loss scale (a device tensor), whether it
        skipped the step (a device flag or a host bool), and whether the gradients the statistics were
        taken from still carry the scale (fused optimizers unscale inside their kernel), in which case
        the flush divides them by it. No host read."""
        self._buffer.put_amp(self._rows - 1, scale, skipped)
        self._host.grads_scaled[self._rows - 1] = grads_scaled and scale is not None

    @property
    def execution_order(self) -> list[int] | None:
        """Indices of the tapped layers in the order their modules ran, once a tapped forward has
        completed (None before, and without a tap)."""
        tap = self._tap
        return list(tap.order) if tap is not None and tap.order_complete else None

    @property
    def activation_note(self) -> str | None:
        """Why activation statistics are off for this stream, if they are."""
        return self._tap.off_reason if self._tap is not None else None

    @property
    def activation_tap_attached(self) -> bool:
        """Whether the activation hooks are on the model now (False without a tap)."""
        return self._tap is not None and self._tap.attached

    def turn_off_activations(self, reason: str) -> None:
        """Stop the activation statistics (its hooks come off); ``reason`` goes into meta.json."""
        if self._tap is not None:
            self._tap.turn_off(reason)

    def remove_hooks(self) -> None:
        """Take the activation hooks off the model (the watch is closing)."""
        if self._tap is not None:
            self._tap.remove()

    # -- loss ---------------------------------------------------------------------------------------

    def _write_loss(self, row: int, loss: torch.Tensor | float) -> None:
        self._host.loss_logged[row] = 1  # so a logged NaN loss is told apart from no loss at all
        self._buffer.put_loss(row, loss)

    @torch.no_grad()
    def log_loss(self, loss: torch.Tensor | float) -> None:
        """Attach ``loss`` to the latest optimizer step (before the first step: to the first)."""
        if self._rows:
            self._write_loss(self._rows - 1, loss)
        else:
            self._pending_loss = loss

    def stage_loss(self, loss: torch.Tensor | float) -> None:
        """Attach ``loss`` to the *next* optimizer step (the runner calls this at ``backward()``)."""
        self._pending_loss = loss

    # -- flush --------------------------------------------------------------------------------------

    def flush(self, reduce: bool = True) -> None:
        """Copy the used rows to the host (one transfer), derive the statistics, hand them to the sink.

        Under data parallelism the window is first summed over the ranks (one all_reduce), unless
        ``reduce`` is False: a flush that only this rank makes (an error, a crash, an interrupt) must
        not start a collective the others never join. Such a window holds this rank's own numbers.
        """
        n = self._rows
        host = self._host
        n_hist = len(host.hist_steps)
        if n == 0:
            return
        used = self._buffer.used(n, n_hist)
        if self._reducer is not None and world() is None:
            # The process group ended before this flush (destroyed without gradwatch's wrapper):
            # there is no one left to sum with; this rank's own numbers are all there is.
            self._reducer = None
            reduce = False
            print("gradwatch: the process group ended before the last flush; its last "
                  f"{n} steps hold this rank's own statistics (close the watch before destroy_process_group()).",
                  file=sys.stderr)
        if self._reducer is not None and not reduce:
            self.local_windows.append((int(host.steps[0]), int(host.steps[n - 1])))
        self.last_flush_reduced = self._reducer is not None and reduce
        if self._reducer is not None and reduce:
            # One all_reduce of the window over the ranks; its result crosses to the host once.
            sampled_rows = host.hist_rows(n).tolist()  # sync-ok: numpy
            ring, hist = self._reducer.reduce_window(self._ring[:n], self._buffer.hist[:n_hist], host.loss_logged, sampled_rows)
            chunk = derive(ring, n, hist, host, self._layout, self._numel)
            # Every rank has summed this window: it is done with, whatever the sink makes of it (a
            # retry would sum it again, alone, with a size the others do not have).
            self._clear(used)
            self._sink(chunk)
            return
        ring, hist = self._buffer.to_host(used, n, n_hist)
        self._sink(derive(ring, n, hist, host, self._layout, self._numel))
        # Only once the window is stored: if the sink failed, the next flush tries it again.
        self._clear(used)

    def _clear(self, used: int) -> None:
        self._buffer.clear(used)
        self._rows = 0
        self._host.hist_steps = []
