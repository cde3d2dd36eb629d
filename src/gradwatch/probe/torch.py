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

* every step: ``‖g‖₂`` and ``Σg`` — one ``_foreach_norm`` per (device, dtype) group and one sum per
  tensor, the two cheapest reductions there are (``abs().amax()`` and ``_foreach_norm(ord=inf)`` are
  an order of magnitude slower on CPU than ``aminmax``; ``var_mean`` slower still);
* sampled steps (every ``sample_every``): ``min g``, ``max g`` (one ``aminmax``), the count of exact
  zeros, the centred norm ``‖g − ḡ‖₂`` (exact std without the cancellation of ``E[g²] − ḡ²``), the
  same three for the weights, and ``‖Δw‖₂`` from the real change made by the optimizer;
* every ``hist_every`` steps: a fixed-bin histogram of ``log10|g|``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import GradwatchError
from ..store import HIST_BINS, HIST_LOG10_MAX, HIST_LOG10_MIN, LAYER_METRICS, STEP_METRICS, Chunk, LayerInfo

# ------------------------------------------------------------------------------------ layer table

#: Modules that are activation functions (seed 002's list, and the usual others).
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.RReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
    nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Threshold,
)

#: Modules that may stand between a layer and its activation without changing which one it is.
_TRANSPARENT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
)


def _activation_name(obj: object) -> str | None:
    if isinstance(obj, ACTIVATION_TYPES):
        return type(obj).__name__
    if callable(obj) and getattr(obj, "__module__", "").startswith("torch"):
        name = getattr(obj, "__name__", "")
        known = {"relu": "ReLU", "gelu": "GELU", "sigmoid": "Sigmoid", "tanh": "Tanh", "silu": "SiLU",
                 "elu": "ELU", "selu": "SELU", "leaky_relu": "LeakyReLU", "mish": "Mish"}
        return known.get(name)
    return None


def _following_activations(model: nn.Module) -> dict[str, str]:
    """Module path -> name of the activation that follows it, where the structure tells.

    Two sources: an ordered container whose next non-transparent child is an activation
    (``Sequential(Linear, BatchNorm1d, ReLU)``), and a module's own ``activation`` attribute
    (``TransformerEncoderLayer``, Keras ``Dense``). Functional calls inside ``forward`` cannot be seen
    statically; activation hooks (sampled) cover those.
    """
    found: dict[str, str] = {}
    for path, module in model.named_modules():
        own = _activation_name(getattr(module, "activation", None))
        if own and not isinstance(module, ACTIVATION_TYPES):
            if any(True for _ in module.parameters(recurse=False)):
                found[path] = own  # a Keras-style Dense: the activation follows its own kernel
            else:
                # A block such as TransformerEncoderLayer: the activation follows its first Linear.
                first = next((n for n, c in module.named_children() if isinstance(c, nn.Linear)), None)
                if first is not None:
                    found[f"{path}.{first}" if path else first] = own
        children = list(module.named_children())
        for i, (name, child) in enumerate(children):
            if isinstance(child, ACTIVATION_TYPES) or not any(True for _ in child.parameters(recurse=False)):
                continue
            for _, nxt in children[i + 1 :]:
                if isinstance(nxt, ACTIVATION_TYPES):
                    found.setdefault(f"{path}.{name}" if path else name, type(nxt).__name__)
                    break
                if not isinstance(nxt, _TRANSPARENT_TYPES):
                    break
    return found


def build_layer_table(
    model: nn.Module | None, params: Sequence[torch.Tensor]
) -> tuple[list[LayerInfo], list[torch.Tensor]]:
    """Name each parameter by its owning module path; tied parameters appear once.

    Args:
        model: the module that owns ``params`` (may be None: parameters are then named by position).
        params: the parameters to watch, in the optimizer's order.
    Returns:
        the layer table and the parameters in the same order (duplicates removed).
    """
    owner: dict[int, tuple[str, nn.Module]] = {}
    activations: dict[str, str] = {}
    if model is not None:
        for mpath, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                owner.setdefault(id(p), (f"{mpath}.{pname}" if mpath else pname, module))
        activations = _following_activations(model)
    layers: list[LayerInfo] = []
    kept: list[torch.Tensor] = []
    seen: set[int] = set()
    for i, p in enumerate(params):
        if id(p) in seen:
            continue
        seen.add(id(p))
        name, module = owner.get(id(p), (f"param.{i}", None))
        mpath = name.rpartition(".")[0]
        layers.append(
            LayerInfo(
                name=name,
                shape=tuple(p.shape),
                numel=p.numel(),
                module_type=type(module).__name__ if module is not None else "?",
                activation=activations.get(mpath),
                dtype=str(p.dtype).replace("torch.", ""),
                trainable=p.requires_grad,
            )
        )
        kept.append(p)
    return layers, kept


