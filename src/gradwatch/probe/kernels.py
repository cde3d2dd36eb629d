"""Device kernels: the reductions the probe queues, each a few launches over a list of tensors that
share a device and dtype, none of them read on the host.
"""

from __future__ import annotations

import functools
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


_CHUNK = 1 << 22  # elements per scratch pass: bounds a group's scratch at 21 MiB
#: Tensors up to this many elements get exact float64 moments; larger ones the cheap ones (see moments()).
EXACT_MOMENTS_MAX = 1 << 16
_PARTIAL = 1024  # elements per float32 partial sum of a large tensor


def to_device(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host numbers as a tensor on ``device`` without a blocking copy (from pinned memory on CUDA)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


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
        sizes = [local_tensor(p).numel() for p in params]
        size = min(max(sizes), _CHUNK)
        self.scratch = torch.empty(size, dtype=torch.float32, device=self.device)
        # float64 sums are only taken of small tensors (see moments()): their scratch is small too.
        self.scratch64 = torch.empty(max([n for n in sizes if n <= EXACT_MOMENTS_MAX], default=0),
                                     dtype=torch.float64, device=self.device)
        # The exponent bytes bincount reads on CPU (None: not this device, or a build that narrows otherwise).
        self.scratch8 = torch.empty(size, dtype=torch.uint8) if self.device.type == "cpu" and _bytes_wrap() else None
        # The pre-step copy of the weights for ‖Δw‖. On CPU it is kept between sampled steps:
        # a fresh model-sized allocation there costs page faults that dwarf the copy itself. On
        # accelerators the caching allocator reuses memory, so the copy lives only for one step.
        self.keep_snapshot = self.device.type == "cpu"
        self.snapshot: list[torch.Tensor] | None = None
        self._constants: dict[tuple[float, ...], torch.Tensor] = {}

    def constant(self, values: list[float]) -> torch.Tensor:
        """``values`` as a float64 tensor on the group's device, copied there once."""
        key = tuple(values)
        t = self._constants.get(key)
        if t is None:
            t = self._constants[key] = to_device(values, torch.float64, self.device)
        return t

    @property
    def weights(self) -> list[torch.Tensor]:
        if self._sharded:
            return [local_tensor(p.detach()) for p in self.params]
        return self._weights

    def gradients(self) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
        """The layers that have a dense gradient now: their ids, parameters and gradients (this
        rank's part of them)."""
        ids, params, grads = [], [], []
        sharded = self._sharded
        for i, p in zip(self.layer_ids, self.params):
            g = p.grad
            if g is not None and not g.is_sparse:
                ids.append(i)
                grads.append(local_tensor(g) if sharded else g)
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


def partial_sum(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``Σx`` as float32 sums of 1024 consecutive elements combined in float64 (a float64 0-d tensor):
    one pass over ``x``, where the exact float64 sum costs a copy to float64 and a second pass.
    Its error is that of a 1024-element float32 sum: about 1e-7 of ``Σ|x|`` (so a mean that cancels
    to ~0 keeps its sign and order of magnitude only above ~1e-7 of the mean absolute value)."""
    parts = []
    for c in _chunks(x):
        if c.dtype != torch.float32:
            c = scratch[: c.numel()].copy_(c)
        rows = c.numel() // _PARTIAL
        parts.append(c[: rows * _PARTIAL].view(rows, _PARTIAL).sum(1).to(torch.float64).sum())
        if rows * _PARTIAL < c.numel():
            parts.append(c[rows * _PARTIAL :].to(torch.float64).sum())
    return torch.stack(parts).sum() if len(parts) > 1 else parts[0]


def moments(tensors: Sequence[torch.Tensor], norms: torch.Tensor,
            group: "ParamGroup") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(Σx, ‖x − x̄‖₂)`` of each tensor, given their L2 ``norms`` (a float32 device tensor, same order).

    Tensors of up to ``EXACT_MOMENTS_MAX`` elements take :func:`exact_moments` (a LayerNorm weight of
    ones keeps a std of exactly 0; a softmax bias gradient that sums to ~0 keeps its exact sum).
    Larger ones, where those two passes through float64 are most of a sampled step's cost, take
    :func:`partial_sum` and the centred norm from ``‖x − x̄‖² = ‖x‖² − (Σx)²/n`` in float64, with the
    norm already computed: no pass of their own. That identity cancels when the mean dominates: the
    centred norm's relative error is about ``ε·‖x‖²/‖x − x̄‖²`` with ``ε`` the norm's (a few 1e-6),
    i.e. ~1e-6 where ``|x̄| <= std`` and 1e-2 where the std is 1% of the mean.
    """
    sums: list[torch.Tensor] = []
    cnorms: list[torch.Tensor | None] = []
    big: list[int] = []
    for k, x in enumerate(tensors):
        if x.numel() <= EXACT_MOMENTS_MAX:
            s, c = exact_moments(x, group.scratch, group.scratch64)
            sums.append(s)
            cnorms.append(c)
        else:
            sums.append(partial_sum(x, group.scratch))
            cnorms.append(None)
            big.append(k)
    if big:
        s = torch.stack([sums[k] for k in big])
        if len(big) < len(tensors):
            each = norms.unbind()
            norms = torch.stack([each[k] for k in big])
        sq = norms.to(device=s.device, dtype=torch.float64) ** 2
        centred = torch.sqrt(torch.clamp(sq - s * s / group.constant([1.0 * tensors[k].numel() for k in big]), min=0.0))
        for k, c in zip(big, centred.unbind()):
            cnorms[k] = c
    return sums, cnorms  # type: ignore[return-value]


def device_counts(exp: torch.Tensor) -> torch.Tensor:
    """``bincount(exp, minlength=EXP_BINS)`` without waiting for the device: CUDA's ``bincount`` reads
    ``exp.max()`` on the host to size its result (a sync per call, two per layer on a sampled step,
    seen with ``torch.cuda.set_sync_debug_mode``); ``histc`` over the fixed range ``[0, EXP_BINS)``
    has unit-wide bins and never reads a value back. Its float32 counts are exact: a chunk holds at
    most ``_CHUNK`` < 2**24 values."""
    return torch.histc(exp.to(torch.float32), bins=EXP_BINS, min=0, max=EXP_BINS).to(torch.int64)


@functools.cache
def _bytes_wrap() -> bool:
    """Whether this build narrows int32 to uint8 modulo 256 (C's conversion; a saturating vector
    path would not): checked once, when a probe is set up, on enough values to take the vectorised copy."""
    x = torch.arange(-2048, 2048, 7, dtype=torch.int32)
    return bool(torch.equal(torch.empty(x.numel(), dtype=torch.uint8).copy_(x).to(torch.int32), x & 0xFF))  # sync-ok: CPU, once


def exponent_counts(g: torch.Tensor, scratch: torch.Tensor, scratch8: torch.Tensor | None = None) -> torch.Tensor:
    """Counts of the float32 exponent field of every element: a log2 histogram of |g| from the bits
    (integer shift and mask into a scratch, then bincount; no log, no float compare)."""
    bits = scratch.view(torch.int32)
    counts = None
    for c in _chunks(g):
        c32 = c if c.dtype == torch.float32 else c.to(torch.float32)
        shifted = torch.bitwise_right_shift(c32.view(torch.int32), 23, out=bits[: c32.numel()])
        if c32.device.type == "cpu" and scratch8 is not None:
            # Narrowed to one byte, the (sign, exponent) word keeps just the exponent (two's complement
            # wraps the sign away), and bincount over bytes costs half what it does over int32 here.
            exp8 = scratch8[: c32.numel()].copy_(shifted)
            part = torch.bincount(exp8, minlength=EXP_BINS)
        elif c32.device.type == "cpu":
            part = torch.bincount(shifted.bitwise_and_(0xFF), minlength=EXP_BINS)
        else:
            part = device_counts(shifted.bitwise_and_(0xFF))
        counts = part if counts is None else counts + part
    return counts if counts is not None else torch.zeros(EXP_BINS, dtype=torch.int64, device=g.device)
