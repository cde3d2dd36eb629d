"""Statistics across data-parallel ranks: DDP (replicated gradients) and FSDP2 (sharded DTensors).

Every rank computes the same per-layer raw sums as a single process would, but of the gradient it
holds: the whole gradient under DDP (identical on every rank after its all-reduce), its shard under
FSDP2 (``DTensor.to_local()``, never ``full_tensor()``). A window of them then crosses between the
ranks in **one** ``all_reduce(SUM)`` per flush, in float64, after a transform that makes every
statistic a sum:

* norms are summed as squares (``‖g‖² = Σ‖g_shard‖²``);
* the centred norm ``‖g − ḡ‖`` of each shard is sent as ``c² + s²/n`` (``s`` its sum, ``n`` its size),
  so the whole tensor's is ``Σ(c² + s²/n) − (Σs)²/N`` — Chan's parallel variance, with the
  cancellation between shard means in float64 rather than between elements;
* the largest ``|g|`` cannot be summed: each rank writes its value into its own slot of a
  ``world``-wide block (zeros elsewhere), so the sum is a gather and the host takes the maximum;
* each layer's sum is weighted by ``1 / replicas`` (how many ranks hold the same values: the world
  size for a plain or replicated tensor, world / shards for a sharded DTensor), so a DDP gradient is
  counted once and an HSDP one once per shard;
* activation fractions and the loss (each rank has its own batch) are averaged over ranks; the loss
  only over ranks that logged one.

When a guard needs global numbers at every step, :meth:`WindowReducer.reduce_norms` does the same for
the per-layer norms: one ``all_reduce`` per step, so clip coefficients and skip decisions are the
same on every rank (a NaN on one rank makes every rank skip).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from .layout import LOSS, STEP_SLOTS, RingLayout

try:  # torch.distributed is optional in torch builds
    import torch.distributed as dist
except ImportError:  # pragma: no cover - builds without distributed support
    dist = None  # type: ignore[assignment]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - older torch or no distributed support
        return None
    return DTensor


_DTENSOR = _dtensor_type()


def is_dtensor(t: object) -> bool:
    return _DTENSOR is not None and isinstance(t, _DTENSOR)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds: a DTensor's local shard (a view, no communication), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def world() -> tuple[int, int] | None:
    """``(rank, world size)`` of the default process group when one is initialised with more than
    one rank, else None."""
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    size = dist.get_world_size()
    return (dist.get_rank(), size) if size > 1 else None


def process_rank() -> int:
    """This process's rank: from the process group once initialised, else from torchrun's ``RANK``
    when ``WORLD_SIZE`` says there are several processes (some launchers set ``RANK`` for
    single-process jobs too)."""
    w = world()
    if w is not None:
        return w[0]
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return int(os.environ.get("RANK", "0"))
    except ValueError:
        pass
    return 0


_group: tuple[int, object] | None = None


def gradwatch_group() -> object:
    """gradwatch's own process group over every rank, made once per default group (by every rank at
    the same point: the first optimizer step). Keeping gradwatch's collectives out of the default
    group means a mismatch could never pair them with DDP's or FSDP's own traffic."""
    global _group
    default = dist.group.WORLD
    if _group is None or _group[0] != id(default):
        _group = (id(default), dist.new_group())
    return _group[1]


def replicas(p: torch.Tensor, world_size: int) -> int:
    """How many ranks hold the same values of ``p``: all of them for a plain tensor (DDP), world over
    the number of shards for a DTensor (1 under FSDP2 over the whole world)."""
    if not is_dtensor(p):
        return world_size
    shards = 1
    mesh = p.device_mesh  # type: ignore[attr-defined]
    for dim, placement in enumerate(p.placements):  # type: ignore[attr-defined]
        if placement.is_shard():
            shards *= mesh.size(dim)
    return max(1, world_size // shards)


class WindowReducer:
    """Combines a probe's raw per-layer sums over the ranks (see the module docstring).

    Args:
        params: the probe's parameters in layer order (plain tensors or DTensors).
        rank, world_size: this process and the default group's size.
        layout: the probe's ring layout.
    """

    def __init__(self, params: Sequence[torch.Tensor], rank: int, world_size: int, layout: RingLayout,
                 device: torch.device):
        self.rank, self.world = rank, world_size
        self.group = gradwatch_group()
        self.layout = layout
        self.device = device
        n = len(params)
        self.n = n
        reps = np.array([replicas(p, world_size) for p in params], np.float64)
        self.sharded = any(r < world_size for r in reps.tolist())  # sync-ok: numpy, at set-up
        self._weight = torch.tensor(1.0 / reps, dtype=torch.float64, device=device)  # per layer
        local_n = np.array([local_tensor(p).numel() for p in params], np.float64)
        self._local_n = torch.tensor(np.maximum(local_n, 1.0), dtype=torch.float64, device=device)
        self._numel = np.array([p.numel() for p in params], np.float64)  # global sizes
        #: all_reduce calls made (tests count them: one per flush, one per guarded step).
        self.collectives = 0
        #: Size of the latest flush's all_reduce, in bytes.
        self.last_bytes = 0
        self._step_weights: dict[tuple[int, ...], torch.Tensor] = {}

    # -- per step (guards) --------------------------------------------------------------------------

    def reduce_norms(self, layer_ids: Sequence[int], norms: torch.Tensor) -> torch.Tensor:
        """The global per-layer norms from this rank's (float32, same order as ``layer_ids``)."""
        key = tuple(layer_ids)
        w = self._step_weights.get(key)
        if w is None:  # once per pattern of layers with gradients: no per-step host-to-device copy
            idx = torch.as_tensor(list(layer_ids), dtype=torch.long).to(self._weight.device)
            w = self._step_weights[key] = self._weight.index_select(0, idx).to(norms.device)
        sq = norms.to(torch.float64).square() * w
        self.collectives += 1
        dist.all_reduce(sq, group=self.group)
        return sq.sqrt().to(torch.float32)

    # -- per flush ----------------------------------------------------------------------------------

    def reduce_window(self, ring: torch.Tensor, hist: torch.Tensor, loss_logged: np.ndarray,
                      sampled_rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Sum one window over the ranks; return the host (ring rows, histogram rows) in float64 as a
        single process would have produced them.

        Args:
            ring: the used rows of the device ring (rows x width, float32).
            hist: the used rows of the exponent histograms (rows x layers x bins).
            loss_logged: per row, whether this rank logged a loss.
            sampled_rows: ring rows of the sampled steps (those with min/max values).
        """
        n_rows, width = ring.shape
        L, W = self.n, self.world
        r = ring.to(torch.float64)
        w = self._weight[None, :]
        # Norms -> weighted squares.
        for name in ("g_norm", "w_norm", "dw_norm"):
            b = self.layout.block(r, name)
            b.copy_(b.square() * w)
        # Centred norms -> c² + s²/n per shard; sums weighted.
        for c_name, s_name in (("g_cnorm", "g_sum"), ("w_cnorm", "w_sum")):
            c, s = self.layout.block(r, c_name), self.layout.block(r, s_name)
            c.copy_((c.square() + s.square() / self._local_n[None, :]) * w)
            s.mul_(w)
        # Activations: the mean over ranks.
        for name in ("a_dead", "a_sat", "a_const"):
            self.layout.block(r, name).div_(W)
        # Loss: summed where logged, with the count of ranks that logged it.
        logged = torch.as_tensor(loss_logged[:n_rows], dtype=torch.float64).to(r.device)
        loss = r[:, LOSS]
        loss.copy_(torch.where(logged > 0, loss, 0.0))
        # Max |g|: a gather through the sum, only for the sampled rows (the others are NaN anyway).
        rows = torch.as_tensor(list(sampled_rows), dtype=torch.long).to(r.device)
        gmin, gmax = self.layout.block(r, "g_min"), self.layout.block(r, "g_max")
        maxabs = torch.maximum(-gmin.index_select(0, rows), gmax.index_select(0, rows))
        gather = torch.zeros((W, len(sampled_rows), L), dtype=torch.float64, device=r.device)
        gather[self.rank] = maxabs
        # Guard slots and the learning rate are the same on every rank: averaged back unchanged.
        steps_part = r[:, :STEP_SLOTS]
        others = [i for i in range(STEP_SLOTS) if i != LOSS]
        steps_part[:, others] = steps_part[:, others] / W
        h = hist.to(torch.float64) * self._weight[None, :, None]
        packed = torch.cat([r.reshape(-1), h.reshape(-1), gather.reshape(-1), logged])
        self.collectives += 1
        self.last_bytes = packed.numel() * packed.element_size()
        dist.all_reduce(packed, group=self.group)
        host = packed.cpu().numpy()  # sync-ok: the flush
        k = n_rows * width
        ring_h = host[:k].reshape(n_rows, width).copy()
        hist_h = np.rint(host[k : k + h.numel()].reshape(h.shape))  # counts: whole again after the 1/replicas weights
        off = k + h.numel()
        gathered = host[off : off + gather.numel()].reshape(gather.shape)
        n_logged = host[off + gather.numel() :]
        return self._undo(ring_h, gathered, n_logged, sampled_rows), hist_h

    def _undo(self, ring: np.ndarray, gathered: np.ndarray, n_logged: np.ndarray,
              sampled_rows: Sequence[int]) -> np.ndarray:
        def block(name: str) -> np.ndarray:
            return self.layout.block(ring, name)

        with np.errstate(invalid="ignore", divide="ignore"):
            for name in ("g_norm", "w_norm", "dw_norm"):
                b = block(name)
                b[:] = np.sqrt(b)
            numel = self._numel[None, :]
            for c_name, s_name in (("g_cnorm", "g_sum"), ("w_cnorm", "w_sum")):
                c, s = block(c_name), block(s_name)
                c[:] = np.sqrt(np.maximum(c - s * s / numel, 0.0))
            loss = ring[:, LOSS]
            loss[:] = np.where(n_logged > 0, loss / np.maximum(n_logged, 1.0), np.nan)
            gmin, gmax = block("g_min"), block("g_max")
            gmin[:] = np.nan
            gmax[:] = np.nan
            if len(sampled_rows):
                # An empty shard wrote NaN: the maximum over the ranks that hold values.
                finite_or_nan = np.where(np.isnan(gathered), -np.inf, gathered).max(axis=0)
                any_nan = np.isnan(gathered).all(axis=0)
                best = np.where(any_nan, np.nan, finite_or_nan)
                gmax[list(sampled_rows)] = best
                gmin[list(sampled_rows)] = -best
        return ring