# ------------------------------------------------------------------------------------ the probe


@dataclass(frozen=True)
class ProbeConfig:
    """How often each tier of statistics is computed and the buffer crosses to the host.

    Args:
        flush_every: steps per device->host copy (and per store append).
        sample_every: steps between full statistics (max |g|, std, zero fraction, weights, update ratio).
        hist_every: steps between log10|g| histograms.
    """

    flush_every: int = 50
    sample_every: int = 10
    hist_every: int = 50

    def __post_init__(self) -> None:
        for name in ("flush_every", "sample_every", "hist_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise GradwatchError(f"{name} must be a positive integer; got {v!r}.")


# Raw slot blocks of a ring row: each block holds one value per layer.
_EVERY = ("g_norm", "g_sum")
_SAMPLED = ("g_min", "g_max", "g_zeros", "g_cnorm", "w_norm", "w_sum", "w_cnorm", "dw_norm")
_BLOCKS = _EVERY + _SAMPLED
_LOSS, _LR = 0, 1  # step slots at the start of a row
_STEP_SLOTS = 2


class _Group:
    """Layers whose parameters share a device and dtype: one foreach launch each."""

    def __init__(self, layer_ids: list[int], params: list[torch.Tensor]):
        self.layer_ids = layer_ids
        self.params = params
        self.weights = [p.detach() for p in params]
        self.nonempty = [p.numel() > 0 for p in params]


class TorchProbe:
    """Statistics of one optimizer's parameters, kept on the device until a flush.

    Args:
        params: parameters in layer-table order.
        layers: their layer table (for numel on the host side).
        config: schedules.
        sink: receives each flushed :class:`~gradwatch.store.Chunk` on the host.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        layers: Sequence[LayerInfo],
        config: ProbeConfig,
        sink: Callable[[Chunk], None],
    ):
        if not params:
            raise GradwatchError("there are no parameters to watch: the model or optimizer holds none.")
        self.config = config
        self.layers = list(layers)
        self._sink = sink
        self._params = list(params)
        n = len(self._params)
        self.device = self._params[0].device
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(self._params):
            groups.setdefault((p.device, p.dtype), []).append(i)
        self._groups = [_Group(ids, [self._params[i] for i in ids]) for ids in groups.values()]
        self._numel = np.array([p.numel() for p in self._params], dtype=np.float64)

        # One device buffer holds both rings, so a flush is exactly one device->host copy.
        cap = config.flush_every
        self._width = _STEP_SLOTS + len(_BLOCKS) * n
        self._hist_cap = -(-cap // config.hist_every) + 1
        ring_size = cap * self._width
        total = ring_size + self._hist_cap * n * HIST_BINS
        self._buf = torch.full((total,), math.nan, dtype=torch.float32, device=self.device)
        self._ring = self._buf[:ring_size].view(cap, self._width)
        self._hist = self._buf[ring_size:].view(self._hist_cap, n, HIST_BINS)
        pinned = self.device.type == "cuda"
        self._staging = torch.empty((total,), dtype=torch.float32, pin_memory=pinned)

        # Host-side per-row facts: known in Python already, so they never touch the device.
        self._steps = np.zeros(cap, np.int64)
        self._lr = np.full(cap, np.nan, np.float64)
        self._time = np.zeros(cap, np.float64)
        self._present = np.zeros((cap, n), bool)
        self._hist_steps: list[int] = []

        self._rows = 0  # rows of the ring in use
        self.step = 0  # optimizer steps seen
        self._t0 = time.perf_counter()
        self._index_cache: dict[tuple, torch.Tensor] = {}
        self._pending_loss: torch.Tensor | float | None = None
        self._snapshot: list[list[torch.Tensor]] | None = None
        self._lr_tensor = False

    # -- indices ------------------------------------------------------------------------------------

    def _slot_index(self, key: tuple, blocks: Sequence[str], layer_ids: Sequence[int]) -> torch.Tensor:
        """Ring columns for ``blocks`` × ``layer_ids``, built once per pattern (no per-step H2D copy)."""
        idx = self._index_cache.get(key)
        if idx is None:
            n = len(self._params)
            cols = [_STEP_SLOTS + _BLOCKS.index(b) * n + i for b in blocks for i in layer_ids]
            idx = torch.tensor(cols, dtype=torch.long, device=self.device)
            self._index_cache[key] = idx
        return idx

    # -- hook points ----------------------------------------------------------------------------------

    @torch.no_grad()
    def on_before_optimizer_step(self, lr: float | torch.Tensor | None = None) -> None:
        """Queue this step's statistics; gradients must be final."""
        if self._rows == self.config.flush_every:
            self.flush()
        row, step = self._rows, self.step
        sampled = step % self.config.sample_every == 0
        self._steps[row] = step
        self._time[row] = time.perf_counter() - self._t0
        self._lr[row] = math.nan
        self._present[row] = False
        if isinstance(lr, torch.Tensor):
            self._lr_tensor = True
        elif lr is not None:
            self._lr[row] = lr

        ring_row = self._ring[row]
        ring_row.fill_(math.nan)
        if isinstance(lr, torch.Tensor):
            ring_row[_LR].copy_(lr.detach(), non_blocking=True)
        if self._pending_loss is not None:
            self._write_loss(row, self._pending_loss)
            self._pending_loss = None

        hist = step % self.config.hist_every == 0
        if hist:
            hrow = len(self._hist_steps)
            self._hist[hrow].fill_(math.nan)
        snapshot: list[list[torch.Tensor]] = []
        for gi, group in enumerate(self._groups):
            ids, grads, full = [], [], []
            for i, p, nonempty in zip(group.layer_ids, group.params, group.nonempty):
                g = p.grad
                if g is not None and not g.is_sparse:
                    ids.append(i)
                    grads.append(g)
                    full.append(nonempty)
            self._present[row, ids] = True
            if grads:
                self._grad_stats(ring_row, gi, ids, grads, full, sampled)
                if hist:
                    self._grad_hist(hrow, ids, grads)
            if sampled:
                self._weight_stats(ring_row, gi, group)
                snapshot.append(torch._foreach_mul(group.weights, 1.0))
        self._snapshot = snapshot if sampled else None
        # Commit the row last: a step that failed half-way is never flushed as if it were whole.
        self._rows = row + 1
        self.step = step + 1
        if hist:
            self._hist_steps.append(step)

    def _grad_stats(
        self, ring_row: torch.Tensor, gi: int, ids: list[int], grads: list[torch.Tensor],
        full: list[bool], sampled: bool,
    ) -> None:
        f32 = torch.float32
        norms = torch._foreach_norm(grads, 2, dtype=f32)
        # Sums in float64: a gradient's mean is often a small difference of large terms.
        sums = [g.sum(dtype=torch.float64) for g in grads]
        key = (gi, tuple(ids))
        ring_row.index_copy_(
            0, self._slot_index(("g",) + key, _EVERY, ids), torch.stack([*norms, *[s.to(f32) for s in sums]]).to(self.device)
        )
        if not sampled:
            return
        # aminmax raises on empty tensors: those keep NaN for min and max.
        mm = [torch.aminmax(g) for g, f in zip(grads, full) if f]
        if mm:
            mm_ids = [i for i, f in zip(ids, full) if f]
            vals = [m.min.to(f32) for m in mm] + [m.max.to(f32) for m in mm]
            ring_row.index_copy_(0, self._slot_index(("mm",) + key, ("g_min", "g_max"), mm_ids), torch.stack(vals).to(self.device))
        zeros = [(g == 0).sum().to(f32) for g in grads]
        cnorms = [torch.linalg.vector_norm(g.to(f32) - (s / max(g.numel(), 1)).to(f32)) for g, s in zip(grads, sums)]
        ring_row.index_copy_(0, self._slot_index(("gz",) + key, ("g_zeros", "g_cnorm"), ids), torch.stack(zeros + cnorms).to(self.device))

    def _weight_stats(self, ring_row: torch.Tensor, gi: int, group: _Group) -> None:
        ws = group.weights
        f32 = torch.float32
        norms = torch._foreach_norm(ws, 2, dtype=f32)
        sums = [w.sum(dtype=torch.float64) for w in ws]
        cnorms = [torch.linalg.vector_norm(w.to(f32) - (s / max(w.numel(), 1)).to(f32)) for w, s in zip(ws, sums)]
        idx = self._slot_index(("w", gi), ("w_norm", "w_sum", "w_cnorm"), group.layer_ids)
        ring_row.index_copy_(0, idx, torch.stack([*norms, *[s.to(f32) for s in sums], *cnorms]).to(self.device))

    def _grad_hist(self, hrow: int, ids: list[int], grads: list[torch.Tensor]) -> None:
        # Zeros map to -inf and are clamped into the first bin; inf into the last; NaN is dropped.
        hs = [
            torch.histc(
                g.detach().abs().to(torch.float32).log10_().clamp_(HIST_LOG10_MIN, HIST_LOG10_MAX),
                bins=HIST_BINS, min=HIST_LOG10_MIN, max=HIST_LOG10_MAX,
            )
            for g in grads
        ]
        key = ("h", tuple(ids))
        idx = self._index_cache.get(key)
        if idx is None:
            idx = self._index_cache[key] = torch.tensor(ids, dtype=torch.long, device=self.device)
        self._hist[hrow].index_copy_(0, idx, torch.stack(hs).to(self.device))

    @torch.no_grad()
    def on_after_optimizer_step(self) -> None:
        """On sampled steps, record ‖Δw‖ of the update the optimizer actually made."""
        if self._snapshot is None:
            return
        ring_row = self._ring[self._rows - 1]  # the row that on_before_optimizer_step committed
        for gi, (group, before) in enumerate(zip(self._groups, self._snapshot)):
            torch._foreach_sub_(before, group.weights)
            dn = torch._foreach_norm(before, 2, dtype=torch.float32)
            ring_row.index_copy_(0, self._slot_index(("dw", gi), ("dw_norm",), group.layer_ids), torch.stack(dn).to(self.device))
        self._snapshot = None

    # -- loss -------------------------------------------------------------------------------------

    def _write_loss(self, row: int, loss: torch.Tensor | float) -> None:
        if isinstance(loss, torch.Tensor):
            self._ring[row, _LOSS].copy_(loss.detach().reshape(()), non_blocking=True)
        else:
            self._ring[row, _LOSS].fill_(loss)

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

    # -- flush ------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Copy the used rows to the host (one transfer), derive the statistics, hand them to the sink."""
        n = self._rows
        n_hist = len(self._hist_steps)
        if n == 0 and n_hist == 0:
            return
        used = self._ring[:n].numel() if n_hist == 0 else self._buf.numel()
        self._staging[:used].copy_(self._buf[:used], non_blocking=self._staging.is_pinned())
        if self._staging.is_pinned():
            torch.cuda.current_stream(self.device).synchronize()  # sync-ok: the one sync per flush
        host = self._staging.numpy()  # sync-ok: host memory, after the one copy
        ring = host[: self._ring.numel()].reshape(self._ring.shape)[:n].astype(np.float64)
        chunk = self._derive(ring, n)
        if n_hist:
            hist = host[self._ring.numel() :].reshape(self._hist.shape)[:n_hist]
            chunk.hist_steps = np.array(self._hist_steps, np.int64)
            chunk.hist = hist.copy()
        self._rows = 0
        self._hist_steps = []
        self._sink(chunk)

    def _derive(self, ring: np.ndarray, n: int) -> Chunk:
        L = len(self._params)

        def block(name: str) -> np.ndarray:
            start = _STEP_SLOTS + _BLOCKS.index(name) * L
            return ring[:, start : start + L]

        numel = self._numel[None, :]
        present = self._present[:n]
        with np.errstate(divide="ignore", invalid="ignore"):
            g_norm = np.where(present, block("g_norm"), np.nan)
            g_sum = block("g_sum")
            nonfinite = ~np.isfinite(g_norm) | ~np.isfinite(g_sum)
            w_norm = block("w_norm")
            layer = {
                "grad_norm": g_norm,
                "grad_rms": g_norm / np.sqrt(numel),
                "grad_mean": g_sum / numel,
                "grad_std": block("g_cnorm") / np.sqrt(numel),
                "grad_maxabs": np.maximum(-block("g_min"), block("g_max")),
                "grad_nonfinite": np.where(present, nonfinite, np.nan),
                "grad_zero_frac": block("g_zeros") / numel,
                "weight_norm": w_norm,
                "weight_rms": w_norm / np.sqrt(numel),
                "weight_mean": block("w_sum") / numel,
                "weight_std": block("w_cnorm") / np.sqrt(numel),
                "update_ratio": block("dw_norm") / w_norm,
            }
            # The global norm over the layers that have a gradient, as clip_grad_norm_ defines it.
            global_norm = np.sqrt(np.sum(np.where(present, g_norm, 0.0) ** 2, axis=1))
            global_norm[~present.any(axis=1)] = np.nan
        lr = self._lr[:n].copy()
        if self._lr_tensor:
            lr = np.where(np.isnan(lr), ring[:, _LR], lr)
        steps = {"loss": ring[:, _LOSS], "grad_norm": global_norm, "lr": lr, "time": self._time[:n].copy()}
        assert set(steps) == set(STEP_METRICS) and set(layer) == set(LAYER_METRICS)
        return Chunk(steps=self._steps[:n].copy(), step_values=steps, layer_values=layer)
