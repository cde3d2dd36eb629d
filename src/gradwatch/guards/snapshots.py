"""Snapshots of an optimizer's parameters (and its model's buffers) and its state, for :class:`Rollback`.

A :class:`SnapshotStore` takes copies without a host read (device-to-device, or into pinned host
memory), or writes them to a directory with ``torch.save``; it restores one by queueing copies on the
device. Which snapshots to keep, and when one is good, is Rollback's business.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import GradwatchError
from ..probe.distributed import local_tensor, world


@dataclass
class Saved:
    """A copy of one optimizer-state tensor and the device its original lives on."""

    copy: torch.Tensor
    device: torch.device


@dataclass
class Snapshot:
    step: int
    good: bool = False
    tensors: list[torch.Tensor] = field(default_factory=list)  # copies of the model's tensors
    file: Path | None = None  # storage on disk: the tensors and state live in this file instead
    # id(param) -> its optimizer state; tensors as (copy, the device the original lives on)
    state: dict[int, dict[str, Any]] = field(default_factory=dict)


class SnapshotStore:
    """Takes and restores snapshots of ``optimizer``'s parameters and state; with ``model``, its buffers
    (BatchNorm statistics) too when the model's trainable parameters are all this optimizer's — with
    several optimizers on one model each restores only its own.

    ``storage`` is ``"device"``, ``"cpu"`` or a directory (see :class:`Rollback`). Released snapshots
    kept in memory are reused for the next ones (no new allocation per snapshot)."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module | None, storage: str,
                 say: Callable[[str], None]):
        self.optimizer = optimizer
        self.storage = storage
        self._say = say
        self._disk_warned = False
        self._pool: list[Snapshot] = []
        self.opt_params = [p for g in optimizer.param_groups for p in g["params"]]
        tensors: list[torch.Tensor] = []
        seen: set[int] = set()
        mine = {id(p) for p in self.opt_params}
        buffers: list[torch.Tensor] = []
        if model is not None and all(id(p) in mine for p in model.parameters() if p.requires_grad):
            buffers = [b for _, b in model.named_buffers()]  # persistent or not
        for t in self.opt_params + buffers:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                tensors.append(t)
        #: The tensors a snapshot copies besides the optimizer state (parameters, then buffers).
        self.tensors = tensors
        if self.on_disk:
            try:
                Path(storage).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise GradwatchError(f"Rollback cannot keep snapshots in {storage} ({e.strerror}); "
                                     "give a writable directory, or storage='cpu'.") from None

    @property
    def on_disk(self) -> bool:
        return self.storage not in ("device", "cpu")

    def _copy_of(self, t: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
        t = local_tensor(t)  # FSDP2: each rank keeps its own shard
        if old is not None and old.shape == t.shape and old.dtype == t.dtype:
            buf = old
        elif self.on_disk:
            return t.detach().to("cpu", copy=True)  # read now: it is written to disk next
        elif self.storage == "cpu":
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
        else:
            buf = torch.empty_like(t, memory_format=torch.contiguous_format)
        return buf.copy_(t.detach(), non_blocking=buf.is_pinned())

    def _to_disk(self, snap: Snapshot) -> None:
        index = {id(p): i for i, p in enumerate(self.opt_params)}
        payload = {
            "step": snap.step,
            "tensors": snap.tensors,
            "state": {
                index[pid]: {k: {"tensor": v.copy, "device": str(v.device)} if isinstance(v, Saved) else v
                             for k, v in st.items()}
                for pid, st in snap.state.items()
                if pid in index
            },
        }
        rank = world()
        suffix = f"-rank{rank[0]}" if rank is not None else ""  # every data-parallel rank keeps its own
        path = Path(self.storage) / f"rollback-step{snap.step}{suffix}.pt"
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        snap.file, snap.tensors, snap.state = path, [], {}

    def _from_disk(self, snap: Snapshot) -> Snapshot:
        assert snap.file is not None
        payload = torch.load(snap.file, map_location="cpu", weights_only=True)
        state = {
            id(self.opt_params[int(i)]): {
                k: Saved(v["tensor"], torch.device(v["device"])) if isinstance(v, dict) and "tensor" in v else v
                for k, v in st.items()
            }
            for i, st in payload["state"].items()
        }
        return Snapshot(snap.step, good=True, tensors=list(payload["tensors"]), state=state)

    def take(self, step: int) -> Snapshot:
        """A snapshot of the state now, as of ``step`` (not yet good)."""
        snap = self._pool.pop() if self._pool else Snapshot(step)
        old_tensors = snap.tensors if len(snap.tensors) == len(self.tensors) else [None] * len(self.tensors)
        snap.tensors = [self._copy_of(t, o) for t, o in zip(self.tensors, old_tensors)]
        old_state = snap.state
        snap.state = {}
        for p, st in self.optimizer.state.items():
            prev = old_state.get(id(p), {})
            saved: dict[str, Any] = {}
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    old = prev.get(k)
                    saved[k] = Saved(self._copy_of(v, old.copy if isinstance(old, Saved) else None), v.device)
                else:
                    saved[k] = v
            snap.state[id(p)] = saved
        snap.step, snap.good = step, False
        if self.on_disk:
            try:
                self._to_disk(snap)
            except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
                # A full or missing disk must not cost the guard (under data parallelism it would leave
                # this rank out of the next reduction): the snapshot stays in host memory instead.
                snap.file = None
                if not self._disk_warned:
                    self._disk_warned = True
                    self._say(f"Rollback: could not write a snapshot to {self.storage} ({getattr(e, 'strerror', None) or e}); "
                              "keeping snapshots in host memory instead.")
        return snap

    def restore(self, snap: Snapshot) -> None:
        """Copy ``snap`` back into the parameters, buffers and optimizer state (queued on the device)."""
        if snap.file is not None:
            snap = self._from_disk(snap)
        for t, saved in zip(self.tensors, snap.tensors):
            local_tensor(t.detach()).copy_(saved, non_blocking=saved.is_pinned())
        state = self.optimizer.state
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for p in params:
            saved_state = snap.state.get(id(p))
            if saved_state is None:
                state.pop(p, None)  # created after the snapshot
                continue
            cur = state.setdefault(p, {})
            for k in [k for k in cur if k not in saved_state]:
                del cur[k]
            for k, v in saved_state.items():
                if isinstance(v, Saved):
                    live = cur.get(k)
                    live = local_tensor(live) if isinstance(live, torch.Tensor) else live
                    if isinstance(live, torch.Tensor) and live.shape == v.copy.shape and live.dtype == v.copy.dtype:
                        live.copy_(v.copy, non_blocking=v.copy.is_pinned())
                    else:
                        cur[k] = v.copy.to(v.device, copy=True)
                else:
                    cur[k] = v

    def release(self, snap: Snapshot) -> None:
        """Drop ``snap``: delete its file, or keep its copies for reuse by the next :meth:`take`."""
        if snap.file is not None:
            snap.file.unlink(missing_ok=True)
        else:
            self._pool.append(snap)
