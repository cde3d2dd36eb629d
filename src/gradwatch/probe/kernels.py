"""Device kernels: the reductions the probe queues, each a few launches over a list of tensors that
share a device and dtype, none of them read on the host.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .distributed import is_dtensor, local_tensor
from .layout import EXP_BINS

def by_device_dtype(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """The indices of ``tensors`` grouped by (device, dtype), in order of first appearance: a foreach
    kernel takes one group per launch."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())


_CHUNK = 1 << 22  # elements per scratch pass: bounds a group's scratch at 48 MiB


class ParamGroup:
    """Layers whose parameters share a device and dtype: one foreach launch each."""

    @classmethod
    def split(cls, params: Sequence[torch.Tensor]) -> list["ParamGroup"]:
        """``params`` (in layer order) grouped by (device, dtype), in order of first appearance."""
        return [cls(ids, [params[i] for i in ids]) for ids in by_device_dtype(params)]

    def __init__(self, layer_ids: list[int], params: list[torch.Tensor]):
        self.layer_ids = layer_ids
        self.params = params
        # FSDP2 parameters are DTensors: statistics are of this rank's shard (a local view, taken
        # afresh at each use because FSDP may re-point it), combined over the ranks at the flush.
        self._sharded = any(is_dtensor(p) for p in params)
        self._weights = [p.detach() for p in params]
        self.device = params[0].device
        size = min(max(local_tensor(p).numel() for p in params), _CHUNK)
        self.scratch = torch.empty(size, dtype=torch.float32, device=self.device)
        self.scratch64 = torch.empty(size, dtype=torch.float64, device=self.device)
        # The pre-step copy of the weights for ‖Δw‖. On CPU it is kept between sampled steps:
        # a fresh model-sized allocation there costs page faults that dwarf the copy itself. On
        # accelerators the caching allocator reuses memory, so the copy lives only for one step.
        self.keep_snapshot = self.device.type == "cpu"
        self.snapshot: list[torch.Tensor] | None = None

    @property
    def weights(self) -> list[torch.Tensor]:
        if self._sharded:
            return [local_tensor(p.detach()) for p in self.params]
        return self._weights

    def gradients(self) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
        """The layers that have a dense gradient now: their ids, parameters and gradients (this
        rank's part of them)."""
        ids, params, grads = [], [], []
        for i, p in zip(self.layer_ids, self.params):
            g = p.grad
            if g is not None and not g.is_sparse:
                ids.append(i)
                grads.append(local_tensor(g))
                params.append(p)
        return ids, params, grads

    def take_snapshot(self) -> list[torch.Tensor]:
        if not self.keep_snapshot:
            return torch._foreach_mul(self.weights, 1.0)
        if self.snapshot is None:
            self.snapshot = [torch.empty_like(w) for w in self.weights]
        torch._foreach_copy_(self.snapshot, self.weights)
        return self.snapshot


def l2_norms(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """L2 norm of each tensor (one foreach launch; all share a device and dtype): accumulated in
    float32 for float32 and narrower types, in float64 for float64 (which cannot be narrowed in
    ``_foreach_norm``)."""
    if tensors and tensors[0].dtype == torch.float64:
        return torch._foreach_norm(tensors, 2)
    return torch._foreach_norm(tensors, 2, dtype=torch.float32)


def global_norm(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """The L2 norm of all ``tensors`` together (as ``clip_grad_norm_`` defines it), a float32 scalar
    on ``device``: one foreach launch per (device, dtype), no host read. None for no tensors."""
    norms = [n.to(device=device, dtype=torch.float32)
             for ids in by_device_dtype(tensors) for n in l2_norms([tensors[i] for i in ids])]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else None


def per_tensor_norms(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The L2 norm of each tensor, in order, stacked as float32 on ``device`` (one foreach launch per
    (device, dtype) group; no host read)."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for ids in by_device_dtype(tensors):
        for i, n in zip(ids, l2_norms([tensors[i] for i in ids])):
            out[i] = n.to(device=device, dtype=torch.float32)
    return torch.stack(out)  # type: ignore[arg-type]


def _chunks(x: torch.Tensor) -> list[torch.Tensor]:
    flat = x.detach().reshape(-1)
    return [flat[i : i + _CHUNK] for i in range(0, flat.numel(), _CHUNK)]


def exact_moments(x: torch.Tensor, scratch: torch.Tensor, scratch64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σx, ‖x − x̄‖₂)``: the sum accumulated in float64, the centred norm from a second pass over
    ``x − x̄``; both through preallocated scratch (``sum(dtype=float64)`` would allocate a float64
    copy of the whole tensor each time, and on CPU its page faults cost more than the sum).

    The float64 sum keeps a cancelling mean exact (softmax output-bias gradients sum to 0: in float32
    their mean is pure rounding noise); the second pass has none of the cancellation of
    ``E[x²] − x̄²`` (a LayerNorm weight of ones has std exactly 0).
    """
    n = x.numel()
    if n == 0:
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        return zero, zero
    chunks = _chunks(x)
    parts = [scratch64[: c.numel()].copy_(c).sum() for c in chunks]
    total = torch.stack(parts).sum() if len(parts) > 1 else parts[0]
    mean = (total / n).to(torch.float32)
    sq = [torch.linalg.vector_norm(torch.sub(c.to(torch.float32), mean, out=scratch[: c.numel()])) for c in chunks]
    return total, (torch.linalg.vector_norm(torch.stack(sq)) if len(sq) > 1 else sq[0])


def device_counts(exp: torch.Tensor) -> torch.Tensor:
    """``bincount(exp, minlength=EXP_BINS)`` without waiting for the device: CUDA's ``bincount`` reads
    ``exp.max()`` on the host to size its result (a sync per call, two per layer on a sampled step,
    seen with ``torch.cuda.set_sync_debug_mode``); ``histc`` over the fixed range ``[0, EXP_BINS)``
    has unit-wide bins and never reads a value back. Its float32 counts are exact: a chunk holds at
    most ``_CHUNK`` < 2**24 values."""
    return torch.histc(exp.to(torch.float32), bins=EXP_BINS, min=0, max=EXP_BINS).to(torch.int64)


def exponent_counts(g: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Counts of the float32 exponent field of every element: a log2 histogram of |g| from the bits
    (integer shift and mask into a scratch, then bincount; no log, no float compare)."""
    bits = scratch.view(torch.int32)
    counts = None
    for c in _chunks(g):
        c32 = c if c.dtype == torch.float32 else c.to(torch.float32)
        exp = torch.bitwise_right_shift(c32.view(torch.int32), 23, out=bits[: c32.numel()]).bitwise_and_(0xFF)
        part = torch.bincount(exp, minlength=EXP_BINS) if exp.device.type == "cpu" else device_counts(exp)
        counts = part if counts is None else counts + part
    return counts if counts is not None else torch.zeros(EXP_BINS, dtype=torch.int64, device=g.device)
